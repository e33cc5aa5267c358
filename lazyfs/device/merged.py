"""The merged device: a writable layer (if any) over a stack of read-only layers."""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from lazyfs.device.blockcache import BlockCache
from lazyfs.device.chunks import ChunkLocation, ChunkSource, Priority
from lazyfs.device.index import MergedIndex, Segment
from lazyfs.device.mapped import copy_mapped
from lazyfs.device.source import BlockSource, check_write, clamp_read
from lazyfs.device.writable import DATA, LOWER, WritableLayer
from lazyfs.errors import FormatError, ReadOnlyError, StorageError
from lazyfs.format.layer import LayerMeta
from lazyfs.format.spanindex import SpanMap
from lazyfs.nursery import open_nursery

MAX_LAYERS = 255
LAYER_THREADS = 4  # worker threads one device's writable layer may use at once
RMW_ATTEMPTS = 3  # a read-modify-write re-fetches its edges at most this often (once, in practice)
EXTENT = struct.Struct("<QQi4x")  # a local plan's extent: start block, end block, layer (or DECLINE)
DECLINE = -2  # a local plan's extent whose blocks are never served outside Python (mapped tar bytes)


class MergedDevice(BlockSource):
    """Reads fall through the writable layer to the merged read-only index; writes go on top.

    Unaligned writes are read-modify-written at block granularity, so the
    writable layers only ever see whole blocks.

    Concurrency (docs/daemon.md, "Concurrency"): the writable layer's file I/O runs in worker
    threads (at most ``LAYER_THREADS`` per device, so one slow disk cannot take every thread);
    reads of it try the page cache inline first (``RWF_NOWAIT``). The write lock orders writes,
    discards and flushes; it is never held while a chunk is fetched: a read-modify-write fetches
    the lower blocks it needs first (they never change) and then re-checks under the lock.
    """

    def __init__(
        self,
        layers: Sequence[tuple[LayerMeta, str]],
        store: ChunkSource,
        writable: WritableLayer | None = None,
        size: int | None = None,
        mapped: Sequence[SpanMap | None] | None = None,
    ) -> None:
        """*layers*: ``(meta, blob digest)`` bottom first; the device is as big as the top one.

        *mapped*: per layer, the span map of an indexed layer (docs/index.md), or None.
        """
        if len(layers) > MAX_LAYERS:
            raise FormatError(f"{len(layers)} layers: at most {MAX_LAYERS} are supported")
        if not layers and size is None:
            raise FormatError("a device needs at least one layer or an explicit size")
        self.block_size = layers[-1][0].block_size if layers else 4096
        if any(meta.block_size != self.block_size for meta, _ in layers):
            raise FormatError("all layers of a device must share one block size")
        self.size = size if size is not None else layers[-1][0].virtual_size
        if self.size <= 0 or self.size % self.block_size:
            raise FormatError(f"device size {self.size} is not a positive multiple of {self.block_size}")
        self.index = MergedIndex(layers, self.size // self.block_size, mapped)
        self.store = store
        self.writable = writable
        if writable is not None and (writable.size != self.size or writable.block_size != self.block_size):
            raise FormatError(f"writable layer of {writable.size} bytes does not fit a device of {self.size}")
        self.read_only = writable is None
        self.block_cache: BlockCache | None = None  # serves read-only blocks it holds before the store is asked
        # told every chunk or span a read of the lower layers needs, block cache hits included (a
        # startup trace being recorded); while set, no read is served outside the trio thread
        self.observe_read: Callable[[ChunkLocation], None] | None = None
        self._write_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(LAYER_THREADS)
        self._in_threads = 0  # worker-thread calls on the writable layer now running
        self._threads_idle: trio.Event | None = None
        self.bytes_read = self.bytes_written = 0
        self.nowait_reads = self.thread_reads = 0
        self.inplace_reads = 0  # reads served into the caller's buffer (read_into)
        # bytes served in FUSE worker threads (read_local): counted under a lock, part of bytes_read
        self._local_lock = threading.Lock()
        self.local_bytes_read = 0
        self.native_counter = None  # the reads the FUSE threads' C path answers from it (set by that path)

    # ------------------------------------------------------------ reads

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        buf = bytearray(n)
        await self._fill(buf, offset, zeroed=True)
        # the buffer itself, not bytes(buf): a second copy of every byte read cost the trio thread
        # ~10 % in the cold-fetch profile (BENCHMARKS.md); it is fresh per call and nobody else holds it
        return buf

    async def read_into(self, offset: int, buf: memoryview) -> int:
        """Read in place into *buf* (the TCMU data area): flat-file hits are ``preadv``-ed straight
        into it, and holes are zeroed there; no intermediate buffer (issue 14, item 5)."""
        n = clamp_read(self.size, offset, len(buf))
        if n == 0:
            return 0
        await self._fill(buf[:n], offset, zeroed=False)
        self.inplace_reads += 1
        return n

    async def _fill(self, buf: bytearray | memoryview, offset: int, *, zeroed: bool) -> None:
        """Every byte of *buf* (device bytes from *offset*): *zeroed* says whether it is zero already."""
        bs = self.block_size
        first, end = offset // bs, (offset + len(buf) - 1) // bs + 1
        if self.writable is None:
            await self._read_lower(buf, offset, first, end, zeroed)
        else:
            for start, count, state in self.writable.lookup(first, end - first):
                if state == LOWER:
                    await self._read_lower(buf, offset, start, start + count, zeroed)
                elif state == DATA:
                    _copy_in(buf, offset, start * bs, await self._read_writable(start, count))
                elif not zeroed:
                    _zero(buf, offset, start * bs, (start + count) * bs)
        self.bytes_read += len(buf)

    def read_local(self, offset: int, length: int) -> bytearray | None:
        """A read of a device without a writable layer that the block cache serves whole (any thread
        but the trio thread; see ``BlockSource.read_local``); None for anything else."""
        if self.writable is not None or self.observe_read is not None:
            return None  # its blocks change under writes ordered on the trio thread; or reads are observed
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return None
        bs = self.block_size
        segments = self.index.lookup(offset // bs, (offset + n - 1) // bs + 1)
        buf = bytearray(n)
        if segments:
            cache = self.block_cache
            if cache is None or not cache.read_local_into(buf, offset, segments):
                return None
        with self._local_lock:
            self.local_bytes_read += n
        return buf

    def local_plan(self) -> tuple[int, int, bytes, list, tuple] | None:
        """What a reader outside Python needs to serve what ``read_local`` serves (the FUSE
        threads' C path): ``(size, block_size, extents, files, counted_in)``, the extents packed as
        ``EXTENT`` (device blocks, the read-only layer they come from, or DECLINE for mapped
        blocks; blocks in no extent read as zeros), *files* as the block cache's ``local_files``,
        *counted_in* the objects whose ``native_counter`` slot counts what it serves: this
        device (its ``bytes_read``) and the block cache's ``counted_in``.
        None when ``read_local`` serves nothing (a writable layer, reads observed, no block cache)."""
        cache = self.block_cache
        if self.writable is not None or self.observe_read is not None or cache is None:
            return None
        files = cache.local_files()
        if files is None:
            return None
        extents = b"".join(EXTENT.pack(seg.start, seg.end, seg.layer if seg.loc is not None
                                       and 0 <= seg.layer < len(files) else DECLINE)
                           for seg in self.index.segments)
        owners = (self,) if cache.counted_in() is None else (self, cache.counted_in())
        return self.size, self.block_size, extents, files, owners

    async def _read_lower(self, buf: bytearray | memoryview, offset: int, start: int, end: int,
                          zeroed: bool = True) -> None:
        segments = self.index.lookup(start, end)
        if not zeroed:  # holes of the lower layers read as zeros
            bs = self.block_size
            at = start
            for seg in segments:
                if seg.start > at:
                    _zero(buf, offset, at * bs, seg.start * bs)
                at = seg.end
            if at < end:
                _zero(buf, offset, at * bs, end * bs)
        if not segments:
            return
        if self.observe_read is not None:
            for seg in segments:
                for loc in seg.locations():
                    self.observe_read(loc)
        cache = self.block_cache
        if cache is not None:
            segments = await cache.read_into(buf, offset, segments)
            if not segments:
                return
        chunks: dict[bytes, bytes] = {}
        wanted = {loc.digest: loc for seg in segments for loc in seg.locations()}
        if len(wanted) == 1:
            (loc,) = wanted.values()
            chunks[loc.digest] = await self.store.get(loc, Priority.DEMAND)
        else:
            async def fetch(loc: ChunkLocation) -> None:
                chunks[loc.digest] = await self.store.get(loc, Priority.DEMAND)

            async with open_nursery() as nursery:
                for loc in wanted.values():
                    nursery.start_soon(fetch, loc)
        for seg in segments:
            if seg.loc is not None:
                _copy_segment(buf, offset, seg, chunks[seg.loc.digest], self.block_size)
            else:
                copy_mapped(buf, offset, seg.start, seg.end, seg.mapped, seg.chunk_block, chunks)
        if cache is not None:
            await cache.admit(segments, chunks)

    # ------------------------------------------------------------ writes

    def _writable(self) -> WritableLayer:
        if self.writable is None:
            raise ReadOnlyError("this image is mounted read-only (no writable layer)")
        return self.writable

    async def _read_writable(self, start: int, count: int) -> bytes:
        """Blocks of the writable layer: from the page cache inline, else in a worker thread."""
        layer = self.writable
        data = layer.read_blocks_nowait(start, count)
        if data is not None:
            self.nowait_reads += 1
            return data
        self.thread_reads += 1
        return await self._in_thread(layer.read_blocks, start, count)

    async def _in_thread(self, fn, *args):
        """Run a blocking call on the writable layer in a worker thread (counted, so aclose waits for it)."""
        self._in_threads += 1
        try:
            # not abandoned on cancel: the thread finishes before this returns, so the count is exact
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self._in_threads -= 1
            if not self._in_threads and self._threads_idle is not None:
                self._threads_idle.set()

    async def write(self, offset: int, data: bytes) -> None:
        layer = self._writable()
        check_write(self.size, offset, len(data))
        if not data:
            return
        bs = self.block_size
        first, end = offset // bs, (offset + len(data) - 1) // bs + 1
        # the partial edge blocks, read-modify-written
        edges = sorted({b for b, partial in ((first, offset % bs), (end - 1, (offset + len(data)) % bs)) if partial})
        lower: dict[int, bytes] = {}
        for _ in range(RMW_ATTEMPTS):
            # Fetch, without the lock, what the edges need of the read-only layers: those never
            # change, so the bytes are still right once the lock is taken. Only the writable
            # layer's state can change meanwhile, and that is re-checked under the lock.
            for b in edges:
                if b not in lower and self._state(layer, b) == LOWER:
                    lower[b] = await self._read_lower_block(b)
            async with self._write_lock:
                if any(b not in lower and self._state(layer, b) == LOWER for b in edges):
                    continue  # not reached: a written block never falls back to the lower layers
                if edges:
                    block = bytearray((end - first) * bs)
                    for b in edges:
                        state = self._state(layer, b)
                        at = (b - first) * bs
                        if state == LOWER:
                            block[at : at + bs] = lower[b]
                        elif state == DATA:
                            block[at : at + bs] = await self._read_writable(b, 1)  # local disk, not the network
                    block[offset - first * bs : offset - first * bs + len(data)] = data
                    data = bytes(block)
                await self._in_thread(layer.write_blocks, first, data)
                self.bytes_written += len(data)
                return
        raise StorageError(f"writable layer {layer.root}: blocks changed under a write {RMW_ATTEMPTS} times", errno.EIO)

    @staticmethod
    def _state(layer: WritableLayer, block: int) -> int:
        return layer.lookup(block, 1)[0][2]

    async def _read_lower_block(self, block: int) -> bytes:
        """One block of the read-only layers alone (fetching its chunk if it is not cached)."""
        buf = bytearray(self.block_size)
        await self._read_lower(buf, block * self.block_size, block, block + 1)
        return bytes(buf)

    async def discard(self, offset: int, length: int) -> None:
        layer = self._writable()
        check_write(self.size, offset, length)
        if not length:
            return
        bs = self.block_size
        first_full = -(-offset // bs)
        end_full = (offset + length) // bs
        if first_full >= end_full:  # no whole block inside: plain zero write
            await self.write(offset, bytes(length))
            return
        if offset < first_full * bs:
            await self.write(offset, bytes(first_full * bs - offset))
        if (offset + length) > end_full * bs:
            await self.write(end_full * bs, bytes(offset + length - end_full * bs))
        async with self._write_lock:
            await self._in_thread(layer.zero_blocks, first_full, end_full - first_full)

    @asynccontextmanager
    async def writes_held(self) -> AsyncIterator[None]:
        """Flush, then keep writes out for the duration (e.g. while a commit reads the writable layer)."""
        async with self._write_lock:
            if self.writable is not None:
                await self._in_thread(self.writable.flush)
            yield

    async def flush(self) -> None:
        if self.writable is not None:
            async with self._write_lock:
                await self._in_thread(self.writable.flush)

    async def aclose(self) -> None:
        """Flush and close the writable layer (closed, lock released, even if the flush fails), then the block cache."""
        try:
            if self.writable is not None:
                try:
                    await self.flush()
                finally:
                    with trio.CancelScope(shield=True):
                        if self._in_threads:  # a read in a worker thread still uses the layer's descriptor
                            self._threads_idle = trio.Event()
                            await self._threads_idle.wait()
                    self.writable.close()
        finally:
            if self.block_cache is not None:
                await self.block_cache.aclose()

    def statistics(self) -> dict:
        with self._local_lock:
            local_bytes = self.local_bytes_read
        if self.native_counter is not None:  # reads the FUSE threads' C path answered (local_plan)
            local_bytes += self.native_counter.bytes
        stats = {"bytes_read": self.bytes_read + local_bytes, "bytes_written": self.bytes_written,
                 "segments": len(self.index.segments), "writable_reads_inline": self.nowait_reads,
                 "writable_reads_in_thread": self.thread_reads}
        if self.writable is not None:
            stats["writable"] = self.writable.statistics()
        if self.block_cache is not None:
            stats["block_cache"] = self.block_cache.statistics()
        return stats


_ZEROS = memoryview(bytes(1 << 20))


def _zero(buf: bytearray | memoryview, buf_offset: int, lo: int, hi: int) -> None:
    """Zero the part of *buf* (device bytes from *buf_offset*) that ``[lo, hi)`` overlaps."""
    lo, hi = max(lo, buf_offset) - buf_offset, min(hi, buf_offset + len(buf)) - buf_offset
    while lo < hi:
        n = min(hi - lo, len(_ZEROS))
        buf[lo : lo + n] = _ZEROS[:n]
        lo += n


def _copy_in(buf: bytearray | memoryview, buf_offset: int, src_offset: int, src: bytes) -> None:
    """Copy the part of *src* (virtual bytes from *src_offset*) that overlaps *buf*."""
    lo = max(src_offset, buf_offset)
    hi = min(src_offset + len(src), buf_offset + len(buf))
    if lo < hi:
        buf[lo - buf_offset : hi - buf_offset] = src[lo - src_offset : hi - src_offset]


def _copy_segment(buf: bytearray | memoryview, buf_offset: int, seg: Segment, raw: bytes, bs: int) -> None:
    lo = max(seg.start * bs, buf_offset)
    hi = min(seg.end * bs, buf_offset + len(buf))
    if lo < hi:
        src = seg.chunk_block * bs + (lo - seg.start * bs)
        buf[lo - buf_offset : hi - buf_offset] = memoryview(raw)[src : src + hi - lo]  # one copy, not two
