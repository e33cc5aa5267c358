"""The export tree answering decoded FUSE requests: one ``NAME/disk.img`` per block source.

The tree is fixed in shape::

    MOUNTPOINT/               root, one directory per export (0700)
    MOUNTPOINT/NAME/disk.img  a regular file of exactly ``source.size`` bytes (0600, or 0400 read-only)

Reads and writes of ``disk.img`` go straight to the export's BlockSource; the file cannot be
resized, renamed or unlinked, and nothing else can be created. Errors of a source reach the
caller as the errno ``lazyfs.errors.to_errno`` gives (a full writable root as ENOSPC); nothing a
source raises takes the session down.

Restart-safe by construction, so a new daemon can take over a live connection:

- inode numbers are chosen by the caller of ``add`` (the daemon persists them with each
  attachment) or allocated from ``next_inode`` (persisted too), never reused;
- a file handle says what it is: ``serial << 40 | inode << 1 | writable``. After a takeover
  (``adopt_handles``), a handle the kernel opened with the previous daemon is adopted at first use.
  The serial is ``generation << 12 | counter``: each daemon gets a generation of its own (one more
  than the state file's), so its ids never alias the ones the kernel holds from its predecessor.

Passthrough (``pass_through``): a read-only export whose disk is also a complete, verified local
file (a hydrated image) can have that file registered as its backing file; from then on *every*
open of its ``disk.img`` is answered with ``FOPEN_PASSTHROUGH`` and the kernel reads the local file
itself: no READ reaches the daemon. The kernel fixes an inode's I/O mode while it is open (a
passthrough open fails while a cached open exists, and the reverse), so a backing file is
registered only while the export has no open handle, opens wait for the registration, and the
export keeps its backing id until it is removed. The id is persisted with the attachment, so a
daemon taking the connection over answers opens exactly as its predecessor did (docs/warm.md §3).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from lazyfs.device.source import BLOCK_SIZE, BlockSource
from lazyfs.errors import BusyError, ConfigError, LazyfsError, NotFoundError, to_errno
from lazyfs.serve import exportio
from lazyfs.serve.exportstats import Counters, export_statistics, statistics
from lazyfs.serve.fusekernel import fastpath
from lazyfs.serve.fusekernel import protocol as p
from lazyfs.serve.fusekernel.passthrough import BackingFiles, reason
from lazyfs.serve.state import IMAGE_NAME

log = logging.getLogger(__name__)


# The tree changes only through add/remove, which invalidate the kernel's dentries;
# the attributes of an export never change size, so both can be cached for long.
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0
PREFERRED_IO = 1 << 20  # st_blksize: cp and dd pick it up; one big request costs about what a small one does

FILE_MODE_RW = 0o600  # private images: only the daemon's user (root) reads exports
FILE_MODE_RO = 0o400
DIR_MODE = 0o700
DT_DIR, DT_REG = 4, 8

_FH_SERIAL_SHIFT = 40
# the 24 bits of serial: a daemon's generation (persisted, one more at each start) and a counter
_GENERATION_SHIFT = 12
_GENERATIONS = 1 << (64 - _FH_SERIAL_SHIFT - _GENERATION_SHIFT)
_COUNTER_MAX = (1 << _GENERATION_SHIFT) - 1
_MAX_INODE = (1 << (_FH_SERIAL_SHIFT - 1)) - 1


class FuseErrno(Exception):
    """Answer the request with this errno (raised inside handlers only)."""

    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.errno = code


@dataclass(eq=False)
class Export:
    """Mutable bookkeeping for one export."""

    name: str
    source: BlockSource
    dir_inode: int
    file_inode: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    open_handles: int = 0
    removing: bool = False  # remove() is waiting for the handles to go: no new opens
    released: trio.Event | None = None  # set when a handle goes while remove() waits
    dirty: bool = False  # written since the last successful source.flush()
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    errors: int = 0
    backing_id: int = 0  # > 0: every open is passed through to this backing file of the connection
    backing_path: str | None = None
    registering: trio.Event | None = None  # set when a registration of a backing file ends; opens wait
    unknown_handles: bool = False  # restored on a taken-over connection: its open modes are not known
    passthrough_opens: int = 0
    # READs served by worker threads (ExportFS.read_local), written under ExportFS._local_lock only
    local_reads: int = 0
    local_bytes: int = 0
    local_inflight: int = 0  # reads in worker threads now: remove() waits for none before the source goes
    fast: object | None = None  # the C path's counters of its READs (fastpath.counter), with its own in-flight count
    hint_fd: int = -1  # the daemon's own open file of it, for local readahead (ExportFS.open_hint_file)
    hint_token: int = 0

    def stats(self) -> dict:
        return export_statistics(self)


@dataclass(eq=False)
class Handle:
    export: Export
    writable: bool
    planned: bool = False  # the C path answers its READs (fastpath; ExportFS.read_local registers it)


def _open_own_file(path: str, inode: int) -> int | str:
    """Open *path* read-only if it is the exported file with inode *inode* (the export mount as
    this daemon's mount namespace sees it): its fd, or why not (worker thread).

    O_DIRECT: the READs the kernel sends for a hint through it carry the flag, so the C path never
    counts them as a reader's (fadvise fills the shared page cache all the same)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror}"
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        return f"cannot stat {path}: {exc.strerror}"
    if st.st_ino != inode:
        os.close(fd)
        return f"{path} is not the exported file here (another mount namespace?)"
    return fd


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ConfigError(f"invalid export name {name!r}")
    if len(name.encode()) > 255:
        raise ConfigError(f"export name longer than 255 bytes: {name[:40]!r}...")


def handle_id(serial: int, inode: int, writable: bool) -> int:
    return serial << _FH_SERIAL_SHIFT | inode << 1 | int(writable)


def parse_handle_id(fh: int) -> tuple[int, bool]:
    """(file inode, writable) of a handle id made by ``handle_id``."""
    return (fh & ((1 << _FH_SERIAL_SHIFT) - 1)) >> 1, bool(fh & 1)


class ExportFS:
    """The export tree over the kernel protocol.

    ``add``/``remove`` change the set of exports at any time, also while mounted. ``remove``
    waits a bounded time for open handles to go, then refuses with BusyError: it never pulls a
    file from under its users. ``handle(request)`` answers one decoded request (an iovec, or
    None for requests the kernel wants no answer to); requests are handled concurrently.
    """

    def __init__(self, *, next_inode: int = p.ROOT_ID + 1, handle_generation: int = 0,
                 native_reads: bool = True) -> None:
        self._by_name: dict[str, Export] = {}
        self._by_inode: dict[int, tuple[Export, bool]] = {}  # inode -> (export, is_file)
        self._handles: dict[int, Handle] = {}
        self._next_inode = max(next_inode, p.ROOT_ID + 1)
        # Handle ids of a daemon taking the connection over must differ from those the kernel
        # holds from its predecessors (adopted only at first use): the same id twice counted one
        # open twice and the export was "still open" forever (issue 13). The daemon persists the
        # generation; the counter wraps within it, skipping ids still open.
        self.handle_generation = handle_generation % _GENERATIONS
        self._counter = 0
        self._root_times = time.time_ns()
        self.adopt_handles = False  # set after a takeover: handles of the previous daemon come back
        self.notify: Callable[[list], None] | None = None  # sends a notification (set while mounted)
        self._adopted = 0
        self._resent = 0
        self._c = Counters()
        self._local_lock = threading.Lock()  # the worker threads' counters and in-flight reads
        self._local_reads = self._local_bytes = 0
        self._local_inflight = self._local_peak = 0  # reads in worker threads now, and the most at once
        self._native_gone = (0, 0)  # READs and bytes the C path answered for exports removed since
        self.backing: BackingFiles | None = None  # set by the session when INIT settled passthrough
        self.passthrough_unavailable: str | None = None  # why backing files cannot be registered (logged once)
        self.readahead_kb: int | None = None  # the kernel's readahead on the exported files (set by the daemon)
        # the worker threads' READ path in C (None: Python answers alone); the session's threads call its serve()
        self.fast = fastpath.server(native_reads)
        self.local_readahead = 0  # bytes per local readahead window of read-only exports (0: off; docs/warm.md §4)
        self._hint_tokens = itertools.count(1)

    # -- management (called by the daemon, not by the kernel) --------------------

    @property
    def next_inode(self) -> int:
        """The next inode number ``add`` would allocate (persist it to never reuse one)."""
        return self._next_inode

    def skip_inodes_to(self, inode: int) -> None:
        """Allocate from *inode* on (at least): after a takeover without a record of the numbers
        the previous daemon used, fresh numbers must not alias ones the kernel still knows."""
        self._next_inode = max(self._next_inode, min(inode, _MAX_INODE - 2))

    def inode_of(self, name: str) -> int:
        """The directory inode of export *name* (its file is that + 1)."""
        try:
            return self._by_name[name].dir_inode
        except KeyError:
            raise NotFoundError(f"no export named {name!r}") from None

    def add(self, name: str, source: BlockSource, *, inode: int | None = None, backing_id: int = 0) -> None:
        """Export *source* as ``NAME/disk.img``; BusyError if *name* (or *inode*) is taken.

        *inode*: the directory's inode number (the file's is the next one), as a previous daemon
        chose it; by default a fresh one. *backing_id*: the backing file the previous daemon
        registered for it on this (taken-over) connection; its opens keep being passed through.
        """
        check_name(name)
        if name in self._by_name:
            raise BusyError(f"export {name!r} already exists")
        restored = inode is not None
        if inode is None:
            inode = self._next_inode
        if not (p.ROOT_ID < inode < _MAX_INODE) or inode in self._by_inode or inode + 1 in self._by_inode:
            raise BusyError(f"export {name!r}: inode {inode} is not free")
        now = time.time_ns()
        exp = Export(name, source, inode, inode + 1, now, now, now)
        if self.fast is not None:
            exp.fast = fastpath.counter()
        # an inode chosen by a previous daemon on this connection may have handles open in either mode
        exp.unknown_handles = self.adopt_handles and restored
        if backing_id and source.read_only:
            exp.backing_id = backing_id
        self._next_inode = max(self._next_inode, inode + 2)  # never reused: stale kernel inodes stay dead
        self._by_name[name] = exp
        self._by_inode[exp.dir_inode] = (exp, False)
        self._by_inode[exp.file_inode] = (exp, True)
        self._root_times = now

    async def pass_through(self, name: str, path: str, persist: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Serve every later open of read-only export *name* from local file *path*, by FUSE
        passthrough: *path* must hold exactly the export's bytes, complete and verified (a hydrated
        image). True if the export is (now) passed through; False, and no change, when this
        connection cannot (logged once), the export is open (the kernel cannot switch an open
        inode; try again once it is closed), or its open handles are unknown (after a takeover).

        *persist* runs after the registration and before any open is passed through: the daemon
        records the backing id there, so a daemon taking over answers opens the same way.
        """
        exp = self._by_name.get(name)
        if exp is None:
            raise NotFoundError(f"no export named {name!r}")
        if not exp.source.read_only:
            raise ConfigError(f"export {name!r} is writable: only read-only exports are passed through")
        if exp.backing_id:
            return True
        if self.backing is None:
            self._unavailable("the FUSE connection did not negotiate passthrough (kernel < 6.9, "
                              "CONFIG_FUSE_PASSTHROUGH off, or a connection taken over from an older daemon)")
            return False
        if exp.hint_fd >= 0 and exp.open_handles == 1:
            # only the daemon's own file (local readahead) is open: the kernel will read a local file
            await self._close_hint_file(exp)
        if exp.open_handles or exp.unknown_handles or exp.registering is not None or exp.removing:
            return False
        backing = self.backing
        exp.registering = trio.Event()
        try:
            try:
                backing_id = await trio.to_thread.run_sync(backing.open, path)
            except OSError as exc:
                self._unavailable(f"{reason(exc)} ({exc.strerror or exc})")
                return False
            exp.backing_id, exp.backing_path = backing_id, path
            if persist is not None:
                try:
                    await persist()
                except BaseException:
                    exp.backing_id, exp.backing_path = 0, None
                    self._close_backing(backing, backing_id)
                    raise
            log.info("export %s: opens are passed through to %s (backing id %d): the kernel reads it", name,
                     path, backing_id)
            return True
        finally:
            exp.registering.set()
            exp.registering = None

    def backing_id_of(self, name: str) -> int:
        """The backing id export *name* is passed through to (0: none)."""
        exp = self._by_name.get(name)
        return exp.backing_id if exp is not None else 0

    def _unavailable(self, why: str) -> None:
        if self.passthrough_unavailable is None:
            log.warning("FUSE passthrough unavailable: %s; hydrated images are served through the daemon", why)
        self.passthrough_unavailable = why

    def _close_backing(self, backing: BackingFiles | None, backing_id: int) -> None:
        if backing is None or not backing_id:
            return
        try:
            backing.close(backing_id)
        except OSError as exc:
            log.warning("FUSE_DEV_IOC_BACKING_CLOSE %d: %s", backing_id, exc)

    async def open_hint_file(self, name: str, path: str) -> str | None:
        """Open read-only export *name*'s file at *path* for local readahead: the C path asks the
        kernel, through this file, to read a window of all-local blocks into the page cache when a
        READ lands in it after two others (docs/warm.md §4). None (done, or local readahead off), or
        why not (then nothing changes).

        *path* is opened in a worker thread (the open is a request to this very FUSE server) and
        must turn out to be the export's own file; ``remove`` closes it first.
        """
        exp = self._by_name.get(name)
        if self.fast is None or self.local_readahead <= 0:
            return None  # off (or no C path): nothing to say
        if exp is None or not exp.source.read_only:
            return "not a read-only export"
        if exp.hint_fd >= 0 or exp.backing_id:  # open already, or the kernel reads a local file itself
            return None
        fd = await trio.to_thread.run_sync(_open_own_file, path, exp.file_inode)
        if isinstance(fd, str):
            return fd
        if self._by_name.get(name) is not exp or exp.removing or exp.hint_fd >= 0:  # changed meanwhile
            await trio.to_thread.run_sync(os.close, fd)
            return "the export changed while its file was opened"
        exp.hint_token = next(self._hint_tokens)
        self.fast.hint_file(fd, exp.hint_token)
        exp.hint_fd = fd
        for fh, h in list(self._handles.items()):
            if h.export is exp and h.planned:
                self._plan(fh, h)  # planned before: the new plan asks for readahead too
        return None

    async def close_hint_files(self) -> None:
        """Close the daemon's own files of the exports (before a handover: their RELEASEs are
        answered here, not adopted by the next daemon)."""
        for exp in list(self._by_name.values()):
            await self._close_hint_file(exp)

    async def _close_hint_file(self, exp: Export) -> None:
        fd, exp.hint_fd = exp.hint_fd, -1
        if fd < 0:
            return
        with trio.CancelScope(shield=True):
            # returns once the hint thread is not using it: only then may the number be reused
            await trio.to_thread.run_sync(self.fast.forget_hint_file, fd, exp.hint_token)
            exp.released = released = trio.Event()
            await trio.to_thread.run_sync(os.close, fd)
            with trio.move_on_after(2.0):  # the kernel sends the RELEASE after the close returns
                await released.wait()
            if exp.released is released:
                exp.released = None

    def hint_thread(self) -> None:
        """The local readahead thread's body (the session runs it beside the worker threads):
        returns after ``fast.stop_hints()``."""
        self.fast.hints()

    async def remove(self, name: str, *, wait: float = 5.0) -> BlockSource:
        """Stop exporting *name* and return its source (the caller closes it).

        While ``disk.img`` is open, new opens fail and this waits up to *wait* seconds for the
        open handles to go, then gives up with BusyError and leaves the export as it was.
        """
        exp = self._by_name.get(name)
        if exp is None or exp.removing:
            raise NotFoundError(f"no export named {name!r}")
        await self._close_hint_file(exp)  # the daemon's own handle: never what keeps an export busy
        if exp.open_handles:
            exp.removing = True
            try:
                with trio.move_on_after(wait):
                    while exp.open_handles:
                        exp.released = trio.Event()
                        await exp.released.wait()
            finally:
                exp.removing = False
            if exp.open_handles:
                raise BusyError(f"export {name!r} is still open {exp.open_handles} time(s); detach it first")
        del self._by_name[name]
        del self._by_inode[exp.dir_inode]
        del self._by_inode[exp.file_inode]
        with self._local_lock:
            exp.removing = True  # worker threads serve no new read of it
        with trio.CancelScope(shield=True):
            # a worker thread may still be reading through the source the caller is about to close
            # (bounded: each such read is one local preadv)
            while exp.local_inflight or (exp.fast is not None and exp.fast.inflight):
                await trio.sleep(0.001)
        exp.removing = False
        if exp.fast is not None:
            self._native_gone = (self._native_gone[0] + exp.fast.reads, self._native_gone[1] + exp.fast.bytes)
        self._close_backing(self.backing, exp.backing_id)  # no handle left: nothing can be opened through it
        exp.backing_id = 0
        self._root_times = time.time_ns()
        if self.notify is not None:
            # the kernel may hold a positive dentry for up to ENTRY_TIMEOUT: drop it now
            self.notify(p.notify_inval_entry(p.ROOT_ID, name.encode()))
        return exp.source

    def names(self) -> list[str]:
        """The current export names, sorted."""
        return sorted(self._by_name)

    def source(self, name: str) -> BlockSource:
        """The source exported as *name* (NotFoundError if none)."""
        try:
            return self._by_name[name].source
        except KeyError:
            raise NotFoundError(f"no export named {name!r}") from None

    def statistics(self) -> dict:
        """Request, byte and error counters, in total and per export (``reads``: all READs answered,
        ``local_reads`` of them in worker threads, see ``read_local``)."""
        with self._local_lock:
            st = statistics(self._c, open_handles=len(self._handles), exports=self._by_name,
                            passthrough=self.backing is not None and self.passthrough_unavailable is None,
                            adopted_handles=self._adopted,  # handles a previous daemon opened, seen again after a takeover
                            resent_requests=self._resent,  # requests in flight at a daemon's death, answered by this one
                            local_reads=self._local_reads, local_reads_peak=self._local_peak)
            native = {name: (exp.fast.reads, exp.fast.bytes) if exp.fast is not None else (0, 0)
                      for name, exp in self._by_name.items()}
            local_reads = self._local_reads + self._native_gone[0] + sum(r for r, _ in native.values())
            st["local_reads"] = local_reads
            st["native_reads"] = local_reads - self._local_reads  # of them answered in C (fastpath)
            st["native_plans"] = self.fast.plans() if self.fast is not None else 0  # handles C answers now
            st["native_reads_unavailable"] = (None if self.fast is not None
                                              else fastpath.why_unavailable() or "off (fuse_native_reads = false)")
            st["readahead_kb"] = self.readahead_kb
            hints = self.fast.hint_stats() if self.fast is not None else {}
            st["local_readahead"] = {"window": self.local_readahead if self.fast is not None else 0,
                                     "hints": sum(exp.fast.hints for exp in self._by_name.values() if exp.fast),
                                     **hints}
            st["reads"] += local_reads
            st["requests"] += local_reads
            st["bytes_read"] += self._local_bytes + self._native_gone[1] + sum(b for _, b in native.values())
            for name, exp in self._by_name.items():
                reads, nbytes = native[name]
                st["exports"][name]["reads"] += exp.local_reads + reads
                st["exports"][name]["bytes_read"] += exp.local_bytes + nbytes
                st["exports"][name]["local_reads"] = exp.local_reads + reads
                st["exports"][name]["native_reads"] = reads
                st["exports"][name]["hints"] = exp.fast.hints if exp.fast is not None else 0
        return st

    # -- the kernel's requests ------------------------------------------------------

    def read_local(self, unique: int, fh: int, offset: int, size: int) -> list | None:
        """Answer a READ in the calling worker thread if its export's source serves it from local,
        verified storage (``BlockSource.read_local``); None to hand the request to ``handle``.

        Only reads through a handle this daemon knows (adoption changes state: the trio thread's
        job) of an export not being removed; ``remove`` waits for the ones in flight.
        """
        h = self._handles.get(fh)
        if h is None:
            return None
        exp = h.export
        read_local = getattr(exp.source, "read_local", None)
        if read_local is None:
            return None
        with self._local_lock:
            if exp.removing:
                return None
            exp.local_inflight += 1
            self._local_inflight += 1
            self._local_peak = max(self._local_peak, self._local_inflight)
        try:
            data = read_local(offset, size)
            if data is not None and self.fast is not None and not h.planned:
                self._plan(fh, h)
        except Exception:  # noqa: BLE001 - the trio path reads it again and reports what it finds
            data = None
        with self._local_lock:
            exp.local_inflight -= 1
            self._local_inflight -= 1
            if data is not None:
                n = len(data)
                self._local_reads += 1
                self._local_bytes += n
                exp.local_reads += 1
                exp.local_bytes += n
        return None if data is None else p.reply(unique, data)

    def _plan(self, fh: int, h: Handle) -> None:
        """Let the C path answer the READs of handle *fh* (a worker thread, after Python served one
        from local storage). A plan must never outlive its handle: an id is reused once released,
        and a stale plan would answer a new handle with another export's bytes. So *planned* is
        set first (``_release`` discards a planned handle's plan) and the handle checked after."""
        plan = h.export.source.local_plan()
        if plan is None:
            return
        size, block_size, extents, files, counted_in = plan
        counters = (h.export.fast, *(fastpath.counter_in(owner) for owner in counted_in))
        h.planned = True
        exp = h.export
        self.fast.add(fh, counters, size, block_size, extents, files,
                      exp.hint_fd, exp.hint_token, self.local_readahead // block_size)
        if self._handles.get(fh) is not h:  # released meanwhile (or its id already reused)
            self.fast.discard(fh)

    async def handle(self, req: p.Request) -> list | None:
        """Answer *req*: an iovec to write to /dev/fuse, or None when no answer is due."""
        h = req.header
        op = h.opcode
        if op in p.NO_REPLY:
            return None  # forget: inodes live as long as their export; interrupt: requests finish quickly
        self._c.requests += 1
        if h.resent:
            self._resent += 1
        try:
            return await self._dispatch(req)
        except FuseErrno as exc:
            if not (op == p.LOOKUP and exc.errno == errno.ENOENT or exc.errno == errno.ENOSYS):
                self._c.errors += 1  # lookup misses are routine; ENOSYS (xattrs...) makes the kernel stop asking
            return p.error_reply(h.unique, exc.errno)
        except Exception as exc:  # noqa: BLE001 - a source's failure must not take the session down
            self._c.errors += 1
            code = to_errno(exc)
            name = p.OPCODE_NAMES.get(op, str(op))
            if isinstance(exc, (LazyfsError, OSError)):
                log.warning("fuse %s(node %d) failed: %s (-> %s)", name, h.nodeid, exc, errno.errorcode.get(code, code))
            else:
                self._c.failures += 1
                log.exception("fuse %s(node %d): unexpected error (-> EIO)", name, h.nodeid)
            return p.error_reply(h.unique, code)

    async def _dispatch(self, req: p.Request) -> list:
        h, a, u = req.header, req.args, req.header.unique
        op = h.opcode
        if op == p.READ:
            return p.reply(u, await self._read(a))
        if op == p.WRITE:
            return p.reply(u, p.write_out(await self._write(a)))
        if op == p.LOOKUP:
            return p.reply(u, p.entry_out(self._lookup(h.nodeid, a.name), ENTRY_TIMEOUT, ATTR_TIMEOUT))
        if op == p.GETATTR:
            return p.reply(u, p.attr_out(self._attr(h.nodeid), ATTR_TIMEOUT))
        if op == p.SETATTR:
            return p.reply(u, p.attr_out(self._setattr(h.nodeid, a), ATTR_TIMEOUT))
        if op == p.OPEN:
            return p.reply(u, await self._open(h.nodeid, a.flags))
        if op == p.FLUSH:
            handle = self._handle(a.fh)
            if handle.writable and handle.export.dirty:
                await self._flush_source(handle.export)  # close(2) reports a failed flush
            return p.reply(u)
        if op == p.FSYNC:
            self._c.fsyncs += 1
            handle = self._handle(a.fh)
            if not handle.export.source.read_only:
                await self._flush_source(handle.export)
            return p.reply(u)
        if op == p.RELEASE:
            self._release(a.fh)
            return p.reply(u)
        if op == p.OPENDIR:
            self._opendir(h.nodeid)
            return p.reply(u, p.open_out(h.nodeid))  # directory handles carry no state: the inode is enough
        if op == p.READDIR:
            return p.reply(u, self._readdir(a.fh, a.offset, a.size))
        if op in (p.RELEASEDIR, p.FSYNCDIR, p.ACCESS, p.DESTROY):
            return p.reply(u)  # stateless directories; default_permissions makes the kernel check access
        if op == p.STATFS:
            return p.reply(u, self._statfs())
        if op in p.NAMESPACE_CHANGES:
            raise FuseErrno(errno.EPERM)  # the namespace is managed by the daemon
        raise FuseErrno(errno.ENOSYS)

    # -- attributes ---------------------------------------------------------------

    def _attr(self, inode: int) -> p.Attr:
        if inode == p.ROOT_ID:
            t = self._root_times
            return p.Attr(inode, stat.S_IFDIR | DIR_MODE, 2 + len(self._by_name), atime_ns=t, mtime_ns=t, ctime_ns=t,
                          blksize=PREFERRED_IO)
        try:
            exp, is_file = self._by_inode[inode]
        except KeyError:
            raise FuseErrno(errno.ENOENT) from None
        times = {"atime_ns": exp.atime_ns, "mtime_ns": exp.mtime_ns, "ctime_ns": exp.ctime_ns}
        if is_file:
            mode = stat.S_IFREG | (FILE_MODE_RO if exp.source.read_only else FILE_MODE_RW)
            return p.Attr(inode, mode, 1, exp.source.size, blksize=PREFERRED_IO, **times)
        return p.Attr(inode, stat.S_IFDIR | DIR_MODE, 2, blksize=PREFERRED_IO, **times)

    def _lookup(self, parent: int, name: bytes) -> p.Attr:
        if parent == p.ROOT_ID:
            exp = self._by_name.get(os.fsdecode(name))
            if exp is not None:
                return self._attr(exp.dir_inode)
        else:
            entry = self._by_inode.get(parent)
            if entry is not None and not entry[1] and name == IMAGE_NAME.encode():
                return self._attr(entry[0].file_inode)
        raise FuseErrno(errno.ENOENT)

    def _setattr(self, inode: int, a: p.SetAttr) -> p.Attr:
        current = self._attr(inode)
        if a.valid & p.FATTR_SIZE and a.size != current.size:
            raise FuseErrno(errno.EPERM)  # an export is a window on a fixed-size device; O_TRUNC lands here too
        if a.valid & (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID):
            raise FuseErrno(errno.EPERM)  # mode and owner say whether it is writable: changing them would lie
        entry = self._by_inode.get(inode)
        if entry is not None:
            exp, now = entry[0], time.time_ns()  # times are harmless and losetup/qemu/touch set them: keep them
            if a.valid & p.FATTR_ATIME_NOW:
                exp.atime_ns = now
            elif a.valid & p.FATTR_ATIME:
                exp.atime_ns = a.atime_ns
            if a.valid & p.FATTR_MTIME_NOW:
                exp.mtime_ns = now
            elif a.valid & p.FATTR_MTIME:
                exp.mtime_ns = a.mtime_ns
            exp.ctime_ns = now
        return self._attr(inode)

    def _statfs(self) -> bytes:
        total = sum(e.source.size for e in self._by_name.values())
        return p.statfs_out((total + BLOCK_SIZE - 1) // BLOCK_SIZE, 0, 0, 1 + 2 * len(self._by_name), 0,
                            PREFERRED_IO, 255, BLOCK_SIZE)

    # -- directories --------------------------------------------------------------

    def _opendir(self, inode: int) -> None:
        if inode != p.ROOT_ID:
            entry = self._by_inode.get(inode)
            if entry is None:
                raise FuseErrno(errno.ENOENT)
            if entry[1]:
                raise FuseErrno(errno.ENOTDIR)

    def _readdir(self, fh: int, offset: int, size: int) -> bytes:
        out = bytearray()
        if fh == p.ROOT_ID:
            # Offsets are directory inode numbers: never reused and increasing with age, so an
            # export added or removed mid-listing is neither repeated nor makes another skipped.
            for exp in sorted(self._by_name.values(), key=lambda e: e.dir_inode):
                if exp.dir_inode <= offset:
                    continue
                ent = p.dirent(exp.dir_inode, exp.dir_inode, exp.name.encode(), DT_DIR)
                if len(out) + len(ent) > size:
                    break
                out += ent
            return bytes(out)
        entry = self._by_inode.get(fh)
        if entry is None or offset != 0:
            return b""  # removed while listed: an empty directory is the truthful answer
        ent = p.dirent(entry[0].file_inode, 1, IMAGE_NAME.encode(), DT_REG)
        return ent if len(ent) <= size else b""

    # -- the exported file --------------------------------------------------------

    async def _open(self, inode: int, flags: int) -> bytes:
        entry = self._by_inode.get(inode)
        if entry is None:
            raise FuseErrno(errno.ENOENT)
        exp, is_file = entry
        if not is_file:
            raise FuseErrno(errno.EISDIR)
        while exp.registering is not None:  # decided by the registration: passed through or not
            await exp.registering.wait()
        if exp.removing or self._by_inode.get(inode) is not entry:
            raise FuseErrno(errno.ENOENT)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and exp.source.read_only:
            raise FuseErrno(errno.EROFS)
        fh = self._new_handle_id(exp.file_inode, writable)
        self._handles[fh] = Handle(exp, writable)
        exp.open_handles += 1
        self._c.opens += 1
        if exp.backing_id:
            # the kernel reads (and would write: read-only here) the backing file itself
            exp.passthrough_opens += 1
            self._c.passthrough_opens += 1
            return p.open_out(fh, no_flush=True, backing_id=exp.backing_id)
        # Not direct_io: the page cache stays in play for buffered users (qemu cache=writeback,
        # cp, mkfs) and mmap works; the loop device's O_DIRECT I/O bypasses it anyway.
        # keep_cache only for read-only exports: their bytes never change between opens.
        # no_flush for read-only exports: nothing to flush, and close(2) then never waits for the
        # daemon (say, while a restarted one is taking the connection over)
        return p.open_out(fh, keep_cache=exp.source.read_only, no_flush=exp.source.read_only)

    def _new_handle_id(self, inode: int, writable: bool) -> int:
        for _ in range(_COUNTER_MAX):
            self._counter = self._counter % _COUNTER_MAX + 1
            fh = handle_id(self.handle_generation << _GENERATION_SHIFT | self._counter, inode, writable)
            if fh not in self._handles:
                return fh
        raise FuseErrno(errno.ENFILE)  # every id of this generation for this file is open

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is not None:
            return h
        if self.adopt_handles:
            # opened through a daemon that died: the id says which file and how
            inode, writable = parse_handle_id(fh)
            entry = self._by_inode.get(inode)
            if entry is not None and entry[1] and not (writable and entry[0].source.read_only):
                h = self._handles[fh] = Handle(entry[0], writable)
                entry[0].open_handles += 1
                self._adopted += 1
                return h
        raise FuseErrno(errno.EBADF)

    async def _read(self, a: p.Read) -> bytes:
        return await exportio.read(self._c, self._handle(a.fh).export, a.offset, a.size)

    async def _write(self, a: p.Write) -> int:
        h = self._handle(a.fh)
        return await exportio.write(self._c, h.export, h.writable, a.offset, a.data, FuseErrno)

    async def _flush_source(self, exp: Export) -> None:
        await exportio.flush(self._c, exp)

    def _release(self, fh: int) -> None:
        # No answer can carry an error from release; it must only drop the handle.
        try:
            h = self._handle(fh)
        except FuseErrno:
            return  # already released (a resent RELEASE) or never known
        del self._handles[fh]
        if h.planned:
            self.fast.discard(fh)  # a C read of it in flight finishes; no new one starts
        h.export.open_handles -= 1
        if h.export.released is not None:
            h.export.released.set()
