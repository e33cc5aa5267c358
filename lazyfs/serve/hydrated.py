"""Hydrated images: the merged read-only disk of a fully local image as one local file.

Once every chunk of a read-only image is in the disk cache, its merged disk is written out
once as ``cache_root/hydrated/<manifest hex>.img`` (mode 0600, fsynced, renamed into place,
directory fsynced). New ``lazyfs mount``s of that image then attach their loop device to that
file: reads never reach FUSE or Python. docs/warm.md says why and what it costs.

The file is built from verified chunks only (the scheduler verifies every chunk it serves),
and it appears under its final name only when complete and durable, so a crash leaves at
most a ``.tmp`` file, which the next build removes. The name is the image's manifest digest:
a tag that moves names another manifest, hence another file.

``missing_chunks`` / ``is_fully_local`` are the small, side-effect-free checks other code
(hydration, statistics) can call. Where the files live, and whether a complete one is there, is
``hydratedfiles`` (no trio: ``lazyfs mount`` asks it before it attaches a loop device).
"""

from __future__ import annotations

import logging
import os
import weakref

import trio

from lazyfs.durable import makedirs_durable, pwrite_all, replace_durably, storage_error
from lazyfs.errors import ConfigError, LazyfsError, NotFoundError
from lazyfs.serve.hydratedfiles import Hydrated, directory, existing, path_for

log = logging.getLogger(__name__)

_WRITE_BATCH = 4 << 20  # bytes buffered before one pwrite: bounds memory, amortises thread hops
_TMP_SUFFIX = ".tmp"
_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # host -> manifest -> lock of its build


def missing_chunks(device, cache) -> int:
    """How many distinct chunks of *device* are on neither tier of *cache* nor wholly in the device's
    flat layer files (0: fully local)."""
    held = _held_by_block_cache(device)
    return sum(1 for loc in device.index.locations() if loc.digest not in cache and loc.digest not in held)


def _held_by_block_cache(device) -> set[bytes]:
    """The chunk digests every segment of which the device's block cache (flat layer files) holds:
    the fetch path writes a chunk there instead of a chunk file (docs/cache.md)."""
    bc = getattr(device, "block_cache", None)
    if bc is None:
        return set()
    held: dict[bytes, bool] = {}
    for seg in device.index.segments:
        if seg.loc is not None:
            held[seg.loc.digest] = held.get(seg.loc.digest, True) and bc.holds(seg)
    return {d for d, ok in held.items() if ok}


def is_fully_local(device, cache) -> bool:
    """Whether every chunk *device* (a read-only MergedDevice) can read is on this host: on the
    cache's disk, or in memory (perhaps still being written to disk)."""
    # short-circuits at the first missing chunk: cheap enough to poll
    if not device.read_only:
        return False
    bc = getattr(device, "block_cache", None)
    return all(_segment_local(seg, cache, bc) for seg in device.index.segments)


def _segment_local(seg, cache, bc) -> bool:
    if seg.loc is None:  # mapped tar bytes (an indexed ordinary image): its spans, cached like chunks
        return all(loc.digest in cache for loc in seg.locations())
    return seg.loc.digest in cache or (bc is not None and bc.holds(seg))


def bytes_used(cache_root: str) -> int:
    """Disk taken by the hydrated files (allocated blocks: the files are sparse)."""
    total = 0
    try:
        with os.scandir(directory(cache_root)) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    except FileNotFoundError:
        return 0
    return total


async def build(device, store, cache_root: str, manifest: str) -> Hydrated:
    """Write read-only *device*'s merged disk to its hydrated file and return it.

    Chunks come from *store* at background priority (verified by the scheduler; fetched
    if the cache lost one meanwhile). Blocks no chunk covers stay holes. The file is
    complete and durable before it gets its name. StorageError on a disk error.
    """
    from lazyfs.device.chunks import Priority  # not at the top: `lazyfs mount` imports this module
    if not device.read_only:
        raise LazyfsError("only a read-only image can be hydrated into a file")
    final = path_for(cache_root, manifest)
    tmp = final + _TMP_SUFFIX
    bs = device.block_size
    await trio.to_thread.run_sync(_make_directory, directory(cache_root))
    try:
        fd = await trio.to_thread.run_sync(_create, tmp, device.size)
    except OSError as exc:
        raise storage_error(f"creating {tmp}", exc) from exc
    try:
        batch = bytearray()
        batch_at = 0  # virtual offset of batch[0]
        last: tuple[bytes, bytes] | None = None  # (digest, raw): consecutive segments share chunks
        bc = getattr(device, "block_cache", None)
        for seg in device.index.segments:
            start, end = seg.start * bs, seg.end * bs
            # Through the device, in pieces: a segment the flat layer file holds (maybe not as a
            # chunk; a verified read), and a mapped one (tar bytes of an indexed ordinary image: no
            # chunk of its own, the device joins its spans). Otherwise the segment's chunk.
            through_device = seg.loc is None or (bc is not None and bc.holds(seg))
            for at in range(start, end, _WRITE_BATCH) if through_device else (start,):
                if through_device:
                    data = await device.read(at, min(_WRITE_BATCH, end - at))
                else:
                    if last is None or last[0] != seg.loc.digest:
                        last = (seg.loc.digest, await store.get(seg.loc, Priority.BACKGROUND))
                    raw = last[1]
                    data = memoryview(raw)[seg.chunk_block * bs : (seg.chunk_block + seg.end - seg.start) * bs]
                if batch and (at != batch_at + len(batch) or len(batch) >= _WRITE_BATCH):
                    await trio.to_thread.run_sync(pwrite_all, fd, bytes(batch), batch_at)
                    batch.clear()
                if not batch:
                    batch_at = at
                batch += data
        if batch:
            await trio.to_thread.run_sync(pwrite_all, fd, bytes(batch), batch_at)
        await trio.to_thread.run_sync(os.fsync, fd)
    except OSError as exc:
        await trio.to_thread.run_sync(_discard, fd, tmp)
        raise storage_error(f"writing {tmp}", exc) from exc
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_discard, fd, tmp)
        raise
    try:
        await trio.to_thread.run_sync(_publish, fd, tmp, final)
    except OSError as exc:
        raise storage_error(f"publishing {final}", exc) from exc
    log.info("audit: hydrated %s into %s (%d bytes)", manifest, final, device.size)
    return Hydrated(final, device.size, manifest)


