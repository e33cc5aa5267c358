"""The data requests of an export, once for both FUSE front ends: read, write, flush.

``lazyfs.serve.fusekernel.exports`` (the default) and ``lazyfs.serve.fuse`` (pyfuse3) differ in how
a request arrives and how an errno goes back (*fail*: ``FuseErrno`` or ``pyfuse3.FUSEError``), not
in what it does to the block source and the counters (``lazyfs.serve.exportstats``): that is here.

*exp* is the front end's export record: ``source`` (a ``BlockSource``), ``dirty`` and the
per-export counters ``reads`` … ``errors``; *c* the front end's totals (``Counters``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from lazyfs.serve.exportstats import Counters


async def read(c: Counters, exp, off: int, size: int) -> bytes:
    """Up to *size* bytes of *exp* from *off*, counted; an error of the source is counted and raised."""
    try:
        data = await exp.source.read(off, size)
    except Exception:
        exp.errors += 1
        raise
    n = len(data)
    c.reads += 1
    c.bytes_read += n
    c.largest_read = max(c.largest_read, size)
    exp.reads += 1
    exp.bytes_read += n
    return data


async def write(c: Counters, exp, writable: bool, off: int, buf, fail: Callable[[int], Exception]) -> int:
    """Write *buf* at *off* through a handle opened *writable*; the bytes written, counted.

    Like a block device: EROFS for a read-only source, EBADF for a read-only handle, ENOSPC at or
    past the end, and a short write for one that crosses it (ENOSPC on the retry)."""
    if exp.source.read_only:
        raise fail(errno.EROFS)
    if not writable:
        raise fail(errno.EBADF)
    size = exp.source.size
    if off >= size and len(buf):
        raise fail(errno.ENOSPC)  # like a block device: no room past the end
    if off + len(buf) > size:
        buf = buf[: size - off]  # a short write, then ENOSPC on the retry
    exp.dirty = True
    try:
        await exp.source.write(off, bytes(buf))  # bytes: the identical object for bytes, a copy of a view
    except Exception:
        exp.errors += 1
        raise
    n = len(buf)
    c.writes += 1
    c.bytes_written += n
    c.largest_write = max(c.largest_write, n)
    exp.writes += 1
    exp.bytes_written += n
    return n


async def flush(c: Counters, exp) -> None:
    """Flush *exp*'s source; *exp* is dirty again if that fails (counted and raised)."""
    exp.dirty = False  # cleared before: a write racing with the flush marks it dirty again
    try:
        await exp.source.flush()
    except Exception:
        exp.dirty = True
        exp.errors += 1
        raise
    exp.flushes += 1
    c.flushes += 1


__all__ = ["flush", "read", "write"]
