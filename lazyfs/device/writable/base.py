"""What every writable layer provides, in whole blocks; MergedDevice does the rest."""

from __future__ import annotations

import abc
import errno
import fcntl
import itertools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import suppress

from lazyfs.device.writable.journal import MAX_BATCH_RECORDS, Journal
from lazyfs.durable import pwrite_all, storage_error, write_atomically
from lazyfs.errors import BusyError, FormatError, NotFoundError, RangeError, StorageError

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
    """A layer that records written and discarded blocks under its own directory.

    Durability contract (docs/durability.md): a write is durable once a later
    flush() returns. A write or flush that fails raises StorageError with the
    kernel's errno (ENOSPC, EIO) and acknowledges nothing; the blocks a failed
    write covered may read as before or as written, every other block is
    unchanged. A failed fsync makes the layer ``failed``: from then on writes,
    discards and flushes raise StorageError(EIO) until the layer is closed and
    reopened, which reads the journal back from the disk. Reads keep working.

    ``keep_free``, if set, returns how many bytes must stay free on the layer's
    file system (the chunk cache's unused budget when both share a disk); a
    write that could eat into them fails with ENOSPC instead.
    """

    kind: str

    def __init__(self, root: str, virtual_size: int, block_size: int) -> None:
        self.root, self.size, self.block_size = root, virtual_size, block_size
        self.blocks = virtual_size // block_size
        self.writes = self.flushes = 0
        self.write_errors = self.flush_errors = self.refused_for_reserve = 0
        self.failed: str | None = None
        self.keep_free: Callable[[], int] | None = None
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self.nowait_reads = 0  # reads served from the page cache without a thread

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.blocks:
            raise RangeError(f"blocks [{start}, {start + count}) outside layer of {self.blocks} blocks")

    @abc.abstractmethod
    def lookup(self, start: int, count: int) -> list[Run]:
        """Runs covering blocks ``[start, start+count)`` with their state."""

    @abc.abstractmethod
    def _extents(self, start: int, count: int) -> list[tuple[int, int]]:
        """Where blocks ``[start, start+count)`` lie in the data file: ``(offset, length)`` pieces in
        order; offset -1 reads as zeros (a block no longer DATA: a write changed it meanwhile)."""

    def read_blocks(self, start: int, count: int) -> bytes:
        """The bytes of blocks that lookup() reports as DATA (may wait for the disk: call it in a thread)."""
        self._check(start, count)
        return b"".join(bytes(n) if at < 0 else os.pread(self._fd, n, at) for at, n in self._extents(start, count))

    def read_blocks_nowait(self, start: int, count: int) -> bytes | None:
        """read_blocks() if the page cache holds every byte, else None (then call read_blocks in a
        thread). Never waits for the disk: ``preadv(RWF_NOWAIT)``, so the event loop may call it."""
        self._check(start, count)
        if not self._nowait:
            return None
        parts = []
        for at, n in self._extents(start, count):
            if at < 0:
                parts.append(bytes(n))
                continue
            buf = bytearray(n)
            try:
                got = os.preadv(self._fd, [buf], at, os.RWF_NOWAIT)
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without RWF_NOWAIT reads
                    self._nowait = False
                return None
            if got != n:  # partly cached: the thread reads all of it
                return None
            parts.append(bytes(buf))
        self.nowait_reads += 1
        return b"".join(parts)

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
        self._fd = -1
        self._pending: list[Run] = []
        try:
            self._lock()
            self._fd = os.open(data_path, data_flags, 0o600)
            self.journal = Journal(os.path.join(self.root, journal_name), KINDS[self.kind], self.block_size,
                                   self.size, create)
        except BaseException as exc:
            self.close()
            if isinstance(exc, OSError):
                raise storage_error(f"cannot open writable layer {self.root}", exc) from None
            raise

    # ------------------------------------------------------------ the write path (subclasses call these)

    def _before_write(self, allocating: int) -> None:
        """Refuse a write to a failed layer, or one that would eat into ``keep_free``; keep batches bounded."""
        self._usable()
        if len(self._pending) >= MAX_BATCH_RECORDS:
            self.flush()  # one flush is one journal batch, and a batch has a bounded size
        if allocating and self.keep_free is not None:
            reserve = self.keep_free()
            if reserve > 0:
                st = os.fstatvfs(self._fd)
                free = st.f_bavail * st.f_frsize
                if free - allocating < reserve:
                    self.refused_for_reserve += 1
                    raise StorageError(f"writable layer {self.root}: {free} bytes free on its disk and "
                                       f"{reserve} of them are kept for the chunk cache", errno.ENOSPC)

    def _write_data(self, data: bytes, offset: int) -> None:
        """Write all of *data* to the data file, or raise StorageError (nothing recorded)."""
        try:
            pwrite_all(self._fd, data, offset)
        except OSError as exc:
            self.write_errors += 1
            raise storage_error(f"writable layer {self.root}: cannot write", exc) from None

    def _record(self, run: Run) -> None:
        self._pending.append(run)
        self.writes += 1

    def _usable(self) -> None:
        why = self.failed or getattr(self, "journal", None) and self.journal.failed
        if why:
            raise StorageError(f"writable layer {self.root} failed earlier ({why}); "
                               "it takes no writes until it is reopened", errno.EIO)

    # ------------------------------------------------------------ flush, close

    def flush(self) -> None:
        """Make every write and discard so far durable: data first, then one journal batch.

        StorageError (nothing acknowledged) if the disk refuses; after a failed
        fsync the layer is ``failed`` (see the class docstring).
        """
        self._usable()
        if not self._pending:
            return
        try:
            os.fdatasync(self._fd)  # the journal never points at data that is not on disk
        except OSError as exc:
            self.flush_errors += 1
            self.failed = f"fdatasync of its data failed ({exc.strerror}); unsynced writes may be lost"
            raise storage_error(f"writable layer {self.root}: cannot sync", exc) from None
        try:
            self.journal.append(self._pending)
        except StorageError:
            self.flush_errors += 1
            raise
        self._pending = []
        self.flushes += 1
        if self.journal.size > COMPACT_BYTES:
            # The batch above is durable in the old journal and in the new one, so a
            # compaction that fails does not fail this flush (a failed dir sync fails the next).
            self.journal.rewrite(self._journal_records())

    def close(self) -> None:
        """Release the files and the lock (unflushed writes are dropped: flush first).

        Errors of close(2) are ignored: the descriptor is gone either way, and
        durability was decided by the last flush, not here.
        """
        if getattr(self, "_fd", -1) >= 0:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if getattr(self, "journal", None) is not None:
            self.journal.close()
        fd = getattr(self, "_lock_fd", -1)
        if fd >= 0:
            with suppress(OSError):
                os.close(fd)
            self._lock_fd = -1

    def disk_usage(self) -> int:
        """Bytes the layer's files occupy on disk now (allocated blocks, not apparent size).

        By path, not by descriptor, so another thread may call it while the layer closes.
        """
        return directory_usage(self.root)

    @property
    def max_disk_bytes(self) -> int | None:
        """The most disk the layer can take, or None if it is unbounded (see docs/durability.md)."""
        return None

    def statistics(self) -> dict:
        return {"kind": self.kind, "writes": self.writes, "flushes": self.flushes, "pending": len(self._pending),
                "write_errors": self.write_errors, "flush_errors": self.flush_errors,
                "refused_for_reserve": self.refused_for_reserve,
                "compactions": self.journal.compactions, "compaction_errors": self.journal.compaction_errors,
                "failed": self.failed or self.journal.failed, "max_disk_bytes": self.max_disk_bytes}

    def _lock(self) -> None:
        self._lock_fd = os.open(os.path.join(self.root, DESCRIPTOR), os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise BusyError(f"writable layer {self.root} is in use by another process") from None


def directory_usage(path: str) -> int:
    """Bytes the files under *path* occupy on disk (0 for files that vanish while counted)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += directory_usage(entry.path)
            else:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            continue
    return total


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
