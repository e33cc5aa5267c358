"""What every writable layer provides, in whole blocks; MergedDevice does the rest."""

from __future__ import annotations

import abc
import fcntl
import itertools
import json
import os
from collections.abc import Iterator

from lazyfs.device.writable.journal import Journal, write_atomically
from lazyfs.errors import BusyError, FormatError, NotFoundError, RangeError

LOWER, DATA, ZERO = 0, 1, 2  # block states: fall through / written here / discarded here
KINDS = {"sparse": 1, "log": 2}
DESCRIPTOR = "layer.json"
COMPACT_BYTES = 8 << 20  # rewrite a journal once it grows past this

Run = tuple[int, int, int]  # (start block, block count, state)


def state_runs(states: bytes | bytearray, start: int) -> list[Run]:
    """Group a per-block state array into runs, numbered from *start*."""
    out, pos = [], start
    for state, group in itertools.groupby(states):
        n = sum(1 for _ in group)
        out.append((pos, n, state))
        pos += n
    return out


class WritableLayer(abc.ABC):
    """A layer that records written and discarded blocks under its own directory."""

    kind: str

    def __init__(self, root: str, virtual_size: int, block_size: int) -> None:
        self.root, self.size, self.block_size = root, virtual_size, block_size
        self.blocks = virtual_size // block_size
        self.writes = self.flushes = 0

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.blocks:
            raise RangeError(f"blocks [{start}, {start + count}) outside layer of {self.blocks} blocks")

    @abc.abstractmethod
    def lookup(self, start: int, count: int) -> list[Run]:
        """Runs covering blocks ``[start, start+count)`` with their state."""

    @abc.abstractmethod
    def read_blocks(self, start: int, count: int) -> bytes:
        """The bytes of blocks that lookup() reports as DATA."""

    @abc.abstractmethod
    def write_blocks(self, start: int, data: bytes) -> None:
        """Store whole blocks."""

    @abc.abstractmethod
    def zero_blocks(self, start: int, count: int) -> None:
        """Make blocks read as zeros, hiding lower layers."""

    @abc.abstractmethod
    def runs(self) -> Iterator[Run]:
        """Every DATA and ZERO run, ascending (what commit turns into a layer)."""

    @abc.abstractmethod
    def _journal_records(self) -> Iterator[Run]:
        """The whole current state as journal records (for compaction)."""

    def _open(self, data_path: str, data_flags: int, journal_name: str, create: bool) -> None:
        """Lock the layer, open its data file and replay its journal into ``self.journal.records``."""
        self._lock()
        self._fd = os.open(data_path, data_flags, 0o600)
        self.journal = Journal(os.path.join(self.root, journal_name), KINDS[self.kind], self.block_size, self.size, create)
        self._pending: list[Run] = []

    def flush(self) -> None:
        """Make every acknowledged write and discard durable: data first, then one journal batch."""
        if not self._pending:
            return
        os.fdatasync(self._fd)  # the journal never points at data that is not on disk
        self.journal.append(self._pending)
        self._pending = []
        self.flushes += 1
        if self.journal.size > COMPACT_BYTES:
            self.journal.rewrite(self._journal_records())

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1
            self.journal.close()
        fd = getattr(self, "_lock_fd", -1)
        if fd >= 0:
            os.close(fd)
            self._lock_fd = -1

    def statistics(self) -> dict:
        return {"kind": self.kind, "writes": self.writes, "flushes": self.flushes}

    def _lock(self) -> None:
        self._lock_fd = os.open(os.path.join(self.root, DESCRIPTOR), os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise BusyError(f"writable layer {self.root} is in use by another process") from None


def write_descriptor(root: str, kind: str, virtual_size: int, block_size: int, base: str | None) -> None:
    doc = {"format": "lazyfs-writable", "version": 1, "kind": kind, "virtual_size": virtual_size,
           "block_size": block_size, "base": base}
    write_atomically(os.path.join(root, DESCRIPTOR), json.dumps(doc, indent=1).encode())


def read_descriptor(root: str) -> dict:
    path = os.path.join(root, DESCRIPTOR)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise NotFoundError(f"{root} is not a writable layer (no {DESCRIPTOR})") from None
    except ValueError as exc:
        raise FormatError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != "lazyfs-writable" or doc.get("kind") not in KINDS:
        raise FormatError(f"{path}: not a lazyfs writable layer descriptor")
    for key in ("virtual_size", "block_size"):
        if type(doc.get(key)) is not int or doc[key] <= 0:
            raise FormatError(f"{path}: {key} missing or invalid")
    if doc["virtual_size"] % doc["block_size"]:
        raise FormatError(f"{path}: virtual_size is not a multiple of block_size")
    return doc