def _make_directory(path: str) -> None:
    makedirs_durable(path)
    os.chmod(path, 0o700)  # whole images of private registries: the cache's user alone (docs/trust.md)


def _create(tmp: str, size: int) -> int:
    try:
        os.unlink(tmp)  # a crashed build's leftover
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.ftruncate(fd, size)  # sparse: holes read as zeros, as on the merged device
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd


def _discard(fd: int, tmp: str) -> None:
    os.close(fd)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _publish(fd: int, tmp: str, final: str) -> None:
    os.close(fd)
    replace_durably(tmp, final)  # StorageError (with the errno) if the rename or its sync fails


async def hydrate_if_local(host, att) -> Hydrated | None:
    """The hydrated file of attachment *att*, built now if its image is fully local and the
    budget (``hydrated_max_bytes``) has room; None if not (yet) possible.

    Concurrent calls for one image build it once (the host's per-manifest lock).
    """
    config = host.config
    if not att.device.read_only or config.hydrated_max_bytes <= 0:
        return None
    manifest = att.opened.image.manifest.digest
    found = await trio.to_thread.run_sync(existing, config.cache_root, manifest, att.device.size)
    if found is not None or not is_fully_local(att.device, host.cache):
        return found
    locks = _locks.setdefault(host, {})
    lock = locks.setdefault(manifest, trio.Lock())
    try:
        async with lock:
            found = await trio.to_thread.run_sync(existing, config.cache_root, manifest, att.device.size)
            if found is not None:
                return found
            used = await trio.to_thread.run_sync(bytes_used, config.cache_root)
            if used + att.device.size > config.hydrated_max_bytes:
                log.info("not hydrating %s: %d bytes of hydrated files, limit %d", att.ref, used,
                         config.hydrated_max_bytes)
                return None
            return await build(att.device, att.store, config.cache_root, manifest)
    finally:
        # dropped once nobody holds or waits for it: the map is bounded by builds in progress
        if not lock.locked() and not lock.statistics().tasks_waiting and locks.get(manifest) is lock:
            del locks[manifest]


async def control(host, name: object) -> dict:
    """The ``hydrate-file`` control operation: hydrate attachment *name* now if it is fully local.

    Returns ``{"path", "size", "manifest"}``, or ``{"missing_chunks": N}`` while chunks are
    missing (or ``{"path": None, ...}`` when the budget or a writable image rules it out).
    """
    att = host.attachments.get(name) if isinstance(name, str) else None
    if att is None:
        raise NotFoundError(f"no image attached as {name!r}")
    if not att.device.read_only:
        raise ConfigError(f"{name} is attached writable: only read-only images are hydrated into a file")
    missing = missing_chunks(att.device, host.cache)
    if missing:
        return {"path": None, "missing_chunks": missing}
    found = await hydrate_if_local(host, att)
    if found is None:
        return {"path": None, "missing_chunks": 0, "limit": host.config.hydrated_max_bytes}
    return {"path": found.path, "size": found.size, "manifest": found.manifest}


async def check_once(host, done: set[str]) -> list[Hydrated]:
    """One pass of the daemon's check: hydrate every read-only attachment that became fully
    local, skipping manifests in *done* (added to it once hydrated). What it built or found;
    errors (bugs included) are logged, never raised."""
    found = []
    for att in list(host.attachments.values()):
        if host.attachments.get(att.name) is not att:
            continue  # detached while an earlier one was checked
        manifest = att.opened.image.manifest.digest
        if manifest in done or not att.device.read_only:
            continue
        scope = trio.CancelScope()
        att.tasks.add(scope)  # a detach cancels the check and build of its image (the device closes)
        try:
            with scope:
                hyd = await hydrate_if_local(host, att)
        except LazyfsError as exc:
            log.warning("could not hydrate %s: %s", att.ref, exc)
            continue
        except Exception:  # a bug: logged, and the daemon (whose nursery runs this) lives on
            log.exception("unexpected error checking %s for a hydrated file", att.ref)
            continue
        finally:
            att.tasks.discard(scope)
        if scope.cancelled_caught:
            continue
        if hyd is not None:
            done.add(manifest)
            found.append(hyd)
    return found


async def watch(host, interval: float, after_check=None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Every *interval* seconds, ``check_once``: hydrate each read-only attachment whose image
    became fully local (by background download, trace replay, ``lazyfs mount --hydrate``, or
    plain use), then await *after_check()* if given (the daemon passes exports through to
    their hydrated files there). Runs until cancelled."""
    task_status.started()
    done: set[str] = set()
    while True:
        await trio.sleep(interval)
        await check_once(host, done)
        if after_check is not None:
            await after_check()


__all__ = ["Hydrated", "build", "bytes_used", "check_once", "control", "existing", "hydrate_if_local", "is_fully_local", "missing_chunks",
           "path_for", "watch"]
