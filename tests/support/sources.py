"""Chunk stores for tests: decode straight from an in-memory backend, counting gets."""

from __future__ import annotations

from lazyfs.device.chunks import ChunkLocation, ChunkSource, Priority
from lazyfs.fetch.backend import Backend
from lazyfs.format.chunk import decode_chunk


class CountingSource(ChunkSource):
    """Reads every frame from *backend* and verifies it; records each get."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.gets: list[ChunkLocation] = []

    async def get(self, loc: ChunkLocation, priority: Priority = Priority.DEMAND) -> bytes:
        self.gets.append(loc)
        stored = await self.backend.read_range(loc.blob, loc.offset, loc.compressed_length)
        return decode_chunk(loc.digest, stored, loc.compression, loc.raw_length, loc.blob)
