"""An in-memory block source: the reference model the others are checked against."""

from __future__ import annotations

from lazyfs.device.source import BlockSource, check_write, clamp_read
from lazyfs.errors import ReadOnlyError


class MemorySource(BlockSource):
    """A bytearray behind the BlockSource interface (writable unless told otherwise)."""

    def __init__(self, size_or_data: int | bytes, read_only: bool = False) -> None:
        self.data = bytearray(size_or_data)
        self.size = len(self.data)
        self.read_only = read_only
        self.flushes = 0

    async def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.size, offset, length)
        return bytes(self.data[offset : offset + n])

    async def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise ReadOnlyError("memory source is read-only")
        check_write(self.size, offset, len(data))
        self.data[offset : offset + len(data)] = data

    async def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError("memory source is read-only")
        check_write(self.size, offset, length)
        self.data[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        self.flushes += 1
