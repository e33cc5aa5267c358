"""A crash-safe append-only journal of block-range records.

File: a header, then batches. A batch is ``b"BTCH" | count u32 | records | crc32``
where a record is ``start u64 | count u32 | value i64`` (little endian) and the
crc covers the batch header and records. A batch is written and fsynced as a
unit: on reopen a torn final batch (short, or bad crc with nothing after it) is
cut off; a bad batch followed by more data means the file was damaged, and
opening fails with FormatError instead of serving garbage.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable

from lazyfs.errors import FormatError

MAGIC = b"LZFSJRN1"
HEADER = struct.Struct("<8sII Q I")  # magic, kind, block_size, virtual_size, crc32
BATCH = struct.Struct("<4sI")
RECORD = struct.Struct("<QIq")
TRAILER = struct.Struct("<I")
BATCH_MAGIC = b"BTCH"
MAX_BATCH_RECORDS = 1 << 20

Record = tuple[int, int, int]  # (start block, block count, value)


def encode_header(kind: int, block_size: int, virtual_size: int) -> bytes:
    body = HEADER.pack(MAGIC, kind, block_size, virtual_size, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def encode_batch(records: Iterable[Record]) -> bytes:
    recs = b"".join(RECORD.pack(*r) for r in records)
    head = BATCH.pack(BATCH_MAGIC, len(recs) // RECORD.size)
    return head + recs + TRAILER.pack(zlib.crc32(head + recs))


def decode(data: bytes, name: str = "journal") -> tuple[tuple[int, int, int], list[Record], int]:
    """Parse a journal: ``((kind, block_size, virtual_size), records, valid_length)``.

    *valid_length* is where a torn tail starts (the caller truncates there).
    """
    if len(data) < HEADER.size:
        raise FormatError(f"{name}: header truncated ({len(data)} bytes)")
    magic, kind, block_size, virtual_size, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"{name}: bad magic {magic!r}")
    if zlib.crc32(data[: HEADER.size - 4]) != crc:
        raise FormatError(f"{name}: header checksum mismatch")
    records: list[Record] = []
    pos = HEADER.size
    while pos < len(data):
        batch = _batch_at(data, pos)
        if batch is None:
            if _more_valid_after(data, pos):
                raise FormatError(f"{name}: damaged batch at offset {pos}, followed by valid data")
            break  # torn tail: the last write never completed
        recs, pos = batch
        records.extend(recs)
    return (kind, block_size, virtual_size), records, pos


def _batch_at(data: bytes, pos: int) -> tuple[list[Record], int] | None:
    if pos + BATCH.size > len(data):
        return None
    magic, count = BATCH.unpack_from(data, pos)
    end = pos + BATCH.size + count * RECORD.size + TRAILER.size
    if magic != BATCH_MAGIC or count > MAX_BATCH_RECORDS or end > len(data):
        return None
    (crc,) = TRAILER.unpack_from(data, end - TRAILER.size)
    if zlib.crc32(data[pos : end - TRAILER.size]) != crc:
        return None
    body = data[pos + BATCH.size : end - TRAILER.size]
    return [RECORD.unpack_from(body, i * RECORD.size) for i in range(count)], end


def _more_valid_after(data: bytes, pos: int) -> bool:
    """Whether a complete valid batch starts anywhere after the broken one at *pos*."""
    i = data.find(BATCH_MAGIC, pos + 1)
    while i != -1:
        if _batch_at(data, i) is not None:
            return True
        i = data.find(BATCH_MAGIC, i + 1)
    return False


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """An open journal file: replayed at open, appended one fsynced batch per flush."""

    def __init__(self, path: str, kind: int, block_size: int, virtual_size: int, create: bool = False) -> None:
        self.path = path
        if create:
            write_atomically(path, encode_header(kind, block_size, virtual_size))
        with open(path, "rb") as f:
            data = f.read()
        (k, bs, vs), self.records, valid = decode(data, path)
        if (k, bs, vs) != (kind, block_size, virtual_size):
            raise FormatError(f"{path}: journal is for kind {k}, block size {bs}, size {vs}; expected {kind}, {block_size}, {virtual_size}")
        self._fd = os.open(path, os.O_WRONLY)
        if valid < len(data):
            os.ftruncate(self._fd, valid)
            os.fsync(self._fd)
        self.size = valid
        self.kind, self.block_size, self.virtual_size = kind, block_size, virtual_size

    def append(self, records: list[Record]) -> None:
        """Durably append one batch."""
        for i in range(0, len(records), MAX_BATCH_RECORDS):
            batch = encode_batch(records[i : i + MAX_BATCH_RECORDS])
            os.pwrite(self._fd, batch, self.size)
            self.size += len(batch)
        os.fsync(self._fd)

    def rewrite(self, records: Iterable[Record]) -> None:
        """Replace the journal with one holding just *records* (compaction), atomically."""
        recs = list(records)
        body = encode_header(self.kind, self.block_size, self.virtual_size)
        body += b"".join(encode_batch(recs[i : i + MAX_BATCH_RECORDS]) for i in range(0, len(recs), MAX_BATCH_RECORDS))
        write_atomically(self.path, body)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY)
        self.size = len(body)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_atomically(path: str, data: bytes) -> None:
    """Write *data* to *path* so that a crash leaves the old or the new file, never a mix."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))

