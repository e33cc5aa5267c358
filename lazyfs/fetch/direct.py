"""The simplest chunk store: read each frame from a backend, verify, no cache.

Used for local images (an OCI layout on this host) where a cache would only
copy bytes that are already on local disk.
"""

from __future__ import annotations

import trio

from lazyfs.device.chunks import ChunkLocation, ChunkSource, Priority
from lazyfs.fetch.backend import Backend
from lazyfs.format.spanindex import WINDOW, SpanLocation, decode_location, decode_window, span_tail

MAX_TAILS = 64  # the windows of chained spans (tails of the gzip spans read last) and stored windows read last


class DirectChunkSource(ChunkSource):
    def __init__(self, backend: Backend, limiter: trio.CapacityLimiter | None = None) -> None:
        self.backend = backend
        self._limiter = limiter or trio.CapacityLimiter(4)
        self.reads = self.bytes_fetched = 0
        self._tails: dict[bytes, bytes] = {}

    async def get(self, loc: ChunkLocation, priority: Priority = Priority.DEMAND) -> bytes:
        window = None
        if isinstance(loc, SpanLocation) and loc.prev is not None:
            # the tail of the span before it; recursion is bounded by the span map's MAX_CHAIN
            window = self._tails.get(loc.prev.digest)
            if window is None:
                window = (await self.get(loc.prev, priority))[-WINDOW:]
        elif isinstance(loc, SpanLocation) and loc.window_at is not None:
            window = self._tails.get(loc.window_at.digest)
            if window is None:
                window = await self._read(loc.window_at, decode_window)
                self._remember(loc.window_at.digest, window)
        raw = await self._read(loc, decode_location, window)
        tail = span_tail(loc, raw)
        if tail is not None:
            self._remember(loc.digest, tail)
        return raw

    async def _read(self, loc: ChunkLocation, decode, *args) -> bytes:
        stored = await self.backend.read_range(loc.blob, loc.offset, loc.compressed_length)
        self.reads += 1
        self.bytes_fetched += len(stored)
        return await trio.to_thread.run_sync(decode, loc, stored, f"{loc.blob}@{loc.offset}", *args,
                                             limiter=self._limiter)

    def _remember(self, digest: bytes, window: bytes) -> None:
        self._tails.pop(digest, None)
        self._tails[digest] = window
        if len(self._tails) > MAX_TAILS:
            del self._tails[next(iter(self._tails))]

    async def aclose(self) -> None:
        await self.backend.aclose()

    def statistics(self) -> dict:
        return {"reads": self.reads, "bytes_fetched": self.bytes_fetched}
