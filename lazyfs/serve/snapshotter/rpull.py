"""`lazyfs rpull REF`: put a lazyfs image into containerd without downloading its layers.

``ctr image pull`` downloads every layer blob before unpacking and tells the snapshotter nothing
about the layers, so it cannot pull lazily. rpull does what containerd's own pull would, through
containerd's gRPC API, minus the layer data, all under one lease so that the garbage collector
never sees half an image:

1. the manifest and config from the registry (small), written to containerd's content store;
   the manifest's labels keep the config alive, the config's keep the top snapshot alive;
2. for each layer, bottom up, a snapshot prepared on the lazyfs snapshotter with the layer's
   chain id, digest, image reference and manifest digest as labels; the snapshotter registers
   the layer from its metadata and answers "already exists", which containerd turns into a
   committed snapshot named by the chain id;
3. the image record, so that ``ctr run --snapshotter lazyfs REF`` finds it unpacked.

An ordinary image goes the same way when it has a trusted lazyfs index (docs/index.md): the
snapshotter registers its layers through the index. Without one, rpull falls back to a plain
pull, the way ``ctr image pull`` would: each layer downloaded into the content store and
applied by containerd's diff service onto an ordinary snapshot, checked against its diff ID.
The result's ``via`` says which path was taken. A multi-arch reference is resolved to the
manifest of this host's platform (or ``platform``); the image record names the index.
"""

from __future__ import annotations

import datetime
import os
import secrets
import tempfile
from dataclasses import dataclass

import trio

from lazyfs.config import Config
from lazyfs.errors import ConfigError, FormatError, IntegrityError, LazyfsError, NotFoundError, TrustError
from lazyfs.format.digest import chain_ids, sha256_digest
from lazyfs.format.layer import MEDIA_TYPE_LAYER
from lazyfs.format.oci import DOCKER_MANIFEST, MANIFEST_MEDIA_TYPES, MEDIA_TYPE_MANIFEST, parse_json, parse_manifest
from lazyfs.format.ociimage import (
    SourceLayer,
    host_platform,
    is_index,
    media_type_of,
    parse_platforms,
    parse_source_manifest,
    select_platform,
)
from lazyfs.format.reference import parse_reference
from lazyfs.image.remote import ImageOpener, ordinary_manifest
from lazyfs.serve.snapshotter import api
from lazyfs.serve.snapshotter.lazy import (
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF,
)

LEASE_SECONDS = 3600
UPLOAD_PIECE = 1 << 20  # bytes per content Write message (containerd takes at most 16 MiB per message)
CALL_TIMEOUT = 600.0  # registering a layer fetches its image's metadata


def _diff_ids(config: bytes, layers: int, what: str) -> list[str]:
    doc = parse_json(config, what)
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise FormatError(f"{what}: no rootfs.diff_ids")
    if len(diff_ids) != layers:
        raise FormatError(f"{what}: {len(diff_ids)} diff ids for {layers} layers")
    return diff_ids


@dataclass(slots=True)
class _Pulled:
    """What rpull fetched of an image: small documents only, never layer data."""

    manifest: bytes
    digest: str
    media_type: str
    config: bytes
    layers: list[SourceLayer]
    via: str  # "lazyfs image", "index sha256:... (why trusted)", or "plain pull (why)"
    plain: bool  # an ordinary image without a trusted index: its layers are downloaded and unpacked
    index: tuple[bytes, str, str] | None  # a multi-arch index the reference names: bytes, media type, digest
    fetched: int = 0


