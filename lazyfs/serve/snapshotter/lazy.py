"""lazyfs images under the snapshotter: remote layers registered from labels, devices mounted per snapshot.

A lazyfs layer becomes a committed snapshot without downloading it: the snapshotter pulls the
image's metadata (manifest, config, one metadata tail per layer) into an OCI layout under
``ROOT/images/<manifest hex>`` whose index remembers the registry; chunks are fetched on demand
by the host daemon once a snapshot on top of the layer is attached. A snapshot whose parent
chain ends in lazyfs layers gets the merged device of that prefix of the image through the
daemon's FUSE file, a loop device and ext4.

A layer of an ordinary image with a trusted lazyfs index (docs/index.md §7) is registered the
same way: the layout then holds the ordinary manifest only, and the daemon opens it through the
index (``open_registered``); an ordinary image without one unpacks the ordinary way (a plain
pull). The log says which.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass

import cachetools

from lazyfs.config import Config
from lazyfs.errors import FormatError, LazyfsError, NotFoundError, TrustError
from lazyfs.format.oci import (
    ANN_VIRTUAL_SIZE,
    DOCKER_MANIFEST,
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_MANIFEST,
    build_manifest,
    canonical_json,
    parse_json,
    parse_manifest,
)
from lazyfs.format.ociimage import (
    host_platform,
    is_index,
    media_type_of,
    parse_platforms,
    parse_source_manifest,
    select_platform,
)
from lazyfs.format.reference import parse_reference
from lazyfs.image.layout import OciLayout
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ANN_SOURCE, META_DIR, ordinary_manifest, pull_image
from lazyfs.serve import dmswitch, system
from lazyfs.serve.control import call
from lazyfs.serve.mount import daemon_alive, ensure_daemon, switchable
from lazyfs.serve.snapshotter.portal import TrioPortal
from lazyfs.serve.state import FrontEnd

log = logging.getLogger(__name__)

# labels containerd (its unpacker, its CRI plugin) and `lazyfs rpull` put on a layer's Prepare
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
# per snapshot: where the writable state of a container on a lazyfs image goes ("overlay" or "block")
LABEL_MODE = "containerd.io/snapshot/lazyfs.mode"
LAYOUT_TAG = "image"
MANIFEST_CACHE_SECONDS = 60.0
MANIFEST_CACHE_ENTRIES = 256  # images looked up within a minute; older or more are fetched again
ANN_VIA = "dev.lazyfs.snapshotter.via"  # on a registered ordinary image's layout entry: the index it goes through


@dataclass(frozen=True, slots=True)
class LayerRequest:
    """What the labels of a Prepare say about a remote layer."""

    target: str  # the chain id the committed snapshot will be known by
    image: str  # image reference
    layer: str  # layer digest
    manifest: str | None  # manifest digest, when the caller knows it


def layer_request(labels: dict) -> LayerRequest | None:
    """The remote layer named by *labels*, or None when they name none (sans-IO)."""
    target, image, layer = labels.get(LABEL_SNAPSHOT_REF), labels.get(LABEL_IMAGE_REF), labels.get(LABEL_LAYER_DIGEST)
    if not (target and image and layer):
        return None
    return LayerRequest(target, image, layer, labels.get(LABEL_MANIFEST_DIGEST) or None)


@dataclass(frozen=True, slots=True)
class RemoteLayer:
    """A lazyfs layer found in its image, with the image's metadata stored locally."""

    layout: str
    source: str  # registry reference with the manifest digest
    manifest: str
    index: int  # position in the manifest, bottom first
    count: int
    digests: tuple[str, ...]  # every layer digest of the manifest, bottom first
    meta_bytes: int  # bytes the layer's metadata tail takes locally
    via: str = ""  # an ordinary image: the lazyfs index it is read through ("index sha256:... (why trusted)")

    def extra(self) -> dict:
        return {"layout": self.layout, "source": self.source, "manifest": self.manifest, "index": self.index,
                "count": self.count, "layer": self.digests[self.index], "digests": list(self.digests),
                **({"via": self.via} if self.via else {})}


