"""The snapshotter's logic, free of gRPC: snapshots as rows, directories and (for lazyfs) devices.

Layout (read/write splitting):

* ``ROOT`` (the cache root, a big disk): ``metadata.db``; ``snapshots/ID/fs`` of every committed
  overlay layer, and of the active snapshots containerd unpacks layers into (their Prepare
  carries ``containerd.io/snapshot.ref``); ``images/`` with lazyfs image metadata; ``mnt/ID`` where
  the read-only ext4 of a lazyfs image is mounted under a snapshot.
* ``WRITABLE_ROOT`` (a fast disk): ``snapshots/ID/{fs,work}``, the overlay upper and work
  directories of containers' active snapshots, or ``snapshots/ID/layer``, the lazyfs writable
  layer of a block-mode one. Committing such a snapshot moves its directory to ``ROOT``.

Every change is ordered so that a crash leaves at worst unreferenced directories, mounts or
attachments, which `cleanup` removes; `recover` remounts what running containers need.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence

from lazyfs.config import Config
from lazyfs.errors import AlreadyExistsError, BusyError, ConfigError, LazyfsError, NotFoundError
from lazyfs.serve.snapshotter.filters import parse_filters, snapshot_fields
from lazyfs.serve.snapshotter.lazy import (
    LABEL_MODE,
    LABEL_SNAPSHOT_REF,
    Devices,
    LazyImages,
    image_for,
    layer_request,
)
from lazyfs.serve.snapshotter.portal import TrioPortal
from lazyfs.serve.snapshotter.locks import KeyedLocks
from lazyfs.serve.snapshotter.overlay import Mount, disk_usage, move_tree, overlay_mounts, remove_tree
from lazyfs.serve.snapshotter.table import (
    ACTIVE,
    BLOCK,
    COMMITTED,
    LAZYFS,
    ON_CACHE,
    ON_WRITABLE,
    OVERLAY,
    VIEW,
    SnapshotTable,
    Snapshot,
)

log = logging.getLogger("lazyfs.snapshotter")
MODES = ("overlay", "block")


class Snapshotter:
    """containerd's snapshotter contract over overlayfs, with lazyfs images as remote layers."""

    def __init__(self, root: str, writable_root: str, config: Config, config_path: str | None = None,
                 mode: str = "overlay") -> None:
        if mode not in MODES:
            raise ConfigError(f"snapshotter mode must be overlay or block, not {mode!r}")
        self.root, self.writable_root = os.path.abspath(root), os.path.abspath(writable_root)
        self.config, self.mode = config, mode
        for d in (self.root, os.path.join(self.root, "snapshots"), os.path.join(self.root, "mnt"),
                  os.path.join(self.root, "images"), os.path.join(self.writable_root, "snapshots")):
            os.makedirs(d, mode=0o711, exist_ok=True)
        self.store = SnapshotTable(os.path.join(self.root, "metadata.db"))
        # one trio loop and one registry client for the process; gRPC threads enter it
        self.portal = TrioPortal(config, name="snapshotter-trio")
        self.images = LazyImages(config, os.path.join(self.root, "images"), self.portal)
        tag = hashlib.sha256(self.root.encode()).hexdigest()[:8]
        self.devices = Devices(config, config_path, f"ctrd-{tag}", self.portal)
        self.index_off = os.path.exists("/sys/module/overlay/parameters/index")
        # Locks (docs/daemon.md, "Concurrency"); always taken in this order, never the other way:
        # a snapshot's device lock (its attach, loop device, mount and teardown: slow, the daemon
        # and the registry behind it), then the table lock (rows and directories: local and short,
        # never held across the registry or the daemon).
        self.devices_locks = KeyedLocks()
        self.lock = threading.Lock()
        self._lookups = 0  # remote-layer lookups in flight (cleanup keeps image metadata meanwhile)

    def close(self) -> None:
        self.portal.close()
        self.store.close()

    # ------------------------------------------------------------ paths

    def snapshot_dir(self, snap: Snapshot) -> str:
        base = self.root if snap.placement == ON_CACHE else self.writable_root
        return os.path.join(base, "snapshots", str(snap.id))

    def fs_dir(self, snap: Snapshot) -> str:
        return os.path.join(self.snapshot_dir(snap), "fs")

    def work_dir(self, snap: Snapshot) -> str:
        return os.path.join(self.snapshot_dir(snap), "work")

    def layer_dir(self, snap: Snapshot) -> str:
        return os.path.join(self.snapshot_dir(snap), "layer")

    def mount_dir(self, snap: Snapshot) -> str:
        return os.path.join(self.root, "mnt", str(snap.id))

    # ------------------------------------------------------------ reads

    def stat(self, key: str) -> Snapshot:
        return self.store.get(key)

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Snapshot]:
        matcher = parse_filters(list(filters))
        for snap in self.store.all():
            if matcher.matches(snapshot_fields(snap.key, snap.parent, snap.kind, snap.labels)):
                yield snap

    def usage(self, key: str) -> tuple[int, int]:
        snap = self.store.get(key)
        if snap.kind == ACTIVE:
            return disk_usage(self.layer_dir(snap) if snap.backend == BLOCK else self.fs_dir(snap))
        return snap.usage or (0, 0)

    def mounts(self, key: str) -> list[Mount]:
        snap = self.store.get(key)
        if snap.kind == COMMITTED:
            raise BusyError(f"snapshot {key} is committed: only active snapshots and views have mounts")
        if self._lazy_base(snap) is not None:
            with self.devices_locks.hold(snap.id):
                snap = self._ensure_device(self.store.get(key))
        return self._mounts(snap)

    def _lazy_base(self, snap: Snapshot) -> Snapshot | None:
        """The nearest lazyfs layer below *snap* (the top of the image it runs on), if any."""
        return next((p for p in self.store.ancestors(snap) if p.backend == LAZYFS), None)

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        if snap.backend == BLOCK:
            return [Mount("ext4", snap.extra["loop"], ("rw",))]
        lowers = []
        for p in self.store.ancestors(snap):
            if p.backend == LAZYFS:
                lowers.append(self.mount_dir(snap))
                break
            lowers.append(self.fs_dir(p))
        return overlay_mounts(read_only=snap.kind == VIEW, upper=self.fs_dir(snap), work=self.work_dir(snap),
                              lowers=lowers, index_off=self.index_off)

    # ------------------------------------------------------------ changes

    def prepare(self, key: str, parent: str, labels: dict) -> list[Mount]:
        return self._create(ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: dict) -> list[Mount]:
        return self._create(VIEW, key, parent, labels)

    def _create(self, kind: str, key: str, parent: str, labels: dict) -> list[Mount]:
        labels = dict(labels or {})
        if kind == ACTIVE:
            self._register_remote(parent, labels)  # AlreadyExistsError when it did
        with self.lock:
            parent_snap = self.store.get(parent) if parent else None
            base = None
            if parent_snap is not None:
                base = parent_snap if parent_snap.backend == LAZYFS else self._lazy_base(parent_snap)
            backend = OVERLAY
            if kind == ACTIVE and base is not None:
                wanted = labels.get(LABEL_MODE, self.mode)
                if wanted not in MODES:
                    raise ConfigError(f"label {LABEL_MODE} must be overlay or block, not {wanted!r}")
                if wanted == "block":
                    if base is not parent_snap:
                        if LABEL_MODE in labels:
                            raise ConfigError(f"block mode needs the parent to be a lazyfs layer, and {parent} is "
                                              "an overlay layer over one")
                    else:
                        backend = BLOCK
            # layers being unpacked (and read-only views) belong on the big disk from the start
            placement = ON_CACHE if kind == VIEW or is_unpack(key, labels) else ON_WRITABLE
            with self.store.transaction():
                snap = self.store.create(key, parent, kind, labels, backend=backend, placement=placement)
                self._make_dirs(snap)
        log.info("%s %s (#%d) parent=%r %s on the %s root", "prepared" if kind == ACTIVE else "viewed", key,
                 snap.id, parent, backend, placement)
        if base is not None:
            # the daemon attaches the image (and may wait for the registry): only this snapshot waits
            with self.devices_locks.hold(snap.id):
                try:
                    snap = self._ensure_device(snap)
                except BaseException:
                    self._forget(snap)
                    raise
        return self._mounts(snap)

    def _make_dirs(self, snap: Snapshot) -> None:
        d = self.snapshot_dir(snap)
        if os.path.lexists(d):  # left by a transaction that never committed: its id is free again
            remove_tree(d)
        os.makedirs(d, mode=0o700)
        if snap.backend == BLOCK:
            return
        os.mkdir(self.fs_dir(snap), 0o755)
        os.chmod(self.fs_dir(snap), 0o755)  # whatever the umask: containers expect a 0755 root
        if snap.kind == ACTIVE:
            os.mkdir(self.work_dir(snap), 0o700)

    def _register_remote(self, parent: str, labels: dict) -> None:
        """Register a lazyfs layer named by the labels as a committed snapshot and say it exists.

        The registry is asked without the table lock (other snapshots' calls go on meanwhile);
        what it answered is checked against the table again under the lock.
        """
        req = layer_request(labels)
        if req is None:
            return
        with self.lock:
            if self._target_exists(req, parent):
                return
            self._lookups += 1
        try:
            layer = self.images.find(req)
        except LazyfsError as exc:  # unreachable registry, refused credentials, a damaged manifest...
            log.warning("cannot look at %s for layer %s (%s): it unpacks the ordinary way", req.image, req.layer, exc)
            return
        finally:
            with self.lock:
                self._lookups -= 1
        if layer is None:
            return
        with self.lock:
            if self._target_exists(req, parent):  # registered by another call meanwhile
                return
            parent_snap = self.store.get(parent) if parent else None
            below_ok = (layer.index == 0 and parent_snap is None) or (
                parent_snap is not None and parent_snap.backend == LAZYFS and layer.index > 0
                and parent_snap.extra.get("layer") == layer.digests[layer.index - 1])
            if not below_ok:
                log.info("lazyfs layer %s of %s sits on %r, not on its own lower layer: unpacking it the ordinary way",
                         req.layer, req.image, parent)
                return
            meta = layer.meta_bytes
            snap = self.store.create(req.target, parent, COMMITTED, labels, backend=LAZYFS, placement=ON_CACHE,
                                     extra=layer.extra(), usage=(meta, 1 if meta else 0))
        log.info("registered lazyfs layer %s (%d of %d of %s) as snapshot %s (#%d) without downloading it",
                 req.layer, layer.index + 1, layer.count, layer.source, req.target, snap.id)
        raise AlreadyExistsError(f"target snapshot {req.target} already exists")

    def _target_exists(self, req, parent: str) -> bool:
        """Whether *req*'s target snapshot exists (AlreadyExistsError if it is that very layer). Under the table lock."""
        try:
            existing = self.store.get(req.target)
        except NotFoundError:
            return False
        if existing.kind == COMMITTED and existing.parent == parent and \
                existing.labels.get(LABEL_SNAPSHOT_REF) == req.target:
            raise AlreadyExistsError(f"target snapshot {req.target} already exists")
        return True

    def _ensure_device(self, snap: Snapshot) -> Snapshot:
        """Attach the lazyfs image under *snap*, give it a loop device and (overlay mode) mount it.

        Idempotent: what is already there is kept (this is also how a restart finds its devices).
        """
        base = self._lazy_base(snap)
        name = self.devices.name(snap.id)
        image = image_for(base.extra)
        block = snap.backend == BLOCK
        attached = self.devices.attach(name, image, self.layer_dir(snap) if block else None)
        switched = None if block else self.devices.switchable_device(name)  # made before a restart
        loop = snap.extra.get("loop") if switched else self.devices.loop_for(name, snap.extra.get("loop"),
                                                                             read_only=not block)
        if not block:
            # read-only: through a device the daemon can move onto the hydrated file (where there is device-mapper)
            dev = switched or self.devices.make_switchable(name, loop, attached["size"])
            self.devices.mount_ro(dev, self.mount_dir(snap))
        extra = {**snap.extra, "attach": name, "image": image, "loop": loop, "manifest": attached.get("manifest")}
        if extra != snap.extra:
            snap = self.store.set_extra(snap.id, extra)
            log.info("snapshot %s (#%d): %s%s on %s%s", snap.key, snap.id, image,
                     f" (ordinary image {base.extra['source']} via {attached['via']})" if attached.get("via") else "",
                     loop, "" if block else f", mounted at {self.mount_dir(snap)}")
        return snap

    def _release_device(self, snap: Snapshot) -> list[str]:
        return self.devices.teardown(self.devices.name(snap.id), self.mount_dir(snap))

    def _forget(self, snap: Snapshot) -> None:
        """Undo a half-made snapshot: row, device, directories."""
        with contextlib.suppress(LazyfsError):  # the row may never have been written
            self.store.remove(snap.key)
        for problem in self._release_device(snap):
            log.warning("undoing %s: %s", snap.key, problem)
        remove_tree(self.snapshot_dir(snap))

    def commit(self, name: str, key: str, labels: dict) -> Snapshot:
        with self.devices_locks.hold(self.store.get(key).id):
            with self.lock:
                snap = self.store.get(key)
                if snap.kind != ACTIVE:
                    raise BusyError(f"snapshot {key} is {snap.kind}, not active: only active snapshots can be committed")
                if snap.backend == BLOCK:
                    raise BusyError(f"snapshot {key} keeps its writes in a lazyfs writable layer (block mode), which "
                                    "containerd cannot use as a layer; commit it to an image with `lazyfs commit` instead")
                try:
                    self.store.get(name)
                    raise AlreadyExistsError(f"snapshot {name} already exists")
                except NotFoundError:
                    pass
                usage = disk_usage(self.fs_dir(snap))
                if snap.placement == ON_WRITABLE:
                    target = os.path.join(self.root, "snapshots", str(snap.id))
                    if os.path.lexists(target):  # a copy that a crash cut short
                        remove_tree(target)
                    os.makedirs(target, mode=0o700)
                    move_tree(self.fs_dir(snap), os.path.join(target, "fs"))
                committed = self.store.commit(key, name, labels, usage, ON_CACHE)
                if snap.placement == ON_WRITABLE:
                    remove_tree(self.snapshot_dir(snap))
                else:
                    remove_tree(self.work_dir(snap))
            if self._lazy_base(snap) is not None:
                for problem in self._release_device(snap):
                    log.warning("after committing %s: %s (cleanup retries)", name, problem)
        log.info("committed %s as %s (#%d, %d bytes, %d inodes)", key, name, snap.id, *usage)
        return committed

    def remove(self, key: str) -> None:
        with self.devices_locks.hold(self.store.get(key).id):
            with self.lock:
                snap = self.store.remove(key)
            if snap.kind != COMMITTED and self._has_device(snap):
                for problem in self._release_device(snap):
                    log.warning("removing %s: %s (cleanup retries)", key, problem)
            if snap.backend != LAZYFS:
                try:
                    remove_tree(self.snapshot_dir(snap))
                except (OSError, LazyfsError) as exc:
                    log.warning("removing %s: %s (cleanup retries)", self.snapshot_dir(snap), exc)
        log.info("removed %s (#%d)", key, snap.id)

    def _has_device(self, snap: Snapshot) -> bool:
        return "attach" in snap.extra or snap.backend == BLOCK or os.path.lexists(self.mount_dir(snap))

    def update(self, key: str, labels: dict, fieldpaths: Sequence[str]) -> Snapshot:
        with self.lock:
            snap = self.store.get(key)
            if not fieldpaths:
                new = dict(labels)
            else:
                new = dict(snap.labels)
                for path in fieldpaths:
                    if path == "labels":
                        new = dict(labels)
                    elif path.startswith("labels."):
                        label = path[len("labels."):]
                        if label in labels:
                            new[label] = labels[label]
                        else:
                            new.pop(label, None)
                    else:
                        raise ConfigError(f"cannot update {path!r} of snapshot {key}: only labels can change")
            return self.store.set_labels(key, new)

    # ------------------------------------------------------------ upkeep

    def recover(self) -> list[str]:
        """After a restart: make sure every live snapshot on a lazyfs image has its device again."""
        problems = []
        for snap in self.store.all():
            if snap.kind != COMMITTED and self._lazy_base(snap) is not None:
                try:
                    with self.devices_locks.hold(snap.id):
                        self._ensure_device(self.store.by_id(snap.id))
                except LazyfsError as exc:
                    problems.append(f"snapshot {snap.key}: {exc}")
                    log.error("could not restore the device of snapshot %s: %s", snap.key, exc)
        return problems

    def cleanup(self) -> list[str]:
        """Remove what no snapshot references: directories, mounts, loop devices, attachments, image metadata.

        Rows and directories are decided under the table lock; devices are torn down one by one
        under their own lock (after checking again that no snapshot took them meanwhile), so a
        slow daemon holds up no other call.
        """
        removed = []
        with self.lock:
            snaps = self.store.all()
            wanted_dirs = {self.snapshot_dir(s) for s in snaps if s.backend != LAZYFS}
            live = {s.id for s in snaps if s.kind != COMMITTED and self._lazy_base(s) is not None}
            for base in (os.path.join(self.root, "snapshots"), os.path.join(self.writable_root, "snapshots")):
                for entry in sorted(os.listdir(base)):
                    path = os.path.join(base, entry)
                    if path not in wanted_dirs:
                        remove_tree(path)
                        removed.append(path)
            mnt = os.path.join(self.root, "mnt")
            ids = {int(e) for e in os.listdir(mnt) if e.isdigit()}
        names = set(self.devices.attachments())  # asks the daemon: no lock held
        ids |= {i for i in map(self.devices.snapshot_id, names) if i is not None}
        export = self.config.export_dir
        for entry in os.listdir("/sys/block") if os.path.isdir("/sys/block") else []:
            backing = _backing_file(entry)
            if backing and backing.startswith(export + os.sep):
                sid = self.devices.snapshot_id(os.path.basename(os.path.dirname(backing)))
                if sid is not None:
                    ids.add(sid)
        for sid in sorted(ids - live):
            with self.devices_locks.hold(sid):
                with self.lock:
                    try:
                        now = self.store.by_id(sid)
                    except NotFoundError:
                        now = None
                    if now is not None and now.kind != COMMITTED and self._lazy_base(now) is not None:
                        continue  # made since the table was read: its device is wanted
                name = self.devices.name(sid)
                problems = self.devices.teardown(name, os.path.join(mnt, str(sid)))
            removed.append(f"device of snapshot #{sid}")
            for problem in problems:
                log.warning("cleanup of %s: %s", name, problem)
        with self.lock:
            if self._lookups:  # a lookup in flight may be pulling metadata that no row names yet
                log.info("cleanup: image metadata kept while %d remote-layer lookup(s) run", self._lookups)
            else:
                layouts = {os.path.abspath(s.extra["layout"]) for s in self.store.all() if s.backend == LAZYFS}
                images = os.path.join(self.root, "images")
                for entry in sorted(os.listdir(images)):
                    path = os.path.join(images, entry)
                    if path not in layouts:
                        remove_tree(path)
                        removed.append(path)
        if removed:
            log.info("cleanup removed %d unreferenced item(s): %s", len(removed), ", ".join(removed))
        return removed


def is_unpack(key: str, labels: dict) -> bool:
    """Whether an active snapshot is where containerd unpacks a layer (it is committed right after).

    containerd's unpacker labels it with the chain id it will be committed as; ``ctr image
    pull``'s applier does not, but names it ``extract-UNIQUE CHAINID`` (behind containerd's
    ``NAMESPACE/SEQUENCE/`` prefix).
    """
    if LABEL_SNAPSHOT_REF in labels:
        return True
    parts = key.split("/", 2)
    return (parts[2] if len(parts) == 3 else key).startswith("extract-")


def _backing_file(block: str) -> str | None:
    if not block.startswith("loop"):
        return None
    try:
        with open(f"/sys/block/{block}/loop/backing_file") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None
