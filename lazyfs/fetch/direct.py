"""The simplest chunk store: read each frame from a backend, verify, no cache.

Used for local images (an OCI layout on this host) where a cache would only
copy bytes that are already on local disk.
"""

from __future__ import annotations

import trio

from lazyfs.device.chunks import ChunkLocation, ChunkSource, Priority
from lazyfs.fetch.backend import Backend
from lazyfs.format.spanindex import decode_location


class DirectChunkSource(ChunkSource):
    def __init__(self, backend: Backend, limiter: trio.CapacityLimiter | None = None) -> None:
        self.backend = backend
        self._limiter = limiter or trio.CapacityLimiter(4)
        self.reads = self.bytes_fetched = 0

    async def get(self, loc: ChunkLocation, priority: Priority = Priority.DEMAND) -> bytes:
        stored = await self.backend.read_range(loc.blob, loc.offset, loc.compressed_length)
        self.reads += 1
        self.bytes_fetched += len(stored)
        return await trio.to_thread.run_sync(
            decode_location, loc, stored, f"{loc.blob}@{loc.offset}",
            limiter=self._limiter,
        )

    async def aclose(self) -> None:
        await self.backend.aclose()

    def statistics(self) -> dict:
        return {"reads": self.reads, "bytes_fetched": self.bytes_fetched}