class LazyImages:
    """Finds lazyfs layers in registries and keeps their images' metadata under *directory*.

    Registry I/O runs on *portal*'s loop with its shared client (the caller's thread waits).
    """

    def __init__(self, config: Config, directory: str, portal: TrioPortal | None = None) -> None:
        self.config, self.directory, self.portal = config, directory, portal
        self._manifests: cachetools.TTLCache[tuple[str, str | None], tuple[float, bytes, str, str]] = \
            cachetools.TTLCache(MANIFEST_CACHE_ENTRIES, MANIFEST_CACHE_SECONDS)
        # ordinary images found without a trusted index: not asked again for a minute (one look per
        # image, not one per layer)
        self._unindexed: cachetools.TTLCache[str, str] = cachetools.TTLCache(MANIFEST_CACHE_ENTRIES,
                                                                             MANIFEST_CACHE_SECONDS)
        self._lock = threading.Lock()

    def _fetch_manifest(self, image: str, digest: str | None) -> tuple[bytes, str, str]:
        """The manifest's bytes, digest and media type."""
        key = (image, digest)
        with self._lock:
            hit = self._manifests.get(key)
            if hit and time.monotonic() - hit[0] < MANIFEST_CACHE_SECONDS:
                return hit[1], hit[2], hit[3]
        ref = parse_reference(image)
        if digest:
            ref = ref.with_digest(digest)

        async def get():
            client = await self.portal.opener.ensure_client()
            data, media_type, got = await client.get_manifest(ref, accept=MANIFEST_MEDIA_TYPES)
            if is_index(media_type_of(data, media_type)):  # a multi-arch image by tag: this host's manifest
                try:
                    entry = select_platform(parse_platforms(data, f"index of {ref}"), host_platform())
                except NotFoundError as exc:  # containerd unpacks nothing of it either: not ours to say more
                    raise FormatError(str(exc)) from None
                data, media_type, got = await client.get_manifest(ref.with_digest(entry.descriptor.digest),
                                                                  accept=(MEDIA_TYPE_MANIFEST, DOCKER_MANIFEST))
            return data, got, media_type

        data, got, media_type = self.portal.run(get)
        with self._lock:
            self._manifests[key] = (time.monotonic(), data, got, media_type)
        return data, got, media_type

    def find(self, req: LayerRequest) -> RemoteLayer | None:
        """The lazyfs layer *req* names, its image metadata stored; None if the image is not lazyfs
        (nor an ordinary image with a trusted lazyfs index)."""
        try:
            data, digest, media_type = self._fetch_manifest(req.image, req.manifest)
            if ordinary_manifest(data):
                return self._find_indexed(req, data, media_type, digest)
            manifest = parse_manifest(data)
        except FormatError as exc:
            log.info("%s is not a lazyfs image (%s): layer %s unpacks the ordinary way", req.image, exc, req.layer)
            return None
        digests = tuple(layer.digest for layer in manifest.layers)
        if req.layer not in digests:
            log.info("layer %s is not in lazyfs image %s", req.layer, req.image)
            return None
        index = digests.index(req.layer)
        source = str(parse_reference(req.image).with_digest(digest))
        layout = os.path.join(self.directory, digest.split(":", 1)[1])
        if not _pulled(layout):
            self._pull(source, layout)
        meta = os.path.join(layout, META_DIR, req.layer.split(":", 1)[1])
        return RemoteLayer(layout, source, digest, index, len(digests), digests, _disk_usage(meta))

    def _find_indexed(self, req: LayerRequest, data: bytes, media_type: str, digest: str) -> RemoteLayer | None:
        """A layer of an ordinary image: registered when the image has a trusted lazyfs index (None otherwise)."""
        source = str(parse_reference(req.image).with_digest(digest))
        manifest = parse_source_manifest(data, digest, media_type)
        digests = tuple(layer.digest for layer in manifest.layers)
        if req.layer not in digests:
            log.info("layer %s is not in image %s", req.layer, req.image)
            return None
        layout = os.path.join(self.directory, digest.split(":", 1)[1])
        if not _pulled(layout):
            if not self._register_indexed(source, data, media_type, digest, layout):
                return None
        _, desc = OciLayout(layout).read_manifest(LAYOUT_TAG)
        return RemoteLayer(layout, source, digest, digests.index(req.layer), len(digests), digests, 0,
                           via=desc.annotations.get(ANN_VIA, "index"))

    def _register_indexed(self, source: str, data: bytes, media_type: str, digest: str, layout: str) -> bool:
        """Check that ordinary image *source* has a trusted index, then keep
        its manifest in *layout*; False (and the log says so) when it has none: a plain pull, as before."""
        with self._lock:
            why = self._unindexed.get(digest)
        if why is None:
            from lazyfs.image.indexed import trusted_index

            async def check():  # the referrers and the index manifest; the daemon loads the rest when it attaches
                opener = self.portal.opener
                await opener.ensure_client()
                return await trusted_index(opener, source, data, media_type, digest)

            try:
                via = self.portal.run(check)
            except (NotFoundError, TrustError) as exc:
                why = str(exc)
                with self._lock:
                    self._unindexed[digest] = why
        if why is not None:
            log.info("ordinary image %s, no lazyfs index used (%s): plain pull, its layers unpack the ordinary way",
                     source, why)
            return False
        tmp = f"{layout}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            OciLayout(tmp).put_manifest(data, LAYOUT_TAG, media_type, annotations={ANN_SOURCE: source, ANN_VIA: via})
            try:
                os.rename(tmp, layout)
            except OSError:
                if not _pulled(layout):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("registered ordinary image %s lazily via %s: no layer data downloaded", source, via)
        return True

    def _pull(self, source: str, layout: str) -> None:
        """Manifest, config and metadata tails into *layout* (made under a temporary name, then renamed)."""
        tmp = f"{layout}.tmp-{os.getpid()}-{threading.get_ident()}"

        async def pull():
            return await pull_image(self.portal.opener, parse_reference(source), LocalRef(tmp, LAYOUT_TAG))

        try:
            result = self.portal.run(pull)
            try:
                os.rename(tmp, layout)
            except OSError:
                if not _pulled(layout):  # not another thread's copy: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("registered lazyfs image %s: %d bytes of layer metadata, no layer data", source,
                 result["metadata_bytes"])


