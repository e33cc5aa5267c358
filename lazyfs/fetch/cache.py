"""The host-wide chunk cache: a memory LRU over a bounded, content-addressed disk directory.

Entries are keyed by chunk digest only, so every image on a host shares them
(dedup across images). On disk an entry is the file ``root/<2 hex>/<62 hex>``
holding the chunk's **raw** (decompressed) bytes. Raw rather than the stored
zstd frame because:

* a hit is served with no decompression, and verifying it is exactly one
  blake3 over the file — the very hash that names it (a compressed entry would
  need decompress *and* hash on every read to be verified);
* the cache root is meant to be big, cheap disk (docs/design.md §1, read/write
  splitting), so trading disk space for CPU on the hot path is the right way round.

Contracts:

* Every disk read is verified against the file name; a damaged, truncated or
  unreadable entry is deleted and reported as a miss — never served.
* Writes are atomic (temp file in the same directory, then rename). They are
  not fsynced by default: a torn entry after a crash fails verification and is
  simply refetched, so durability buys nothing here (``fsync=True`` if wanted).
* The disk tier holds at most ``max_bytes`` of entries, evicting least recently
  used first, except entries ``protected`` says to keep (then it may stay over).
  Access order lives in memory and is persisted as file mtimes, touched at most
  once per entry per ``TOUCH_EPOCH`` seconds (not an inode write per hit), so it
  is rebuilt at start, to that grain, and entries survive restarts.
* ``put``/``admit`` take bytes the caller has already verified (the scheduler
  does); the memory tier trusts them, the disk tier re-verifies on every read.
* Disk I/O and hashing run in worker threads; the index is only touched on the
  trio thread.
* ``watch`` callbacks hear every change of ``digest in cache`` (in either tier or
  pending), so per-image counters (hydration progress) stay O(1) to read.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path

import blake3
import trio

from lazyfs.durable import TMP_PREFIX, write_atomically
from lazyfs.errors import ConfigError, StorageError
from lazyfs.format.chunk import MAX_CHUNK_SIZE

__all__ = ["ChunkCache"]

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")
_DAMAGED = object()  # sentinel result of a disk read: entry was bad and has been deleted
TOUCH_EPOCH = 60.0  # seconds: an entry's file time is refreshed at most once per epoch


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and set(name) <= _HEX


class ChunkCache:
    """Verified raw chunks by blake3 digest: memory LRU (``memory_bytes``) over disk (``max_bytes``).

    ``root=None`` gives a memory-only cache. Constructing scans *root*
    synchronously (use ``await ChunkCache.load(...)`` from trio code to do that
    in a thread).
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        max_bytes: int,
        memory_bytes: int = 64 << 20,
        *,
        fsync: bool = False,
        io_threads: int = 4,
    ) -> None:
        if max_bytes < 0 or memory_bytes < 0:
            raise ConfigError(f"cache sizes must not be negative (max_bytes={max_bytes}, memory_bytes={memory_bytes})")
        self.root = None if root is None else Path(root)
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.fsync = fsync
        self._io_threads = io_threads
        self._limiter: trio.CapacityLimiter | None = None
        self._mem: OrderedDict[bytes, bytes] = OrderedDict()
        self._mem_size = 0
        self._pending: dict[bytes, bytes] = {}  # admitted, disk write not finished: still served
        self._disk: OrderedDict[bytes, int] = OrderedDict()  # digest -> size, least recent first
        self._disk_size = 0
        # Entries eviction skips (the chunks of hydrated images: docs/daemon.md, "Offline life").
        self.protected: Callable[[bytes], bool] | None = None
        self._doomed: list[Path] = []  # evicted by written(), unlinked by remove_evicted()
        self._watchers: list[Callable[[bytes, bool], None]] = []
        self._touched: set[bytes] = set()  # entries whose file time was refreshed this epoch
        self._epoch_started = time.monotonic()
        self._stats = dict.fromkeys(
            ("memory_hits", "disk_hits", "misses", "evictions", "damaged", "writes", "bytes_written", "write_errors"), 0
        )
        if self.root is not None:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)  # chunks of private images: the cache's user alone (docs/trust.md)
            self._scan()

    @classmethod
    async def load(cls, root: str | os.PathLike | None, max_bytes: int, memory_bytes: int = 64 << 20, **kw) -> "ChunkCache":
        """Construct (scanning *root*) in a worker thread."""
        return await trio.to_thread.run_sync(lambda: cls(root, max_bytes, memory_bytes, **kw))

    # ------------------------------------------------------------ startup

    def _scan(self) -> None:
        """Rebuild the disk index from the files, oldest access first; drop temp files and junk."""
        found: list[tuple[float, bytes, int]] = []
        for sub in os.scandir(self.root):
            if not (sub.is_dir(follow_symlinks=False) and _is_hex(sub.name, 2)):
                continue
            if sub.stat(follow_symlinks=False).st_mode & 0o077:
                os.chmod(sub.path, 0o700)  # made readable by an older lazyfs
            for entry in os.scandir(sub.path):
                if entry.name.startswith(TMP_PREFIX):
                    _unlink(entry.path)  # an interrupted write
                    continue
                if not _is_hex(entry.name, 62) or not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_mode & 0o077:
                    os.chmod(entry.path, 0o600)
                if st.st_size == 0 or st.st_size > MAX_CHUNK_SIZE:
                    _unlink(entry.path)
                    self._stats["damaged"] += 1
                    continue
                found.append((max(st.st_atime, st.st_mtime), bytes.fromhex(sub.name + entry.name), st.st_size))
        found.sort()
        for _, digest, size in found:
            self._disk[digest] = size
            self._disk_size += size
        for digest, path in self._evict_over_budget():
            _unlink(path)

    # ------------------------------------------------------------ change notifications

    def watch(self, callback: Callable[[bytes, bool], None]) -> Callable[[], None]:
        """Call ``callback(digest, present)`` on the trio thread whenever ``digest in self`` changes
        (not for what is there when watching starts); returns the function that stops it."""
        self._watchers.append(callback)

        def unwatch() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return unwatch

    def _changed(self, digest: bytes, was: bool) -> None:
        """Tell the watchers if *digest*'s presence is no longer *was*."""
        if self._watchers and (digest in self) != was:
            for callback in tuple(self._watchers):
                callback(digest, not was)

    # ------------------------------------------------------------ lookups

    def path_of(self, digest: bytes) -> Path:
        if self.root is None:
            raise ConfigError("memory-only chunk cache has no paths")
        h = digest.hex()
        return self.root / h[:2] / h[2:]

    def get_memory(self, digest: bytes) -> bytes | None:
        """The chunk if it is in memory (or being written to disk); counts a memory hit, never a miss."""
        raw = self._mem.get(digest)
        if raw is not None:
            self._mem.move_to_end(digest)
        else:
            raw = self._pending.get(digest)
        if raw is not None:
            self._stats["memory_hits"] += 1
        return raw

    def on_disk(self, digest: bytes) -> bool:
        """Whether the disk index lists *digest* (it is still verified when read)."""
        return digest in self._disk

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._mem or digest in self._pending or digest in self._disk

    async def get(self, digest: bytes) -> bytes | None:
        """The verified chunk from memory, else from disk (promoted to memory), else None."""
        raw = self.get_memory(digest)
        if raw is not None:
            return raw
        raw = await self.get_disk(digest)
        if raw is None:
            self._stats["misses"] += 1
        return raw

    def record_miss(self) -> None:
        """Count a miss found by a caller that looked up with get_memory/on_disk/get_disk."""
        self._stats["misses"] += 1

    async def get_disk(self, digest: bytes) -> bytes | None:
        """Read and verify the disk entry of *digest*; on success promote it to memory.

        A damaged entry is deleted and None returned. Does not count a miss
        (callers that then fetch decide what a miss is).
        """
        if self.root is None or digest not in self._disk:
            return None
        path = self.path_of(digest)
        now = time.monotonic()
        if now - self._epoch_started >= TOUCH_EPOCH:
            self._touched.clear()
            self._epoch_started = now
        touch = digest not in self._touched
        result = await trio.to_thread.run_sync(_read_verified, path, digest, touch, limiter=self._io_limiter())
        if result is None:  # vanished (evicted meanwhile)
            self._forget(digest)
            return None
        if result is _DAMAGED:
            log.warning("chunk cache: damaged entry %s deleted", path)
            self._stats["damaged"] += 1
            self._forget(digest)
            return None
        if digest in self._disk:
            self._disk.move_to_end(digest)
        self._touched.add(digest)
        self._stats["disk_hits"] += 1
        self._remember(digest, result)
        return result

    # ------------------------------------------------------------ inserts

    def admit(self, digest: bytes, raw: bytes, *, memory: bool = True, disk: bool = True) -> None:
        """Make a verified chunk servable now; ``write_pending`` later persists it.

        With ``memory=False`` (background download) the memory tier is left
        alone, so bulk downloads do not flush the hot set; the chunk is served
        from the pending table until it is on disk. With ``disk=False`` no chunk
        file is written (the chunk went to the flat layer files instead).
        """
        was = digest in self
        if memory or self.root is None:
            self._remember(digest, raw)
        if disk and self.root is not None and digest not in self._disk and 0 < len(raw) <= self.max_bytes:
            self._pending[digest] = raw
        self._changed(digest, was)

    async def write_pending(self, digest: bytes) -> None:
        """Persist an admitted chunk to disk (no-op if it is not pending). Never raises for I/O errors."""
        raw = self._pending.get(digest)
        if raw is None:
            return
        try:
            if digest in self._disk:
                return
            path = self.path_of(digest)
            try:
                await trio.to_thread.run_sync(_write_entry, path, raw, self.fsync, limiter=self._io_limiter())
            except (OSError, StorageError) as exc:
                self._stats["write_errors"] += 1
                log.warning("chunk cache: cannot write %s: %s", path, exc)
                return
            self._stats["writes"] += 1
            self._stats["bytes_written"] += len(raw)
            if digest not in self._disk:
                self._disk[digest] = len(raw)
                self._disk_size += len(raw)
            victims = self._evict_over_budget(keep=digest)
        finally:
            if self._pending.get(digest) is raw:
                del self._pending[digest]
                self._changed(digest, True)  # gone if the write failed and memory does not hold it
        if victims:
            await trio.to_thread.run_sync(_unlink_all, [p for _, p in victims], limiter=self._io_limiter())

    # ---- write-back inside a fetch job's worker (one thread hop per coalesced read)

    def wants_write(self, digest: bytes, size: int) -> bool:
        """Whether a freshly verified chunk of *size* bytes should be written to disk (trio thread)."""
        return self.root is not None and digest not in self._disk and digest not in self._pending and 0 < size <= self.max_bytes

    def writer(self, digests: Collection[bytes]):
        """A function for a worker thread: ``write(digest, raw)`` persists a verified chunk if it is one
        of *digests* and returns True, the OSError or StorageError, or None (not asked). The index is not touched there:
        report each result with :meth:`written` on the trio thread."""
        wanted = frozenset(digests)
        fsync = self.fsync

        def write(digest: bytes, raw: bytes):
            if digest not in wanted:
                return None
            path = self.path_of(digest)
            try:
                _write_entry(path, raw, fsync)
            except (OSError, StorageError) as exc:
                return exc
            return True

        return write

    def written(self, digest: bytes, size: int, result) -> None:
        """Record on the trio thread what a :meth:`writer` did for *digest* (evictions are queued)."""
        if result is None:
            return
        if isinstance(result, (OSError, StorageError)):
            self._stats["write_errors"] += 1
            log.warning("chunk cache: cannot write %s: %s", self.path_of(digest), result)
            return
        self._stats["writes"] += 1
        self._stats["bytes_written"] += size
        if digest not in self._disk:
            was = digest in self
            self._disk[digest] = size
            self._disk_size += size
            self._changed(digest, was)
        self._doomed.extend(p for _, p in self._evict_over_budget(keep=digest))

    async def remove_evicted(self) -> None:
        """Unlink the entries :meth:`written` evicted (in a worker thread)."""
        if self._doomed:
            doomed, self._doomed = self._doomed, []
            await trio.to_thread.run_sync(_unlink_all, doomed, limiter=self._io_limiter())

    async def put(self, digest: bytes, raw: bytes, *, memory: bool = True) -> None:
        """Store a verified chunk in memory (unless ``memory=False``) and on disk."""
        self.admit(digest, raw, memory=memory)
        await self.write_pending(digest)

    def _remember(self, digest: bytes, raw: bytes) -> None:
        if len(raw) > self.memory_bytes:
            return
        old = self._mem.pop(digest, None)
        if old is not None:
            self._mem_size -= len(old)
        self._mem[digest] = raw
        self._mem_size += len(raw)
        while self._mem_size > self.memory_bytes:
            gone, dropped = self._mem.popitem(last=False)
            self._mem_size -= len(dropped)
            self._changed(gone, True)

    def _forget(self, digest: bytes) -> None:
        size = self._disk.pop(digest, None)
        if size is not None:
            self._disk_size -= size
            self._changed(digest, True)

    def _evict_over_budget(self, keep: bytes | None = None) -> list[tuple[bytes, Path]]:
        """Drop least recently used disk entries until within max_bytes; return what to unlink."""
        victims = []
        spared = 0  # entries passed over: one lap at most, so a cache of protected entries stays over budget
        while self._disk_size > self.max_bytes and self._disk and spared < len(self._disk):
            digest = next(iter(self._disk))
            if digest == keep or (self.protected is not None and self.protected(digest)):
                self._disk.move_to_end(digest)
                spared += 1
                continue
            self._forget(digest)
            self._stats["evictions"] += 1
            victims.append((digest, self.path_of(digest)))
        return victims

    def _io_limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self._io_threads)
        return self._limiter

    # ------------------------------------------------------------ misc

    def statistics(self) -> dict:
        return {
            "memory_entries": len(self._mem),
            "memory_bytes": self._mem_size,
            "pending_writes": len(self._pending),
            "entries": len(self._disk),
            "bytes": self._disk_size,
            "max_bytes": self.max_bytes,
            "hits": self._stats["memory_hits"] + self._stats["disk_hits"],
            **self._stats,
        }

    async def aclose(self) -> None:
        """Nothing to release: no file stays open between calls."""


# ---------------------------------------------------------------- worker-thread helpers


def _read_verified(path: Path, digest: bytes, touch: bool = True):
    """Raw bytes if the file hashes to *digest*; None if absent; _DAMAGED (file deleted) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        _unlink(path)
        return _DAMAGED
    try:
        size = os.fstat(fd).st_size
        if size == 0 or size > MAX_CHUNK_SIZE:
            data = b""
        else:
            data = os.pread(fd, size, 0)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    if not data or blake3.blake3(data).digest() != digest:
        _unlink(path)
        return _DAMAGED
    if touch:
        try:
            os.utime(path)  # persist the access order for the next start
        except OSError:  # best effort: the entry was verified; only its eviction order suffers
            pass
    return data


def _write_entry(path: Path, data: bytes, fsync: bool) -> None:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    # durable=False unless configured: a torn entry fails verification and is fetched again
    write_atomically(path, data, durable=fsync)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("chunk cache: cannot remove %s: %s", path, exc)


def _unlink_all(paths) -> None:
    for p in paths:
        _unlink(p)
