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
snapshotter registers its layers through the index. Without one, rpull refuses with one line
naming the plain pull (``ctr image pull``), which is today's way for it. The result's ``via``
says which path was taken.
"""

from __future__ import annotations

import datetime
import secrets

import trio

from lazyfs.config import Config
from lazyfs.errors import ConfigError, FormatError, LazyfsError, NotFoundError, TrustError
from lazyfs.format.digest import chain_ids, sha256_digest
from lazyfs.format.oci import DOCKER_MANIFEST, MEDIA_TYPE_MANIFEST, parse_json, parse_manifest
from lazyfs.format.ociimage import parse_source_manifest
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


class _NoIndex(LazyfsError):
    """An ordinary image with no trusted lazyfs index."""


async def _fetch(config: Config, ref) -> tuple[bytes, str, str, bytes, int, list[str], str]:
    """Manifest (bytes, digest, media type), config, bytes fetched, layer digests, and the lazy path
    (``lazyfs image`` or the index an ordinary image is read through)."""
    async with ImageOpener(config) as opener:
        data, media_type, digest = await opener.client.get_manifest(ref, accept=(MEDIA_TYPE_MANIFEST, DOCKER_MANIFEST))
        if ordinary_manifest(data):
            from lazyfs.image.index import trusted_index

            source = parse_source_manifest(data, digest, media_type)
            try:  # the snapshotter checks again, and loads the index, when it registers the layers
                via = await trusted_index(opener, str(ref), data, media_type, digest)
            except NotFoundError:
                raise _NoIndex("an ordinary image with no lazyfs index") from None
            except TrustError as exc:
                raise _NoIndex(f"an ordinary image with no trusted lazyfs index: {exc}") from None
            config_digest, layers = source.config.digest, [layer.digest for layer in source.layers]
        else:
            manifest = parse_manifest(data)
            config_digest, layers, via = manifest.config.digest, [layer.digest for layer in manifest.layers], \
                "lazyfs image"
        blob = await opener.client.get_blob(ref.repo(), config_digest)
        if sha256_digest(blob) != config_digest:
            raise FormatError(f"config of {ref} does not match its digest {config_digest}")
        return data, digest, media_type, blob, len(data) + len(blob), layers, via


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
        digest = sha256_digest(data)
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
        requests = [
            pb.WriteContentRequest(action=pb.STAT, ref=ref),
            pb.WriteContentRequest(action=pb.WRITE, ref=ref, total=len(data), expected=digest, offset=0, data=data),
            pb.WriteContentRequest(action=pb.COMMIT, ref=ref, total=len(data), expected=digest, offset=len(data),
                                   labels=labels),
        ]
        try:
            for _ in self.content.Write(iter(requests), metadata=self.metadata, timeout=CALL_TIMEOUT):
                pass
        except self.grpc.RpcError as exc:
            if exc.code() != self.grpc.StatusCode.ALREADY_EXISTS:
                raise


def rpull(config: Config, text: str, *, address: str, namespace: str = "default", snapshotter: str = "lazyfs") -> dict:
    """Pull lazyfs image *text* into containerd at *address*; layers stay in the registry."""
    ref = parse_reference(text)
    if ref.digest is None and ref.tag is None:
        ref = ref.with_tag("latest")
    try:
        manifest_bytes, digest, media_type, config_bytes, fetched, layers, via = trio.run(_fetch, config, ref)
    except (FormatError, _NoIndex) as exc:
        raise ConfigError(f"{text} is not a lazyfs image ({exc}); pull it the plain way (`ctr image pull "
                          f"--snapshotter {snapshotter}`) or index it first (`lazyfs index`)") from None
    chains = chain_ids(_diff_ids(config_bytes, len(layers), f"config of {text}"))
    ctrd = _Containerd(address, namespace)
    pb = ctrd.pb
    lease = f"lazyfs-rpull-{secrets.token_hex(8)}"
    expire = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=LEASE_SECONDS))
    try:
        ctrd.call(ctrd.leases.Create, pb.leases.CreateRequest(
            id=lease, labels={"containerd.io/gc.expire": expire.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        ctrd.metadata.append(("containerd-lease", lease))
        try:
            ctrd.put_content(config_bytes, {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]})
            config_digest = sha256_digest(config_bytes)
            ctrd.put_content(manifest_bytes, {"containerd.io/gc.ref.content.config": config_digest,
                                              f"containerd.io/distribution.source.{ref.registry}": ref.repository})
            registered = _prepare_layers(ctrd, snapshotter, str(ref), digest, layers, chains)
            target = pb.descriptor.Descriptor(media_type=media_type, digest=digest, size=len(manifest_bytes))
            image = pb.images.Image(name=str(ref), target=target)
            try:
                ctrd.call(ctrd.images.Create, pb.images.CreateImageRequest(image=image))
            except ctrd.grpc.RpcError as exc:
                if exc.code() != ctrd.grpc.StatusCode.ALREADY_EXISTS:
                    raise
                ctrd.call(ctrd.images.Update, pb.images.UpdateImageRequest(image=image))
        finally:
            ctrd.metadata.pop()
            try:
                ctrd.call(ctrd.leases.Delete, pb.leases.DeleteRequest(id=lease))
            except ctrd.grpc.RpcError:
                pass  # it expires by itself
    except ctrd.grpc.RpcError as exc:
        raise LazyfsError(f"containerd refused rpull of {text}: {exc.code().name}: {exc.details()}") from None
    finally:
        ctrd.close()
    return {"image": str(ref), "manifest": digest, "layers": len(layers), "snapshot": chains[-1],
            "registered": registered, "bytes_from_registry": fetched, "via": via}


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
