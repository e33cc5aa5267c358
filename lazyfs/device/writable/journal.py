"""A crash-safe append-only journal of block-range records.

File: a header, then batches. A batch is ``b"BTCH" | count u32 | records | crc32``
where a record is ``start u64 | count u32 | value i64`` (little endian) and the
crc covers the batch header and records. One flush appends exactly one batch
and fdatasyncs it; on reopen a torn final batch (short, or bad crc with nothing
valid after it) is cut off; a bad batch followed by a valid one means the file
was damaged, and opening fails with FormatError instead of serving garbage.

Failures: an append that cannot be written (disk full) is cut off again and
reported, and may be retried. An append whose fdatasync fails is reported and
the journal refuses every later append (``failed``): the kernel may have
dropped those pages, so the journal's tail is unknown until it is reopened and
read back from the disk. See docs/durability.md.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from contextlib import suppress

from lazyfs.durable import fsync_dir, pwrite_all, storage_error, write_all, write_atomically
from lazyfs.errors import FormatError, StorageError

MAGIC = b"LZFSJRN1"
HEADER = struct.Struct("<8sII Q I")  # magic, kind, block_size, virtual_size, crc32
BATCH = struct.Struct("<4sI")
RECORD = struct.Struct("<QIq")
TRAILER = struct.Struct("<I")
BATCH_MAGIC = b"BTCH"
MAX_BATCH_RECORDS = 1 << 20
COMPACT_SUFFIX = ".compact"

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


def read_from_disk(fd: int) -> bytes:
    """The whole file, read back from the disk rather than from pages a failed fsync left behind."""
    with suppress(OSError):  # advice only: a file system may not support it
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    size = os.fstat(fd).st_size
    parts, pos = [], 0
    while pos < size:
        piece = os.pread(fd, size - pos, pos)
        if not piece:
            break
        parts.append(piece)
        pos += len(piece)
    return b"".join(parts)


class Journal:
    """An open journal file: replayed at open, one fdatasynced batch appended per flush.

    ``failed`` is None, or why the journal refuses appends until it is reopened.
    """

    def __init__(self, path: str, kind: int, block_size: int, virtual_size: int, create: bool = False) -> None:
        self.path = path
        self.kind, self.block_size, self.virtual_size = kind, block_size, virtual_size
        self.failed: str | None = None
        self.compactions = self.compaction_errors = 0
        if create:
            write_atomically(path, encode_header(kind, block_size, virtual_size))
        with suppress(FileNotFoundError):  # a compaction interrupted by a crash
            os.unlink(path + COMPACT_SUFFIX)
        self._fd = os.open(path, os.O_RDWR)
        try:
            data = read_from_disk(self._fd)
            (k, bs, vs), self.records, valid = decode(data, path)
            if (k, bs, vs) != (kind, block_size, virtual_size):
                raise FormatError(f"{path}: journal is for kind {k}, block size {bs}, size {vs}; "
                                  f"expected {kind}, {block_size}, {virtual_size}")
            if valid < len(data):
                # Not synced on purpose: the next append's fdatasync makes the cut durable
                # with it, and a tail that comes back after a crash is cut again here.
                os.ftruncate(self._fd, valid)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self.size = valid

    def _usable(self) -> None:
        if self.failed is not None:
            raise StorageError(f"{self.path}: {self.failed}; reopen the layer to go on")

    def append(self, records: list[Record]) -> None:
        """Durably append one batch, or raise StorageError with nothing appended.

        After a failed fdatasync the journal is ``failed`` and refuses appends.
        """
        self._usable()
        if len(records) > MAX_BATCH_RECORDS:
            raise ValueError(f"{len(records)} records in one batch; at most {MAX_BATCH_RECORDS}")
        batch = encode_batch(records)
        try:
            pwrite_all(self._fd, batch, self.size)
        except OSError as exc:
            self._cut_back(exc)
            raise storage_error(f"cannot append to {self.path}", exc) from None
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self.failed = f"fdatasync failed ({exc.strerror}), the journal's tail is unknown"
            with suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise storage_error(f"cannot sync {self.path}", exc) from None
        self.size += len(batch)

    def _cut_back(self, exc: OSError) -> None:
        """Remove a partly written batch, so the next append or open sees whole batches only."""
        try:
            os.ftruncate(self._fd, self.size)
        except OSError as cut:
            self.failed = f"a partial batch could not be cut off ({exc.strerror}, then {cut.strerror})"

    def rewrite(self, records: Iterable[Record]) -> bool:
        """Replace the journal with one holding just *records* (compaction), atomically.

        False, with the old journal still in use, if the new one cannot be written
        (a full disk, say). If only the directory sync fails the journal becomes
        ``failed``: the rename may not survive a power loss, so appending to the
        new file could lose acknowledged batches.
        """
        self._usable()
        recs = list(records)
        body = encode_header(self.kind, self.block_size, self.virtual_size)
        body += b"".join(encode_batch(recs[i : i + MAX_BATCH_RECORDS]) for i in range(0, len(recs), MAX_BATCH_RECORDS))
        tmp = self.path + COMPACT_SUFFIX
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:
            self.compaction_errors += 1
            return False
        try:
            write_all(fd, body)
            os.fdatasync(fd)
            os.replace(tmp, self.path)
        except OSError:
            os.close(fd)
            with suppress(OSError):
                os.unlink(tmp)
            self.compaction_errors += 1
            return False
        os.close(self._fd)
        self._fd, self.size = fd, len(body)
        self.compactions += 1
        try:
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            self.failed = f"the compacted journal's rename could not be synced ({exc.strerror})"
        return True

    def close(self) -> None:
        if self._fd >= 0:
            with suppress(OSError):  # the fd is released either way; durability was decided by append()
                os.close(self._fd)
            self._fd = -1