async def _fetch(config: Config, ref, platform: str) -> _Pulled:
    """The manifest (of *platform*, when *ref* names a multi-arch index), its config, and the path
    its layers take: lazily as a lazyfs image, lazily through a trusted lazyfs index of an ordinary
    image, or a plain pull when an ordinary image has none."""
    async with ImageOpener(config) as opener:
        client = opener.client
        data, media_type, digest = await client.get_manifest(ref, accept=MANIFEST_MEDIA_TYPES)
        fetched = len(data)
        index = None
        if is_index(media_type_of(data, media_type)):
            index = (data, media_type_of(data, media_type), digest)
            entry = select_platform(parse_platforms(data, f"index of {ref}"), platform)
            data, media_type, digest = await client.get_manifest(ref.with_digest(entry.descriptor.digest),
                                                                 accept=(MEDIA_TYPE_MANIFEST, DOCKER_MANIFEST))
            fetched += len(data)
            if digest != entry.descriptor.digest:
                raise FormatError(f"{ref}: its {platform} manifest is {digest}, its index says {entry.descriptor.digest}")
        plain = False
        if ordinary_manifest(data):
            from lazyfs.image.indexed import trusted_index

            source = parse_source_manifest(data, digest, media_type)
            try:  # the snapshotter checks again, and loads the index, when it registers the layers
                via = await trusted_index(opener, str(ref.with_digest(digest)), data, media_type, digest)
            except NotFoundError:
                via, plain = "plain pull (an ordinary image with no lazyfs index)", True
            except TrustError as exc:
                via, plain = f"plain pull (an ordinary image with no trusted lazyfs index: {exc})", True
            config_digest, layers = source.config.digest, list(source.layers)
        else:
            manifest = parse_manifest(data)
            config_digest, via = manifest.config.digest, "lazyfs image"
            layers = [SourceLayer(layer.digest, layer.size, MEDIA_TYPE_LAYER, "none") for layer in manifest.layers]
        blob = await client.get_blob(ref.repo(), config_digest)
        if sha256_digest(blob) != config_digest:
            raise FormatError(f"config of {ref} does not match its digest {config_digest}")
        return _Pulled(data, digest, media_type, blob, layers, via, plain, index, fetched + len(blob))


async def _download(config: Config, ref, digest: str, dest: str) -> int:
    async with ImageOpener(config) as opener:
        return await opener.client.get_blob_to_file(ref.repo(), digest, dest)


class _Containerd:
    """The few containerd services rpull uses, with namespace and lease headers on every call."""

    def __init__(self, address: str, namespace: str) -> None:
        import grpc

        self.grpc = grpc
        self.pb = api.load()
        self.channel = grpc.insecure_channel("unix:" + address)
        self.metadata = [("containerd-namespace", namespace)]
        self.content = self.pb.content_grpc.ContentStub(self.channel)
        self.images = self.pb.images_grpc.ImagesStub(self.channel)
        self.leases = self.pb.leases_grpc.LeasesStub(self.channel)
        self.snapshots = self.pb.snapshots_grpc.SnapshotsStub(self.channel)
        self.diff = self.pb.diff_grpc.DiffStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def code(self, exc: Exception):
        return exc.code() if isinstance(exc, self.grpc.RpcError) else None

    def call(self, method, request, *, timeout: float = CALL_TIMEOUT):
        try:
            return method(request, metadata=self.metadata, timeout=timeout)
        except self.grpc.RpcError as exc:
            if exc.code() == self.grpc.StatusCode.UNAVAILABLE:
                raise NotFoundError(f"containerd does not answer: {exc.details()}") from None
            raise

    def put_content(self, data: bytes, labels: dict[str, str]) -> None:
        """Store *data* in the content store (or just label it if it is there already)."""
        self.put_file(sha256_digest(data), len(data), lambda: iter((data,)), labels)

    def put_file(self, digest: str, size: int, pieces, labels: dict[str, str]) -> None:
        """Store the blob *digest* of *size* bytes, read from ``pieces()`` (an iterator of bytes), in
        the content store, where containerd checks its digest; or just label it if it is there."""
        try:
            self.call(self.content.Info, self.pb.content.InfoRequest(digest=digest))
        except self.grpc.RpcError as exc:
            if exc.code() != self.grpc.StatusCode.NOT_FOUND:
                raise
        else:
            info = self.pb.content.Info(digest=digest, labels=labels)
            from google.protobuf.field_mask_pb2 import FieldMask

            mask = FieldMask(paths=[f"labels.{k}" for k in labels])
            self.call(self.content.Update, self.pb.content.UpdateRequest(info=info, update_mask=mask))
            return
        ref = f"lazyfs-rpull-{digest}"
        pb = self.pb.content

        def requests():
            yield pb.WriteContentRequest(action=pb.STAT, ref=ref)
            offset = 0
            for piece in pieces():
                yield pb.WriteContentRequest(action=pb.WRITE, ref=ref, total=size, expected=digest, offset=offset,
                                             data=piece)
                offset += len(piece)
            yield pb.WriteContentRequest(action=pb.COMMIT, ref=ref, total=size, expected=digest, offset=offset,
                                         labels=labels)

        try:
            for _ in self.content.Write(requests(), metadata=self.metadata, timeout=CALL_TIMEOUT):
                pass
        except self.grpc.RpcError as exc:
            if exc.code() != self.grpc.StatusCode.ALREADY_EXISTS:
                raise


