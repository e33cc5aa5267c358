"""Log writable layer: append-only data file + a journal mapping blocks to log offsets.

Best for builds and conversion: every write is a sequential append, and commit
reads the data back in one pass. Overwritten data stays in the log as garbage.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from lazyfs.device.writable.base import DATA, LOWER, ZERO, Run, WritableLayer
from lazyfs.errors import FormatError

DATA_FILE, JOURNAL_FILE = "data.log", "index.journal"
_ZERO = -1  # journal value meaning "discarded"


class LogLayer(WritableLayer):
    kind = "log"

    def __init__(self, root: str, virtual_size: int, block_size: int, create: bool) -> None:
        super().__init__(root, virtual_size, block_size)
        self._open(os.path.join(root, DATA_FILE), os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0),
                   JOURNAL_FILE, create)
        self._end = os.fstat(self._fd).st_size  # unflushed garbage after a crash is simply skipped
        self.map: dict[int, int] = {}  # block -> byte offset in the log, or _ZERO
        for start, count, value in self.journal.records:
            if count <= 0 or start + count > self.blocks or value < _ZERO or (
                    value != _ZERO and value + count * block_size > self._end):
                self.close()
                raise FormatError(f"{self.journal.path}: record ({start}, {count}, {value}) out of range")
            for i in range(count):
                self.map[start + i] = _ZERO if value == _ZERO else value + i * block_size
        self.journal.records = []

    def _state(self, block: int) -> int:
        value = self.map.get(block)
        return LOWER if value is None else ZERO if value == _ZERO else DATA

    def lookup(self, start: int, count: int) -> list[Run]:
        self._check(start, count)
        out: list[list[int]] = []
        for block in range(start, start + count):
            state = self._state(block)
            if out and out[-1][2] == state:
                out[-1][1] += 1
            else:
                out.append([block, 1, state])
        return [tuple(r) for r in out]

    def _extents(self, start: int, count: int) -> list[tuple[int, int]]:
        bs = self.block_size
        out, block = [], start
        while block < start + count:
            first = self.map.get(block, _ZERO)  # a write in a worker thread may change the map meanwhile
            if first == _ZERO:
                out.append((-1, bs))
                block += 1
                continue
            n = 1  # extend over blocks that are contiguous in the log
            while block + n < start + count and self.map.get(block + n) == first + n * bs:
                n += 1
            out.append((first, n * bs))
            block += n
        return out

    def write_blocks(self, start: int, data: bytes) -> None:
        count = len(data) // self.block_size
        self._check(start, count)
        self._before_write(len(data))
        # Appended after the end: if this fails, nothing points at the partial bytes
        # and the next write overwrites them.
        self._write_data(data, self._end)
        for i in range(count):
            self.map[start + i] = self._end + i * self.block_size
        self._record((start, count, self._end))
        self._end += len(data)

    def zero_blocks(self, start: int, count: int) -> None:
        self._check(start, count)
        self._before_write(0)
        for i in range(count):
            self.map[start + i] = _ZERO
        self._record((start, count, _ZERO))

    def _journal_records(self) -> Iterator[Run]:
        """The current map as coalesced journal records."""
        bs = self.block_size
        run: list[int] | None = None
        for block in sorted(self.map):
            value = self.map[block]
            if run and run[0] + run[1] == block and (
                (value == _ZERO and run[2] == _ZERO) or (value != _ZERO and run[2] != _ZERO and value == run[2] + run[1] * bs)
            ):
                run[1] += 1
                continue
            if run:
                yield tuple(run)
            run = [block, 1, value]
        if run:
            yield tuple(run)

    def runs(self) -> Iterator[Run]:
        run: list[int] | None = None
        for block in sorted(self.map):
            state = ZERO if self.map[block] == _ZERO else DATA
            if run and run[0] + run[1] == block and run[2] == state:
                run[1] += 1
                continue
            if run:
                yield tuple(run)
            run = [block, 1, state]
        if run:
            yield tuple(run)

