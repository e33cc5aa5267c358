"""The flat disk cache: one sparse file per read-only layer, at the layer's virtual offsets.

The nydus blobcache idea: a layer's cached blocks sit in ``<root>/<hex>.data``
exactly where they sit in the layer's virtual device, so a disk-cache hit for
a range is one ``preadv`` at the range's offset, of only that range (no chunk
file to open, no whole chunk to read and hash). Which blocks are there, and
what they must hash to, is in the layer's map ``<root>/<hex>.map`` (the
persistent bitmap plus the per-4-KiB hash sidecar; docs/cache.md).

Contracts:

* **Verified once, then protected.** Blocks are written only from chunks the
  fetch path verified (blake3 of the whole chunk): by the fetch scheduler's
  decode worker right after it verified them (``targets``/``write_targets``;
  such a chunk gets no chunk file), or by the device for chunks the chunk
  store served from memory or a chunk file (``LayerFlats.admit``). Each written block's
  blake3 (16 bytes) is computed from those verified bytes. Every read from the
  flat file hashes the blocks it touches and compares (fs-verity is the other
  way to get this and is not used: see docs/cache.md); a mismatch drops the bits
  of the chunk concerned, and the read goes to the chunk store (refetch).
* **Crash safety by ordering.** The map is an append-only log of checksummed
  records. A block's record is appended (and fdatasynced) only after the data
  file was fdatasynced with the block in it, so after a crash the map never
  lists a block whose data did not reach the disk; an unsynced block is simply
  not listed and is fetched again. A torn last record is cut at open.
* **No write per hit.** Reads do not touch metadata: the LRU order of the
  layer files is kept in memory and persisted every ``persist_interval``
  seconds (``<root>/lru``).
* **Bounded.** ``max_bytes`` bounds the blocks held over all layer files;
  over it, whole layer files not in use are removed, least recently used first.
* **No file I/O on the trio thread except non-blocking reads.** Reads try
  ``preadv(..., RWF_NOWAIT)`` inline (the page cache answers) and fall back to a
  worker thread on EAGAIN or a short read; writes, fsyncs and opens run in threads.
* Directories 0700, files 0600 (chunks of private images: docs/trust.md).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import trio

from lazyfs.device.blockcache import BlockCache
from lazyfs.device.index import Segment
from lazyfs.durable import fsync_dir, pwrite_all, write_all, write_atomically
from lazyfs.errors import ConfigError
from lazyfs.fetch.flatmap import GROUP, HASH_LEN, BlockMap, block_hashes, encode_clear, encode_set
from lazyfs.format.layer import ZEROED, LayerMeta

__all__ = ["FlatCache", "FlatFile", "LayerFlats", "write_targets"]

log = logging.getLogger(__name__)

class FlatFile:
    """One layer's data file and map. Reads on the trio thread; writes and persists in workers."""

    def __init__(self, root: Path, key: str, size: int, block_size: int) -> None:
        """Open or create (synchronously: call from a worker thread)."""
        self.key, self.size, self.block_size = key, size, block_size
        self.data_path = root / f"{key}.data"
        self.map_path = root / f"{key}.map"
        self.map = BlockMap(size // block_size, block_size)
        self.users = 0
        self.closed = False
        self._pending: list[bytes] = []  # records waiting for the next persist (trio thread)
        self._lock = threading.Lock()  # one persist at a time
        created = not self.data_path.exists()
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.data_path, flags, 0o600)
        try:
            self.map_fd = os.open(self.map_path, flags | os.O_APPEND, 0o600)
        except BaseException:
            os.close(self.fd)
            raise
        try:
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
            self._load(fresh=created)
            if created:
                fsync_dir(str(root))
        except BaseException:
            self.close()
            raise

    def _load(self, fresh: bool) -> None:
        data = b"" if fresh else _read_all(self.map_fd)  # a new data file: an old map lists nothing in it
        header = self.map.header()
        if data[: len(header)] != header:
            if data:
                log.warning("flat cache: map %s does not match its layer; starting it empty", self.map_path)
            os.ftruncate(self.map_fd, 0)
            write_all(self.map_fd, header)
            os.fdatasync(self.map_fd)
            return
        valid = self.map.replay(data[len(header) :])
        if len(header) + valid < len(data):
            log.warning("flat cache: cut a torn tail of %d bytes from %s", len(data) - len(header) - valid, self.map_path)
            os.ftruncate(self.map_fd, len(header) + valid)

    # ---- trio thread

    def note_written(self, start: int, hashes: bytes) -> None:
        """Blocks from *start* were written with these hashes: serve them now, list them at the next persist."""
        self.map.set(start, hashes)
        self._pending.append(encode_set(start, hashes))

    def drop(self, start: int, count: int) -> None:
        self.map.clear(start, count)
        self._pending.append(encode_clear(start, count))

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def take_pending(self) -> bytes:
        records, self._pending = self._pending, []
        return b"".join(records)

    # ---- worker threads

    def write_blocks(self, items: Sequence[tuple[int, bytes | memoryview]]) -> list[tuple[int, bytes]]:
        """Write verified bytes at their blocks; return ``(start, hashes)`` for each (not yet in the map)."""
        out = []
        for start, data in items:
            pwrite_all(self.fd, data, start * self.block_size)
            out.append((start, block_hashes(data, self.block_size)))
        return out

    def persist(self, records: bytes) -> None:
        """Make the data durable, then append *records* and make them durable: never the other way round."""
        with self._lock:
            os.fdatasync(self.fd)
            if records:
                write_all(self.map_fd, records)  # O_APPEND: at the end
                os.fdatasync(self.map_fd)

    def verify_listed(self) -> list[int]:
        """Every block the map lists whose data does not match its hash (a full check; worker thread)."""
        bad = []
        bs, blocks = self.block_size, self.map.blocks
        for start in range(0, blocks, GROUP):
            end = min(blocks, start + GROUP)
            listed = [b for b in range(start, end) if self.map.has(b)]
            if not listed:
                continue
            data = os.pread(self.fd, (end - start) * bs, start * bs).ljust((end - start) * bs, b"\0")
            for b in listed:
                if block_hashes(data[(b - start) * bs : (b - start + 1) * bs], bs) != self.map.hashes(b, b + 1):
                    bad.append(b)
        return bad

    def close(self) -> None:
        self.closed = True
        for fd in (self.fd, self.map_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def remove(self) -> None:
        self.close()
        for p in (self.map_path, self.data_path):  # the map first: no map, nothing trusted
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


class FlatCache:
    """The host's layer files under *root*: opened on demand, shared by every device using a layer."""

    def __init__(self, root: str | os.PathLike, max_bytes: int, *, persist_interval: float = 5.0) -> None:
        if max_bytes < 0 or persist_interval <= 0:
            raise ConfigError(f"flat cache: max_bytes must not be negative ({max_bytes}), persist_interval positive")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.persist_interval = persist_interval
        self._files: dict[str, FlatFile] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # layer keys, least recently used first
        self._lru_dirty = False
        self.held = 0  # bytes of blocks held, as of the last budget check plus writes since (cheap to read)
        self._opening: dict[str, trio.Event] = {}
        # chunk digest -> (layer file, first block, blocks): a whole chunk held contiguously, so another
        # layer holding the same chunk copies it from there instead of asking the chunk store
        self._where: dict[bytes, tuple[FlatFile, int, int]] = {}
        # the layer files devices have open, with their chunk extents (digest -> (blocks, extents)):
        # where the fetch scheduler writes a fetched chunk instead of a chunk file (see targets())
        self._layers: list[tuple[FlatFile, dict]] = []
        self._watchers: list[Callable[[bytes], None]] = []
        self._stats = dict.fromkeys(
            ("hits", "misses", "blocks_served", "nowait_reads", "thread_reads", "tampered", "writes",
             "bytes_written", "write_errors", "persists", "evictions", "copied_blocks", "reflinked_blocks",
             "copy_errors", "fetch_writes", "fetch_bytes_written"), 0)
        # reads served whole in FUSE worker threads (LayerFlats.read_local_into): counted under a lock,
        # since the trio thread's counters above are not for other threads to touch
        self._local_lock = threading.Lock()
        self._local = dict.fromkeys(("local_hits", "local_blocks", "local_declined"), 0)
        self.native_counter = None  # the reads the FUSE threads' C path answers from these files (set by it)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._load_lru()

    @classmethod
    async def load(cls, root, max_bytes: int, **kw) -> "FlatCache":
        return await trio.to_thread.run_sync(lambda: cls(root, max_bytes, **kw))

    def _load_lru(self) -> None:
        keys = set()
        for entry in os.scandir(self.root):
            if entry.name.startswith("lru.tmp."):
                os.unlink(entry.path)  # an interrupted save of the order
                continue
            if entry.name.endswith(".data") and entry.is_file(follow_symlinks=False):
                keys.add(entry.name[: -len(".data")])
                if entry.stat(follow_symlinks=False).st_mode & 0o077:
                    os.chmod(entry.path, 0o600)
        try:
            order = (self.root / "lru").read_text().split()
        except FileNotFoundError:
            order = []
        for key in order:
            if key in keys:
                self._lru[key] = None
        for key in sorted(keys - set(self._lru)):
            self._lru[key] = None
            self._lru.move_to_end(key, last=False)  # unknown order: oldest

    async def open_layer(self, key: str, size: int, block_size: int) -> FlatFile:
        """The layer file of *key* (a blob digest's hex), opened once and shared; release with :meth:`release`."""
        while key in self._opening:
            await self._opening[key].wait()
        f = self._files.get(key)
        if f is None:
            done = self._opening[key] = trio.Event()
            try:
                f = await trio.to_thread.run_sync(FlatFile, self.root, key, size, block_size)
            finally:
                del self._opening[key]
                done.set()
            if f.size != size or f.block_size != block_size:
                f.close()
                raise ConfigError(f"flat cache: layer {key} opened with two sizes")
            self._files[key] = f
        f.users += 1
        self.touch(key)
        return f

    async def release(self, f: FlatFile) -> None:
        f.users -= 1
        await self.persist(f)
        await self.enforce_budget()

    def watch(self, callback: Callable[[bytes], None]) -> Callable[[], None]:
        """Call *callback(digest)* (trio thread) after blocks of chunk *digest* were written into or
        dropped from a layer file; returns the function that stops it. Files are evicted only when no
        device uses them, so a device's own files change only through these calls while it is open."""
        self._watchers.append(callback)

        def unwatch() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return unwatch

    def changed(self, digests) -> None:
        """Tell the watchers that what the layer files hold of each of *digests* changed."""
        for digest in digests:
            for callback in tuple(self._watchers):
                callback(digest)

    def index_chunk(self, digest: bytes, f: FlatFile, first: int, count: int) -> None:
        self._where.setdefault(digest, (f, first, count))

    def find_chunk(self, digest: bytes, exclude: FlatFile) -> tuple[FlatFile, int, int] | None:
        """A layer file other than *exclude* that holds the whole chunk *digest*, contiguously."""
        where = self._where.get(digest)
        if where is None:
            return None
        f, first, count = where
        if f.closed or not f.map.covered(first, first + count):
            del self._where[digest]
            return None
        return None if f is exclude else where

    # ---- the fetch path writes here instead of a chunk file (one write per fetched block)

    def register(self, f: FlatFile, extents: dict) -> None:
        self._layers.append((f, extents))

    def unregister(self, f: FlatFile, extents: dict) -> None:
        for i, (g, e) in enumerate(self._layers):
            if g is f and e is extents:
                del self._layers[i]
                return

    def targets(self, digest: bytes, size: int) -> list[tuple[FlatFile, list[tuple[int, int, int]]]]:
        """Trio thread: the extents of open layer files that use chunk *digest* (*size* raw bytes) and do
        not hold it yet, per file. Each file returned is held (``users``) until :meth:`release_targets`."""
        out: list[tuple[FlatFile, list[tuple[int, int, int]]]] = []
        for f, extents in self._layers:
            entry = extents.get(digest)
            if entry is None or f.closed or any(g is f for g, _ in out):
                continue
            bs = f.block_size
            todo = [(first, count, cb) for first, count, cb in entry[1]
                    if (cb + count) * bs <= size and not f.map.covered(first, first + count)]
            if todo:
                f.users += 1  # not evicted (its fd closed) while a worker writes into it
                out.append((f, todo))
        return out

    @staticmethod
    def release_targets(targets) -> None:
        for f, _ in targets:
            f.users -= 1

    def holds(self, digest: bytes) -> bool:
        """Whether an open layer file holds chunk *digest* wholly (at every extent of it), so a device
        reading it is served from there (readahead need not fetch it)."""
        if digest in self._where:
            return True
        for f, extents in self._layers:
            entry = extents.get(digest)
            if entry is not None and not f.closed and all(f.map.covered(a, a + n) for a, n, _ in entry[1]):
                return True
        return False

    def committed(self, digest: bytes, results) -> None:
        """Trio thread: record what :func:`write_targets` wrote for chunk *digest*."""
        if isinstance(results, OSError):
            self._stats["write_errors"] += 1
            log.warning("flat cache: cannot write chunk %s: %s", digest.hex()[:16], results)
            return
        for f, first, count, chunk_block, blocks, hashes in results:
            if f.closed:
                continue
            f.note_written(first, hashes)
            if chunk_block == 0 and count == blocks:
                self.index_chunk(digest, f, first, count)
            self._stats["fetch_writes"] += 1
            self._stats["fetch_bytes_written"] += count * f.block_size
            self._stats["writes"] += 1
            self._stats["bytes_written"] += count * f.block_size
            self.held += count * f.block_size
        self.changed((digest,))

    def touch(self, key: str) -> None:
        self._lru[key] = None
        self._lru.move_to_end(key)
        self._lru_dirty = True

    async def held_bytes(self) -> int:
        """Bytes held: counted from the maps of open files, from the allocated size of the others."""
        closed = [key for key in self._lru if key not in self._files]
        return sum(f.map.count * f.block_size for f in self._files.values()) + await trio.to_thread.run_sync(
            _allocated, self.root, closed)

    async def persist(self, f: FlatFile) -> None:
        """Data fdatasync, then the map records written since the last persist (worker thread)."""
        if not f.dirty:
            return
        records = f.take_pending()
        try:
            await trio.to_thread.run_sync(f.persist, records)
        except OSError as exc:
            # The data may not be on disk: its records are not written, and blocks written
            # since are not trusted after a restart (the in-memory map still serves this run).
            self._stats["write_errors"] += 1
            log.warning("flat cache: cannot persist %s: %s", f.key, exc)
            return
        self._stats["persists"] += 1

    async def persist_all(self) -> None:
        for f in list(self._files.values()):
            await self.persist(f)
        if self._lru_dirty:
            self._lru_dirty = False
            text = "\n".join(self._lru) + "\n"
            try:
                await trio.to_thread.run_sync(write_atomically, str(self.root / "lru"), text.encode())
            except Exception as exc:  # the order is a hint: losing it costs eviction quality only
                log.warning("flat cache: cannot save the LRU order: %s", exc)

    async def enforce_budget(self) -> None:
        """Remove whole layer files nobody uses, least recently used first, while over max_bytes."""
        held = await self.held_bytes()
        try:
            held = await self._evict_down_to_budget(held)
        finally:
            self.held = held

    async def _evict_down_to_budget(self, held: int) -> int:
        for key in list(self._lru):
            if held <= self.max_bytes:
                break
            f = self._files.get(key)
            if f is not None and f.users:
                continue
            if f is not None:
                del self._files[key]
                held -= f.map.count * f.block_size
                await trio.to_thread.run_sync(f.remove)
            else:
                path = self.root / f"{key}.data"
                try:
                    held -= os.stat(path).st_blocks * 512
                except FileNotFoundError:
                    pass
                await trio.to_thread.run_sync(_remove_pair, self.root, key)
            del self._lru[key]
            self._lru_dirty = True
            self._stats["evictions"] += 1
        return held

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Persist maps and the LRU order every persist_interval seconds, and keep to the budget."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.persist_interval)
                await self.persist_all()
                await self.enforce_budget()
        finally:
            with trio.CancelScope(shield=True):
                await self.persist_all()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.persist_all()
            for f in self._files.values():
                f.close()
            self._files.clear()

    def count_local(self, served: bool, blocks: int) -> None:
        """Any thread: one read_local_into served (*blocks* blocks) or declined."""
        with self._local_lock:
            if served:
                self._local["local_hits"] += 1
                self._local["local_blocks"] += blocks
            else:
                self._local["local_declined"] += 1

    def statistics(self) -> dict:
        with self._local_lock:
            local = dict(self._local)
        native = self.native_counter
        if native is not None:  # reads the FUSE threads answered in C from these files
            local["local_hits"] += native.reads
            local["local_blocks"] += native.blocks
        return {**self._stats, **local, "layers": len(self._files),
                "blocks": sum(f.map.count for f in self._files.values()), "max_bytes": self.max_bytes}


class LayerFlats(BlockCache):
    """The block cache of one device: the flat files of its read-only layers (bottom first)."""

    def __init__(self, cache: FlatCache, layers: Sequence[tuple[LayerMeta, str]], files: Sequence[FlatFile],
                 chunk_extents: Sequence[dict[bytes, tuple[int, list[tuple[int, int, int]]]]]) -> None:
        self.cache = cache
        self.files = list(files)
        self.block_size = layers[0][0].block_size if layers else 4096
        self._extents = chunk_extents  # per layer: chunk digest -> (its blocks, [(first block, count, chunk block)])
        self._closed = False
        self._starts: list[dict[int, bytes] | None] = [None] * len(self.files)  # per layer: first block -> chunk
        for f, extents in zip(self.files, chunk_extents):
            cache.register(f, extents)
        for f, extents in zip(self.files, chunk_extents):
            for digest, (blocks, exts) in extents.items():
                for first, count, chunk_block in exts:
                    if chunk_block == 0 and count == blocks and f.map.covered(first, first + count):
                        cache.index_chunk(digest, f, first, count)
                        break

    @classmethod
    async def open(cls, cache: FlatCache, layers: Sequence[tuple[LayerMeta, str]]) -> "LayerFlats":
        files = []
        try:
            for meta, digest in layers:
                files.append(await cache.open_layer(digest.split(":")[-1], meta.virtual_size, meta.block_size))
        except BaseException:
            for f in files:
                await cache.release(f)
            raise
        extents = await trio.to_thread.run_sync(lambda: [_chunk_extents(meta) for meta, _ in layers])
        return cls(cache, layers, files, extents)

    async def read_into(self, buf: bytearray, offset: int, segments: Sequence[Segment]) -> list[Segment]:
        missing: list[Segment] = []
        i = 0
        while i < len(segments):  # runs of contiguous segments of one layer: one preadv each
            j = i + 1
            while j < len(segments) and segments[j].layer == segments[i].layer and segments[j].start == segments[j - 1].end:
                j += 1
            run = segments[i:j]
            i = j
            f = self.files[run[0].layer] if 0 <= run[0].layer < len(self.files) else None
            if f is None:
                missing.extend(run)
                continue
            if not f.map.covered(run[0].start, run[-1].end):
                if self.cache._where:
                    await self._copy_from_peers(run[0].layer, f, run)
                if not f.map.covered(run[0].start, run[-1].end):
                    run_parts = _split_by_cover(run, f.map)  # serve what is held, leave the rest
                else:
                    run_parts = [(True, run)]
            else:
                run_parts = [(True, run)]
            for held, part in run_parts:
                if not held:
                    self.cache._stats["misses"] += 1
                    missing.extend(part)
                    continue
                start, end = part[0].start, part[-1].end
                bad = await self._read_run(f, buf, offset, start, end)
                if bad is None:
                    self.cache.touch(f.key)  # in memory only: persisted with the maps
                    self.cache._stats["hits"] += 1
                    self.cache._stats["blocks_served"] += end - start
                else:
                    self.cache._stats["tampered"] += 1
                    seg = next(s for s in part if s.start <= bad < s.end)
                    log.warning("flat cache: block %d of layer %s does not match its hash; chunk %s dropped",
                                bad, f.key, seg.loc.digest.hex()[:16])
                    for first, count, _ in self._extents[seg.layer].get(seg.loc.digest, (0, ()))[1]:
                        f.drop(first, count)
                    self.cache.changed((seg.loc.digest,))
                    missing.extend(part)
        return missing

    def watch(self, callback: Callable[[bytes], None]) -> Callable[[], None]:
        """:meth:`FlatCache.watch` of the host's layer files (this device's among them)."""
        return self.cache.watch(callback)

    def read_local_into(self, buf: bytearray, offset: int, segments: Sequence[Segment]) -> bool:
        """Serve *segments* whole from the flat files in the calling (non-trio) thread: a blocking
        ``preadv`` of each run and the same per-4-KiB hash check as ``read_into``. Declines (False,
        nothing changed) on anything else: a block not held, a closed file, a mapped segment, a
        hash mismatch (the trio path then reads it again, drops the chunk and fetches it).

        The maps are only read here; the trio thread may set or clear bits meanwhile. Either way
        a block is served only if its bytes hash as the map says, and a layer block's verified
        bytes never change, so a race can cost a decline, never a wrong byte.
        """
        if self._closed:
            return False
        bs = self.block_size
        files = self.files
        served = 0
        try:
            i = 0
            while i < len(segments):  # runs of contiguous segments of one layer: one preadv each
                seg = segments[i]
                layer = seg.layer
                if seg.loc is None or not 0 <= layer < len(files):
                    return self._declined()
                j = i + 1
                while j < len(segments) and segments[j].layer == layer and segments[j].start == segments[j - 1].end \
                        and segments[j].loc is not None:
                    j += 1
                start, end = seg.start, segments[j - 1].end
                i = j
                f = files[layer]
                if f.closed or not f.map.covered(start, end):
                    return self._declined()
                lo, hi = start * bs, end * bs
                direct = lo >= offset and hi <= offset + len(buf)
                target = memoryview(buf)[lo - offset : hi - offset] if direct else memoryview(bytearray(hi - lo))
                if _pread_full(f.fd, target, lo) != len(target):
                    return self._declined()
                if block_hashes(target, bs) != f.map.hashes(start, end):
                    return self._declined()
                if not direct:
                    a, b = max(lo, offset), min(hi, offset + len(buf))
                    buf[a - offset : b - offset] = target[a - lo : b - lo]
                served += end - start
        except (OSError, KeyError, ValueError):  # a file closed or a group dropped under the read
            return self._declined()
        self.cache.count_local(True, served)
        return True

    def counted_in(self) -> FlatCache:
        return self.cache

    def local_files(self) -> list[tuple[int, object, object, int]] | None:
        if self._closed:
            return None
        return [(-1 if f.closed else f.fd, *f.map.buffers(), f.map.blocks) for f in self.files]

    def _declined(self) -> bool:
        self.cache.count_local(False, 0)
        return False

    def holds(self, segment: Segment) -> bool:
        if segment.loc is None or not 0 <= segment.layer < len(self.files):
            return False
        return self.files[segment.layer].map.covered(segment.start, segment.end)

    def _index_if_whole(self, layer: int, start: int) -> None:
        """Record a chunk written whole from *start* (its chunk block 0) for other layers to copy."""
        f = self.files[layer]
        for digest, (blocks, exts) in self._chunk_at(layer, start):
            for first, count, chunk_block in exts:
                if first == start and chunk_block == 0 and count == blocks:
                    self.cache.index_chunk(digest, f, first, count)
                    return

    def _chunk_at(self, layer: int, start: int):
        starts = self._starts[layer]
        if starts is None:
            starts = self._starts[layer] = {first: digest for digest, (_, exts) in self._extents[layer].items()
                                            for first, _, cb in exts if cb == 0}
        digest = starts.get(start)
        return [] if digest is None else [(digest, self._extents[layer][digest])]

    async def _copy_from_peers(self, layer: int, f: FlatFile, run: Sequence[Segment]) -> None:
        """Fill the chunks of *run* that another layer file holds whole: reflink (FICLONERANGE) where the
        file system can, copy otherwise; each copy is checked against the source's hashes before use."""
        jobs = []
        seen = set()
        copied = set()
        for seg in run:
            digest = seg.loc.digest
            if digest in seen:
                continue
            seen.add(digest)
            src = self.cache.find_chunk(digest, exclude=f)
            if src is None:
                continue
            src_file, src_first, _ = src
            for first, count, chunk_block in self._extents[layer].get(digest, (0, ()))[1]:
                if not f.map.covered(first, first + count):
                    a = src_first + chunk_block
                    jobs.append((src_file, a, first, count, src_file.map.hashes(a, a + count)))
                    copied.add(digest)
        if not jobs:
            return
        sources = {job[0] for job in jobs}
        for src in sources:
            src.users += 1  # not evicted (its fd closed) while the worker copies from it
        try:
            done = await trio.to_thread.run_sync(_copy_blocks, jobs, f, self.block_size)
        except OSError as exc:
            self.cache._stats["copy_errors"] += 1
            log.warning("flat cache: cannot copy into layer %s: %s", f.key, exc)
            return
        finally:
            for src in sources:
                src.users -= 1
        for first, hashes, reflinked, ok in done:
            if not ok:
                self.cache._stats["copy_errors"] += 1
                continue
            f.note_written(first, hashes)
            n = len(hashes) // HASH_LEN
            self.cache._stats["copied_blocks"] += n
            self.cache._stats["reflinked_blocks"] += n if reflinked else 0
            self.cache.held += n * self.block_size
        self.cache.changed(copied)

    async def _read_run(self, f: FlatFile, buf: bytearray, offset: int, start: int, end: int) -> int | None:
        """Read blocks [start, end) into their place in *buf* and verify them; the first bad block or None."""
        bs = self.block_size
        lo, hi = start * bs, end * bs
        direct = lo >= offset and hi <= offset + len(buf)
        target = memoryview(buf)[lo - offset : hi - offset] if direct else memoryview(bytearray(hi - lo))
        await self._pread(f, target, lo)
        want = f.map.hashes(start, end)
        got = block_hashes(target, bs)
        if got != want:
            for k in range(end - start):
                if got[k * HASH_LEN : (k + 1) * HASH_LEN] != want[k * HASH_LEN : (k + 1) * HASH_LEN]:
                    return start + k
        if not direct:
            a, b = max(lo, offset), min(hi, offset + len(buf))
            buf[a - offset : b - offset] = target[a - lo : b - lo]
        return None

    async def _pread(self, f: FlatFile, target: memoryview, pos: int) -> None:
        try:
            n = os.preadv(f.fd, [target], pos, os.RWF_NOWAIT)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = 0
        if n == len(target):
            self.cache._stats["nowait_reads"] += 1
            return
        self.cache._stats["thread_reads"] += 1
        rest = target[n:]
        got = await trio.to_thread.run_sync(_pread_full, f.fd, rest, pos + n)
        if got < len(rest):
            rest[got:] = bytes(len(rest) - got)  # past the end of a shorter file: fails verification

    async def admit(self, segments: Sequence[Segment], chunks: Mapping[bytes, bytes]) -> None:
        bs = self.block_size
        work: dict[int, list[tuple[int, memoryview]]] = {}
        digests: dict[int, set[bytes]] = {}  # per layer: the chunks written into it
        seen = set()
        for seg in segments:
            if seg.loc is None or not 0 <= seg.layer < len(self.files):
                continue  # mapped (tar span) segments are not kept in flat files
            key = (seg.layer, seg.loc.digest)
            if key in seen:
                continue
            seen.add(key)
            f, raw = self.files[seg.layer], chunks.get(seg.loc.digest)
            if raw is None:
                continue
            view = memoryview(raw)
            for first, count, chunk_block in self._extents[seg.layer].get(seg.loc.digest, (0, ()))[1]:
                if not f.map.covered(first, first + count) and (chunk_block + count) * bs <= len(raw):
                    work.setdefault(seg.layer, []).append((first, view[chunk_block * bs : (chunk_block + count) * bs]))
                    digests.setdefault(seg.layer, set()).add(seg.loc.digest)
        for layer, items in work.items():
            f = self.files[layer]
            try:
                written = await trio.to_thread.run_sync(f.write_blocks, items)
            except OSError as exc:
                self.cache._stats["write_errors"] += 1
                log.warning("flat cache: cannot write layer %s: %s", f.key, exc)
                continue
            for start, hashes in written:
                f.note_written(start, hashes)
                self._index_if_whole(layer, start)
                self.cache._stats["writes"] += 1
                self.cache._stats["bytes_written"] += len(hashes) // HASH_LEN * bs
                self.cache.held += len(hashes) // HASH_LEN * bs
            self.cache.changed(digests[layer])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for f, extents in zip(self.files, self._extents):
            self.cache.unregister(f, extents)
        with trio.CancelScope(shield=True):
            for f in self.files:
                await self.cache.release(f)

    def statistics(self) -> dict:
        blocks = sum(f.map.count for f in self.files)
        return {"layers": len(self.files), "blocks": blocks, "bytes": blocks * self.block_size}


def write_targets(targets, raw: bytes | memoryview):
    """Worker thread: write verified chunk *raw* at the extents *targets* (from :meth:`FlatCache.targets`)
    and hash its blocks; ``[(file, first, count, chunk block, chunk blocks, hashes)]``, or the OSError.

    The blocks are hashed once per chunk (the hashes of an extent are a slice of them)."""
    view = memoryview(raw)
    out = []
    hashes = None
    try:
        for f, extents in targets:
            bs = f.block_size
            blocks = -(-len(view) // bs)
            if hashes is None:
                hashes = block_hashes(view, bs)
            for first, count, cb in extents:
                pwrite_all(f.fd, view[cb * bs : (cb + count) * bs], first * bs)
                out.append((f, first, count, cb, blocks, hashes[cb * HASH_LEN : (cb + count) * HASH_LEN]))
    except OSError as exc:
        return exc
    return out


def _chunk_extents(meta: LayerMeta) -> dict[bytes, tuple[int, list[tuple[int, int, int]]]]:
    """Per chunk digest: its size in blocks and the layer's extents that use it."""
    out: dict[bytes, tuple[int, list[tuple[int, int, int]]]] = {}
    for e in meta.extents:
        if e.chunk != ZEROED:
            ref = meta.chunks[e.chunk]
            out.setdefault(ref.digest, (-(-ref.raw_length // meta.block_size), []))[1].append(
                (e.start, e.count, e.chunk_offset))
    return out


FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
_CLONE_RANGE = struct.Struct("<qQQQ")  # src_fd, src_offset, src_length, dest_offset


def _copy_blocks(jobs, dest: FlatFile, bs: int) -> list[tuple[int, bytes, bool, bool]]:
    """Worker thread: copy each ``(src file, src first, dest first, count, src hashes)`` into *dest*;
    return ``(dest first, hashes, reflinked, matches)``: the copy is read back and must hash as the source."""
    import fcntl

    out = []
    for src, a, first, count, want in jobs:
        length = count * bs
        reflinked = False
        try:
            fcntl.ioctl(dest.fd, FICLONERANGE, _CLONE_RANGE.pack(src.fd, a * bs, length, first * bs))
            reflinked = True
        except OSError:
            done = 0
            while done < length:  # bounded: each pass copies at least one byte or stops
                n = os.copy_file_range(src.fd, dest.fd, length - done, a * bs + done, first * bs + done)
                if n <= 0:
                    break
                done += n
        got = os.pread(dest.fd, length, first * bs)
        out.append((first, want, reflinked, block_hashes(got, bs) == want and len(got) == length))
    return out


def _allocated(root: Path, keys: Sequence[str]) -> int:
    total = 0
    for key in keys:
        try:
            total += os.stat(root / f"{key}.data").st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def _split_by_cover(run: Sequence[Segment], held: BlockMap) -> list[tuple[bool, list[Segment]]]:
    """*run* cut into maximal parts of segments that are wholly held, or not."""
    parts: list[tuple[bool, list[Segment]]] = []
    for seg in run:
        h = held.covered(seg.start, seg.end)
        if parts and parts[-1][0] == h:
            parts[-1][1].append(seg)
        else:
            parts.append((h, [seg]))
    return parts


def _pread_full(fd: int, target: memoryview, pos: int) -> int:
    done = 0
    while done < len(target):  # bounded: every pass reads at least one byte or stops
        n = os.preadv(fd, [target[done:]], pos + done)
        if n <= 0:
            break
        done += n
    return done


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _remove_pair(root: Path, key: str) -> None:
    for suffix in (".map", ".data"):
        try:
            os.unlink(root / f"{key}{suffix}")
        except FileNotFoundError:
            pass