def _pulled(layout: str) -> bool:
    return os.path.exists(os.path.join(layout, "index.json"))


def _disk_usage(path: str) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def image_for(extra: dict) -> str:
    """The local image reference of the lazyfs layers up to and including the one *extra* describes.

    The whole image is the layout's own tag; a lower prefix gets its own manifest (same config,
    fewer layers) the first time it is needed.
    """
    layout, index, count = extra["layout"], int(extra["index"]), int(extra["count"])
    if index == count - 1:
        return str(LocalRef(layout, LAYOUT_TAG))
    tag = f"layers-{index + 1}"
    store = OciLayout(layout)
    if tag not in store.tags():
        data, desc = store.read_manifest(LAYOUT_TAG)
        if ordinary_manifest(data):  # registered through its index: a prefix of the ordinary manifest
            doc = parse_json(data, f"manifest of {layout}")
            prefix = canonical_json({**doc, "layers": doc["layers"][:index + 1]})
            store.put_manifest(prefix, tag, desc.media_type, annotations={ANN_SOURCE: desc.annotations[ANN_SOURCE]})
            return str(LocalRef(layout, tag))
        manifest = parse_manifest(data)
        annotations = {k: v for k, v in manifest.annotations.items() if k != ANN_VIRTUAL_SIZE}
        prefix = build_manifest(manifest.config, list(manifest.layers[:index + 1]), manifest.virtual_size, annotations)
        store.put_manifest(prefix, tag, annotations={ANN_SOURCE: desc.annotations[ANN_SOURCE]})
    return str(LocalRef(layout, tag))


