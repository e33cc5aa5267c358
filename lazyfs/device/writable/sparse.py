"""Sparse writable layer: data at its own offset in a sparse file + a journal of block states.

Best for a running container or VM: overwrites happen in place, so the data
file never grows beyond the device size.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

from lazyfs.device.writable.base import COMPACT_BYTES, DATA, LOWER, ZERO, Run, WritableLayer, state_runs
from lazyfs.durable import storage_error
from lazyfs.errors import FormatError

DATA_FILE, JOURNAL_FILE = "data", "map.journal"
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process runs on (find_library spawns ldconfig)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk space of a byte range (it then reads as zeros); best effort."""
    _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset), ctypes.c_long(length))


class SparseLayer(WritableLayer):
    kind = "sparse"

    def __init__(self, root: str, virtual_size: int, block_size: int, create: bool) -> None:
        super().__init__(root, virtual_size, block_size)
        path = os.path.join(root, DATA_FILE)
        self._open(path, os.O_RDWR | (os.O_CREAT if create else 0), JOURNAL_FILE, create)
        try:
            if create:
                os.ftruncate(self._fd, virtual_size)
                os.fsync(self._fd)  # the size is metadata: without this a new layer can come back empty
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            self.close()
            raise storage_error(f"cannot create writable layer {root}", exc) from None
        if size != virtual_size:
            self.close()
            raise FormatError(f"{path}: size {size}, expected {virtual_size}")
        self.state = bytearray(self.blocks)
        for start, count, value in self.journal.records:
            if value not in (LOWER, DATA, ZERO) or start + count > self.blocks or count <= 0:
                self.close()
                raise FormatError(f"{self.journal.path}: record ({start}, {count}, {value}) out of range")
            self.state[start : start + count] = bytes([value]) * count
        self.journal.records = []

    def lookup(self, start: int, count: int) -> list[Run]:
        self._check(start, count)
        return state_runs(self.state[start : start + count], start)

    def _extents(self, start: int, count: int) -> list[tuple[int, int]]:
        return [(start * self.block_size, count * self.block_size)]

    def write_blocks(self, start: int, data: bytes) -> None:
        count = len(data) // self.block_size
        self._check(start, count)
        # blocks not yet DATA are holes in the data file: writing them takes disk space
        self._before_write((count - self.state.count(DATA, start, start + count)) * self.block_size)
        # Holes first: only they take space, so a write that fails for lack of it has not
        # touched the DATA blocks yet, and the others keep their state: nothing visible changes.
        # (An EIO on a DATA block may leave it half new, as a failed write on a disk does.)
        bs = self.block_size
        runs = state_runs(self.state[start : start + count], start)
        for run_start, run_count, state in sorted(runs, key=lambda r: r[2] == DATA):
            offset = (run_start - start) * bs
            self._write_data(data[offset : offset + run_count * bs], run_start * bs)
        self.state[start : start + count] = bytes([DATA]) * count
        self._record((start, count, DATA))

    def zero_blocks(self, start: int, count: int) -> None:
        self._check(start, count)
        self._before_write(0)
        punch_hole(self._fd, start * self.block_size, count * self.block_size)
        self.state[start : start + count] = bytes([ZERO]) * count
        self._record((start, count, ZERO))

    @property
    def max_disk_bytes(self) -> int:
        """The data file never grows past the device size; the journal is compacted past COMPACT_BYTES."""
        return self.size + 2 * COMPACT_BYTES

    def runs(self) -> Iterator[Run]:
        for run in state_runs(self.state, 0):
            if run[2] != LOWER:
                yield run

    def _journal_records(self) -> Iterator[Run]:
        return self.runs()