def rpull(config: Config, text: str, *, address: str, namespace: str = "default", snapshotter: str = "lazyfs",
          platform: str | None = None) -> dict:
    """Pull image *text* into containerd at *address*: a lazyfs image, or an ordinary image with a
    trusted lazyfs index, lazily (its layers stay in the registry); an ordinary image without one by
    a plain pull (every layer downloaded and unpacked by containerd). From a multi-arch index, the
    manifest of *platform* (default: this host's). The result's ``via`` says which path was taken."""
    ref = parse_reference(text)
    if ref.digest is None and ref.tag is None:
        ref = ref.with_tag("latest")
    platform = platform or host_platform()
    try:
        pulled = trio.run(_fetch, config, ref, platform)
    except FormatError as exc:
        raise ConfigError(f"{text} is not an image rpull can pull ({exc}); pull it the plain way (`ctr image pull "
                          f"--snapshotter {snapshotter}`)") from None
    layers = [layer.digest for layer in pulled.layers]
    diff_ids = _diff_ids(pulled.config, len(layers), f"config of {text}")
    chains = chain_ids(diff_ids)
    ctrd = _Containerd(address, namespace)
    pb = ctrd.pb
    lease = f"lazyfs-rpull-{secrets.token_hex(8)}"
    expire = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=LEASE_SECONDS))
    fetched = pulled.fetched
    try:
        ctrd.call(ctrd.leases.Create, pb.leases.CreateRequest(
            id=lease, labels={"containerd.io/gc.expire": expire.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        ctrd.metadata.append(("containerd-lease", lease))
        pulled_all = False
        try:
            if pulled.plain:
                registered, downloaded = _unpack_layers(ctrd, config, snapshotter, ref, pulled.layers, diff_ids, chains)
                fetched += downloaded
            else:
                registered = _prepare_layers(ctrd, snapshotter, str(ref), pulled.digest, layers, chains)
            ctrd.put_content(pulled.config, {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]})
            labels = {"containerd.io/gc.ref.content.config": sha256_digest(pulled.config),
                      f"containerd.io/distribution.source.{ref.registry}": ref.repository}
            if pulled.plain:  # the layer blobs are in the content store: keep them with the manifest
                labels.update({f"containerd.io/gc.ref.content.l.{i}": d for i, d in enumerate(layers)})
            ctrd.put_content(pulled.manifest, labels)
            target = pb.descriptor.Descriptor(media_type=pulled.media_type, digest=pulled.digest,
                                              size=len(pulled.manifest))
            if pulled.index is not None:  # the image is the index, as containerd's own pull makes it
                data, media_type, digest = pulled.index
                ctrd.put_content(data, {"containerd.io/gc.ref.content.m.0": pulled.digest,
                                        f"containerd.io/distribution.source.{ref.registry}": ref.repository})
                target = pb.descriptor.Descriptor(media_type=media_type, digest=digest, size=len(data))
            image = pb.images.Image(name=str(ref), target=target)
            try:
                ctrd.call(ctrd.images.Create, pb.images.CreateImageRequest(image=image))
            except ctrd.grpc.RpcError as exc:
                if exc.code() != ctrd.grpc.StatusCode.ALREADY_EXISTS:
                    raise
                ctrd.call(ctrd.images.Update, pb.images.UpdateImageRequest(image=image))
            pulled_all = True
        finally:
            ctrd.metadata.pop()
            try:
                # containerd's Remove of a snapshot drops its record; its garbage collector removes
                # the snapshot itself, some time later. A pull that failed waits for that (sync), so
                # it leaves nothing behind when it returns; one that worked does not wait.
                ctrd.call(ctrd.leases.Delete, pb.leases.DeleteRequest(id=lease, sync=not pulled_all))
            except ctrd.grpc.RpcError:
                pass  # it expires by itself
    except ctrd.grpc.RpcError as exc:
        raise LazyfsError(f"containerd refused rpull of {text}: {exc.code().name}: {exc.details()}") from None
    finally:
        ctrd.close()
    result = {"image": str(ref), "manifest": pulled.digest, "layers": len(layers), "snapshot": chains[-1],
              "registered": registered, "bytes_from_registry": fetched, "via": pulled.via}
    if pulled.index is not None:
        result.update({"index": pulled.index[2], "platform": platform})
    return result


def _spool_root(config: Config) -> str | None:
    """Where a plain pull keeps a layer blob between download and upload: the cache root's disk (a
    layer can be GiBs; /tmp may be memory), else the system's temporary directory."""
    root = os.path.join(config.cache_root, "rpull")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return root if os.access(root, os.W_OK) else None


def _unpack_layers(ctrd: _Containerd, config: Config, snapshotter: str, ref, layers: list[SourceLayer],
                   diff_ids: list[str], chains: list[str]) -> tuple[int, int]:
    """The plain pull: each layer, bottom up, downloaded (verified) into containerd's content store,
    then applied by containerd's diff service onto a snapshot committed as its chain id, as
    ``ctr image pull`` does; how many were new, and their bytes."""
    pb = ctrd.pb
    unpacked = downloaded = 0
    with tempfile.TemporaryDirectory(prefix="lazyfs-rpull-", dir=_spool_root(config)) as work:
        for i, (layer, chain) in enumerate(zip(layers, chains)):
            try:
                ctrd.call(ctrd.snapshots.Stat, pb.snapshots.StatSnapshotRequest(snapshotter=snapshotter, key=chain))
                continue
            except ctrd.grpc.RpcError as exc:
                if exc.code() != ctrd.grpc.StatusCode.NOT_FOUND:
                    raise
            path = os.path.join(work, layer.digest.split(":", 1)[1])
            size = trio.run(_download, config, ref, layer.digest, path)
            downloaded += size

            def pieces(path=path):
                with open(path, "rb") as f:
                    while piece := f.read(UPLOAD_PIECE):
                        yield piece

            ctrd.put_file(layer.digest, size, pieces, {"containerd.io/uncompressed": diff_ids[i]})
            os.unlink(path)
            key = f"lazyfs-rpull-{secrets.token_hex(6)} {chain}"
            mounts = ctrd.call(ctrd.snapshots.Prepare, pb.snapshots.PrepareSnapshotRequest(
                snapshotter=snapshotter, key=key, parent=chains[i - 1] if i else "")).mounts
            try:
                desc = pb.descriptor.Descriptor(media_type=layer.media_type, digest=layer.digest, size=size)
                applied = ctrd.call(ctrd.diff.Apply, pb.diff.ApplyRequest(diff=desc, mounts=mounts)).applied
                if applied.digest != diff_ids[i]:
                    raise IntegrityError(f"layer {layer.digest} of {ref} (its diff ID)", diff_ids[i], applied.digest,
                                         "containerd's diff service")
                ctrd.call(ctrd.snapshots.Commit, pb.snapshots.CommitSnapshotRequest(
                    snapshotter=snapshotter, name=chain, key=key))
            except BaseException:
                try:
                    ctrd.call(ctrd.snapshots.Remove, pb.snapshots.RemoveSnapshotRequest(snapshotter=snapshotter,
                                                                                          key=key))
                except ctrd.grpc.RpcError:
                    pass  # the lease's end lets the garbage collector take it
                raise
            unpacked += 1
    return unpacked, downloaded


def _prepare_layers(ctrd: _Containerd, snapshotter: str, image: str, digest: str, layers: list[str],
                    chains: list[str]) -> int:
    """Make every layer a committed snapshot, bottom up; how many were new."""
    pb = ctrd.pb.snapshots
    registered = 0
    for i, (layer, chain) in enumerate(zip(layers, chains)):
        try:
            ctrd.call(ctrd.snapshots.Stat, pb.StatSnapshotRequest(snapshotter=snapshotter, key=chain))
            continue
        except ctrd.grpc.RpcError as exc:
            if exc.code() != ctrd.grpc.StatusCode.NOT_FOUND:
                raise
        key = f"lazyfs-rpull-{secrets.token_hex(6)} {chain}"
        labels = {LABEL_SNAPSHOT_REF: chain, LABEL_IMAGE_REF: image, LABEL_LAYER_DIGEST: layer,
                  LABEL_MANIFEST_DIGEST: digest}
        request = pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=chains[i - 1] if i else "",
                                            labels=labels)
        try:
            ctrd.call(ctrd.snapshots.Prepare, request)
        except ctrd.grpc.RpcError as exc:
            if exc.code() == ctrd.grpc.StatusCode.ALREADY_EXISTS:
                registered += 1
                continue
            raise
        # the snapshotter made an ordinary active snapshot: it did not take the layer as remote
        ctrd.call(ctrd.snapshots.Remove, pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))
        raise LazyfsError(f"snapshotter {snapshotter!r} did not register layer {layer} of {image} as a "
                          "lazyfs layer (is it `lazyfs snapshotter`, and can it reach the registry? see its log)")
    return registered