class Devices:
    """Attachments of the host daemon (named ``PREFIX-ID``), their loop devices and ext4 mounts."""

    def __init__(self, config: Config, config_path: str | None, prefix: str, portal: TrioPortal) -> None:
        self.config, self.config_path, self.prefix, self.portal = config, config_path, prefix, portal

    def name(self, snapshot_id: int) -> str:
        return f"{self.prefix}-{snapshot_id}"

    def snapshot_id(self, name: str) -> int | None:
        head, sep, tail = name.rpartition("-")
        return int(tail) if head == self.prefix and tail.isdigit() else None

    def export_path(self, name: str) -> str:
        from lazyfs.serve.state import IMAGE_NAME

        return os.path.join(self.config.export_dir, name, IMAGE_NAME)

    def attachments(self) -> dict[str, dict]:
        """This snapshotter's attachments in the daemon (none if no daemon runs)."""
        if not daemon_alive(self.config):
            return {}
        return {a["name"]: a for a in call(self.config.socket_path, "list", timeout=30)
                if self.snapshot_id(a["name"]) is not None}

    def attach(self, name: str, image: str, writable_dir: str | None) -> dict:
        ensure_daemon(self.config, self.config_path)
        existing = self.attachments().get(name)
        if existing is not None:
            return existing
        return call(self.config.socket_path, "attach", timeout=600, image=image, name=name,
                    writable=writable_dir is not None, writable_dir=writable_dir, kind="sparse",
                    front_end=FrontEnd(owner="snapshotter").to_json(), plain_http=list(self.config.plain_http_hosts()))

    def loop_for(self, name: str, known: str | None, read_only: bool) -> str:
        """A loop device on the attachment's file: *known* if it still is one, else a new one."""
        path = self.export_path(name)
        found = self.portal.run(system.find_loop_devices, path)
        if known in found:
            return known
        if found:
            return found[0]
        # read-only: buffered unless the config says direct, as `lazyfs mount` does (docs/warm.md)
        direct_io = not read_only or self.config.read_only_loop == "direct"
        return self.portal.run(lambda: system.losetup_attach(path, read_only, direct_io))

    def switchable_device(self, name: str) -> str | None:
        """The switchable device-mapper device of attachment *name*, if it exists (a restart finds it)."""
        path = dmswitch.device_path(dmswitch.device_name(name))
        return path if os.path.exists(path) else None

    def make_switchable(self, name: str, loop: str, size: int) -> str:
        """What a read-only layer's ext4 is mounted from: a device-mapper device over *loop* that
        the daemon moves onto the image's hydrated file once it is fully local, where the host
        can (serve/dmswitch.py); else *loop* itself."""
        if not switchable(self.config, False, "buffered"):
            return loop
        dm = dmswitch.device_name(name)
        path = self.portal.run(lambda: system.run_steps(dmswitch.create_steps(dm, loop, size)))
        route = "direct" if system.loop_direct_io(loop) else "buffered"
        call(self.config.socket_path, "mark", timeout=60, name=name,
             front_end=FrontEnd(dm=dm, loop=loop, loop_route=route).to_json())
        return path

    def mount_ro(self, dev: str, target: str) -> None:
        entry = next((m for m in system.mounts() if m.mountpoint == target), None)
        if entry is not None:
            if entry.source == dev:
                return
            self.portal.run(lambda: system.umount(target, lazy=True))
        os.makedirs(target, exist_ok=True)
        # noload: never replay a journal of a read-only image
        self.portal.run(lambda: system.mount(dev, target, "ext4", read_only=True, options=("noload",)))

    def teardown(self, name: str, mountpoint: str | None) -> list[str]:
        """Unmount *mountpoint*, detach the loop devices and the attachment; what failed, as messages."""
        problems = []
        if mountpoint is not None:
            for _ in range(8):  # stacked mounts come off one by one
                if not system.is_mountpoint(mountpoint):
                    break
                try:
                    self.portal.run(system.umount, mountpoint)
                except LazyfsError:
                    # still used (a container's overlay over it): let the kernel finish later
                    try:
                        self.portal.run(lambda: system.umount(mountpoint, lazy=True))
                    except LazyfsError as exc:
                        problems.append(str(exc))
                        break
            try:
                os.rmdir(mountpoint)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"rmdir {mountpoint}: {exc}")
        dm = self.switchable_device(name)
        if dm is not None:
            try:  # its loop devices clear themselves with it
                self.portal.run(lambda: system.run_steps(dmswitch.remove_steps(os.path.basename(dm))))
            except LazyfsError as exc:
                problems.append(str(exc))
        for dev in self.portal.run(system.find_loop_devices, self.export_path(name)):
            try:
                self.portal.run(system.losetup_detach, dev)
            except LazyfsError as exc:
                problems.append(str(exc))
        if daemon_alive(self.config):
            try:
                call(self.config.socket_path, "detach", timeout=60, name=name)
            except NotFoundError:
                pass
            except LazyfsError as exc:
                problems.append(f"detach {name}: {exc}")
        return problems
