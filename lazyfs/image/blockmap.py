"""Which ext4 blocks hold which tar bytes: FIEMAP of applied files, then a check against the disk.

``lazyfs index`` applies a layer like ``lazyfs convert`` does, and asks the
kernel (FIEMAP) where each regular file it created landed. ``file_extents``
(pure) turns those extents and the file's place in the tar stream into
``MappedExtent`` candidates; ``verified_extents`` keeps only those whose
blocks, read back from the finished disk file, are exactly the tar's bytes
(then zeros). So whatever happened to a file afterwards in the same layer
(overwritten, removed, its blocks reused), a mapped block never claims bytes
the disk does not hold: unproven blocks stay ordinary stored chunks.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import struct
from collections.abc import Iterable, Iterator, Sequence

from lazyfs.format.spanindex import MappedExtent

FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # start, length, flags, mapped_extents, extent_count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQ2QI3I")  # logical, physical, length, reserved64[2], flags, reserved[3]
FIEMAP_EXTENT_LAST = 0x1
_UNUSABLE = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800  # unknown, delalloc, encoded, ..., unwritten
BATCH = 256
MAX_CALLS = 1 << 16  # FIEMAP calls per file (BATCH extents each)


def fiemap(fd: int) -> list[tuple[int, int, int]]:
    """``(logical, physical, length)`` byte extents of the open file *fd* that hold written data."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for _ in range(MAX_CALLS):
        buf = bytearray(_FIEMAP_HEAD.size + BATCH * _FIEMAP_EXTENT.size)
        _FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, 0, 0, BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        n = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if n == 0:
            return out
        last = False
        for i in range(n):
            logical, physical, length, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
            if not flags & _UNUSABLE:
                out.append((logical, physical, length))
            start = logical + length
            last = last or bool(flags & FIEMAP_EXTENT_LAST)
        if last:
            return out
    return out


def data_segments(offset_data: int, size: int, sparse: Sequence[tuple[int, int]] | None) -> list[tuple[int, int, int]]:
    """``(file offset, length, tar offset)`` of a tar member's data (GNU sparse: the regions, back to back)."""
    if not sparse:
        return [(0, size, offset_data)] if size else []
    out, tar = [], offset_data
    for off, n in sparse:
        if n:
            out.append((off, n, tar))
        tar += n
    return out


def file_extents(extents: Iterable[tuple[int, int, int]], segments: Sequence[tuple[int, int, int]],
                 block_size: int = 4096) -> Iterator[MappedExtent]:
    """Candidate mapped extents for one file: its blocks that lie in one data segment each.

    A block whose bytes run past the end of a segment maps that segment's tail and
    reads zeros after it (the end of the file, or a hole of a sparse file);
    ``verified_extents`` drops the candidates where that is not what the disk holds.
    """
    bs = block_size
    for logical, physical, length in extents:
        if logical % bs or physical % bs:
            continue
        for file_off, n, tar in segments:
            lo = max(logical, file_off)
            hi = min(logical + length, file_off + n)
            lo = -(-lo // bs) * bs  # whole blocks only: the first block must start inside the segment
            if lo >= hi:
                continue
            count = -(-(hi - lo) // bs)
            if lo + count * bs > logical + -(-length // bs) * bs:
                count -= 1  # the last block is not in this extent
            if count <= 0:
                continue
            data = min(hi - lo, count * bs)
            yield MappedExtent((physical + lo - logical) // bs, count, tar + lo - file_off, data)


def _matches(disk: int, spool: int, e: MappedExtent, bs: int) -> bool:
    have = os.pread(disk, e.count * bs, e.start * bs)
    want = os.pread(spool, e.length, e.tar_offset)
    return len(want) == e.length and have == want + bytes(e.count * bs - e.length)


def verified_extents(disk_path: str, spool_path: str, candidates: Iterable[MappedExtent],
                     block_size: int = 4096) -> list[MappedExtent]:
    """The candidates (split to single blocks where a whole one fails) whose blocks hold their tar bytes.

    Sorted, non-overlapping, adjacent extents that continue each other merged.
    """
    bs = block_size
    kept: list[MappedExtent] = []
    with open(disk_path, "rb") as d, open(spool_path, "rb") as s:
        disk, spool = d.fileno(), s.fileno()
        for e in sorted(candidates, key=lambda e: e.start):
            if kept and e.start < kept[-1].end:
                continue  # blocks claimed twice (a file's blocks reused): the first proven claim stays
            if _matches(disk, spool, e, bs):
                kept.append(e)
                continue
            for k in range(e.count):  # salvage the blocks that do hold their bytes
                n = min(bs, e.length - k * bs)
                if n <= 0:
                    break
                one = MappedExtent(e.start + k, 1, e.tar_offset + k * bs, n)
                if _matches(disk, spool, one, bs):
                    kept.append(one)
    merged: list[MappedExtent] = []
    for e in kept:
        prev = merged[-1] if merged else None
        if prev is not None and prev.end == e.start and prev.length == prev.count * bs and \
                prev.tar_offset + prev.length == e.tar_offset:
            merged[-1] = MappedExtent(prev.start, prev.count + e.count, prev.tar_offset, prev.length + e.length)
        else:
            merged.append(e)
    return merged


def without_mapped(pieces: Iterable[tuple[int, bytes | None, int]], mapped: Sequence[MappedExtent],
                   block_size: int = 4096) -> Iterator[tuple[int, bytes | None, int]]:
    """*pieces* (``(start block, bytes | None, count)``, ascending) minus the mapped blocks."""
    starts = [e.start for e in mapped]
    for start, data, count in pieces:
        end = start + count
        i = max(0, bisect.bisect_right(starts, start) - 1)
        cur = start
        while cur < end:
            while i < len(mapped) and mapped[i].end <= cur:
                i += 1
            if i < len(mapped) and mapped[i].start <= cur:
                cur = min(end, mapped[i].end)
                continue
            stop = min(end, mapped[i].start) if i < len(mapped) else end
            piece = None if data is None else data[(cur - start) * block_size:(stop - start) * block_size]
            yield cur, piece, stop - cur
            cur = stop
