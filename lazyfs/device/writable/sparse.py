"""Sparse writable layer: data at its own offset in a sparse file + a journal of block states.

Best for a running container or VM: overwrites happen in place, so the data
file never grows beyond the device size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator

from lazyfs.device.writable.base import DATA, KINDS, LOWER, ZERO, Run, WritableLayer, state_runs
from lazyfs.device.writable.journal import Journal
from lazyfs.errors import FormatError

DATA_FILE, JOURNAL_FILE = "data", "map.journal"
COMPACT_BYTES = 8 << 20  # rewrite the journal once it grows past this
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk space of a byte range (it then reads as zeros); best effort."""
    _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset), ctypes.c_long(length))


class SparseLayer(WritableLayer):
    kind = "sparse"

    def __init__(self, root: str, virtual_size: int, block_size: int, create: bool) -> None:
        super().__init__(root, virtual_size, block_size)
        self._lock()
        path = os.path.join(root, DATA_FILE)
        if create:
            with open(path, "wb") as f:
                f.truncate(virtual_size)
        self._fd = os.open(path, os.O_RDWR)
        if os.fstat(self._fd).st_size != virtual_size:
            raise FormatError(f"{path}: size {os.fstat(self._fd).st_size}, expected {virtual_size}")
        self.journal = Journal(os.path.join(root, JOURNAL_FILE), KINDS["sparse"], block_size, virtual_size, create)
        self.state = bytearray(self.blocks)
        for start, count, value in self.journal.records:
            if value not in (LOWER, DATA, ZERO) or start + count > self.blocks or count <= 0:
                raise FormatError(f"{self.journal.path}: record ({start}, {count}, {value}) out of range")
            self.state[start : start + count] = bytes([value]) * count
        self.journal.records = []
        self._pending: list[Run] = []

    def lookup(self, start: int, count: int) -> list[Run]:
        self._check(start, count)
        return state_runs(self.state[start : start + count], start)

    def read_blocks(self, start: int, count: int) -> bytes:
        self._check(start, count)
        return os.pread(self._fd, count * self.block_size, start * self.block_size)

    def write_blocks(self, start: int, data: bytes) -> None:
        count = len(data) // self.block_size
        self._check(start, count)
        os.pwrite(self._fd, data, start * self.block_size)
        self.state[start : start + count] = bytes([DATA]) * count
        self._pending.append((start, count, DATA))
        self.writes += 1

    def zero_blocks(self, start: int, count: int) -> None:
        self._check(start, count)
        punch_hole(self._fd, start * self.block_size, count * self.block_size)
        self.state[start : start + count] = bytes([ZERO]) * count
        self._pending.append((start, count, ZERO))
        self.writes += 1

    def flush(self) -> None:
        if not self._pending:
            return
        os.fdatasync(self._fd)  # data first: the journal never points at unwritten blocks
        self.journal.append(self._pending)
        self._pending = []
        self.flushes += 1
        if self.journal.size > COMPACT_BYTES:
            self.journal.rewrite(self.runs())

    def runs(self) -> Iterator[Run]:
        for run in state_runs(self.state, 0):
            if run[2] != LOWER:
                yield run

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.journal.close()
        super().close()
