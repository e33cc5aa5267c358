"""Where a read-only layer gets its chunks: the chunk-store interface."""

from __future__ import annotations

import abc
import enum

from lazyfs.format.layer import ChunkLocation

__all__ = ["ChunkLocation", "ChunkSource", "Priority"]


class Priority(enum.IntEnum):
    """Lower value = more urgent. A demand read never waits behind the others."""

    DEMAND = 0
    TRACE = 1
    READAHEAD = 2
    BACKGROUND = 3


class ChunkSource(abc.ABC):
    """Hands out verified raw chunk bytes. Never returns bytes whose blake3 does not match."""

    @abc.abstractmethod
    async def get(self, loc: ChunkLocation, priority: Priority = Priority.DEMAND) -> bytes:
        """The raw (decompressed, verified) bytes of the chunk at *loc*."""

    async def aclose(self) -> None:
        """Stop background work and release files."""

    def statistics(self) -> dict:
        return {}
