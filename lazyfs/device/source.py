"""The one interface that runs through the stack: a block source.

Every layer, device and front end reads (and, where writable, writes) bytes by
offset. Contract shared by all implementations (checked by
``tests.support.conformance``):

* ``size`` is fixed for the life of the source, in bytes.
* ``read(offset, length)`` returns ``min(length, size - offset)`` bytes; a read
  at or past the end returns ``b""``. Negative offsets/lengths raise RangeError.
  ``read_into(offset, buf)`` fills ``buf`` with the same bytes and returns their count.
* ``write``/``discard`` must lie wholly inside ``[0, size)``, else RangeError;
  on a read-only source they raise ReadOnlyError. Any alignment is accepted.
* ``discard`` makes the range read back as zeros.
* after ``flush()`` returns, every write acknowledged before it is durable.
"""

from __future__ import annotations

import abc

from lazyfs.errors import RangeError, ReadOnlyError

BLOCK_SIZE = 4096


class BlockSource(abc.ABC):
    """A fixed-size array of bytes, read (and maybe written) by offset."""

    size: int
    read_only: bool = True

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Return up to *length* bytes at *offset* (short only at the end): bytes, or a bytearray
        fresh to this call (the caller's to keep; front ends take any buffer)."""

    async def read_into(self, offset: int, buf: memoryview) -> int:
        """Fill *buf* with up to ``len(buf)`` bytes at *offset*; return how many (short only at the end).

        For front ends whose buffer is not theirs to hand back (the TCMU data area): a source that
        can read in place (MergedDevice) overrides this; the default reads and copies once.
        """
        data = await self.read(offset, len(buf))
        buf[: len(data)] = data
        return len(data)

    def read_local(self, offset: int, length: int) -> bytes | bytearray | None:
        """The bytes ``read`` would return, if they can be had synchronously from local, verified
        storage alone; None otherwise (then ``read`` must be used). Called from any thread, never
        on the trio thread (it may block on the disk); it must not change state the trio thread
        owns. A read it serves is checked exactly as ``read`` checks it. Default: never served.
        """
        return None

    def local_plan(self) -> tuple[int, int, bytes, list, tuple] | None:
        """How a reader outside Python may serve what ``read_local`` serves, checked the same way
        (``MergedDevice.local_plan``); None (the default): it may not."""
        return None

    async def write(self, offset: int, data: bytes) -> None:
        """Store *data* at *offset*."""
        raise ReadOnlyError(f"{type(self).__name__} is read-only")

    async def discard(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros."""
        raise ReadOnlyError(f"{type(self).__name__} is read-only")

    async def flush(self) -> None:
        """Make every acknowledged write durable."""

    async def aclose(self) -> None:
        """Release files and tasks; the source is unusable afterwards."""

    def statistics(self) -> dict:
        """Counters for humans, tests and metrics."""
        return {}


def clamp_read(size: int, offset: int, length: int) -> int:
    """The number of bytes a read of *length* at *offset* returns."""
    if offset < 0 or length < 0:
        raise RangeError(f"negative offset or length: offset={offset} length={length}")
    return max(0, min(length, size - offset))


def check_write(size: int, offset: int, length: int) -> None:
    """Raise RangeError unless ``[offset, offset+length)`` lies inside ``[0, size)``."""
    if offset < 0 or length < 0 or offset + length > size:
        raise RangeError(f"range [{offset}, {offset + length}) outside device of {size} bytes")
