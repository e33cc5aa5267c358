"""Export block sources as regular files over FUSE (pyfuse3 + trio).

The tree is fixed in shape::

    MOUNTPOINT/               root, one directory per export
    MOUNTPOINT/NAME/disk.img  a regular file of exactly ``source.size`` bytes

Reads and writes of ``disk.img`` go straight to the export's BlockSource; the
file cannot be resized, renamed or unlinked, and nothing else can be created.
The file is meant to be attached with ``losetup --direct-io=on`` (see
``lazyfs.serve.system``) or handed to qemu as a raw drive.

pyfuse3 runs every request as a trio task in the thread that called
``serve``, so that thread must never touch the mount synchronously (stat,
open, losetup, mount ...): the request would wait for a reply only that same
thread can send. Shell out with ``trio.run_process`` or use a thread.
pyfuse3 keeps one session per process, so ``serve`` runs at most once at a time.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pyfuse3
import trio

from lazyfs.device.source import BLOCK_SIZE, BlockSource
from lazyfs.errors import BusyError, ConfigError, LazyfsError, NotFoundError, to_errno
from lazyfs.serve import exportio, hostns, system
from lazyfs.serve.exportstats import Counters, export_statistics, statistics
from lazyfs.serve.state import IMAGE_NAME

log = logging.getLogger(__name__)


DEFAULT_OPTIONS: frozenset[str] = frozenset({
    "fsname=lazyfs",
    "subtype=lazyfs",  # shows up as fuse.lazyfs in /proc/self/mountinfo
    "allow_other",  # qemu, runc and loop workers may run as other users
    "default_permissions",  # the kernel enforces the 0400/0600 modes for non-root callers
    # Never "max_read=...": on this libfuse/kernel pair it kills the session. The kernel
    # already negotiates 1 MiB requests (FUSE_MAX_PAGES, libfuse's 1 MiB buffer) on its own.
})

# The tree changes only through add/remove, which invalidate the kernel's dentries;
# the attributes of an export never change size, so both can be cached for long.
_ENTRY_TIMEOUT = 60.0
_ATTR_TIMEOUT = 60.0
# st_blksize: the preferred I/O size tools like cp and dd pick up; one big request
# costs about as much Python time (~45 us) as a small one.
_PREFERRED_IO = 1 << 20

_FILE_MODE_RW = 0o600  # private images: only the daemon's user (root) reads exports
_FILE_MODE_RO = 0o400
_DIR_MODE = 0o700

_session_active = False


def _handler(op: str):
    """Count the request and turn every exception into a FUSEError.

    Only FUSEError may leave a pyfuse3 handler: anything else propagates out of
    pyfuse3.main(), leaves the request unanswered and brings the daemon down.
    """

    def wrap(fn):
        @functools.wraps(fn)
        async def wrapper(self: ExportFS, *args):
            self._c.requests += 1
            try:
                return await fn(self, *args)
            except pyfuse3.FUSEError as exc:
                if not (op == "lookup" and exc.errno == errno.ENOENT):  # misses are routine
                    self._c.errors += 1
                raise
            except Exception as exc:  # noqa: BLE001 - the whole point is to catch everything
                self._c.errors += 1
                code = to_errno(exc)
                if isinstance(exc, (LazyfsError, OSError)):
                    log.warning("fuse %s%r failed: %s (-> %s)", op, args[:2], exc, errno.errorcode.get(code, code))
                else:
                    self._c.failures += 1
                    log.exception("fuse %s%r: unexpected error (-> EIO)", op, args[:2])
                raise pyfuse3.FUSEError(code) from None

        return wrapper

    return wrap


@dataclass(eq=False)
class _Export:
    """Mutable bookkeeping for one export (private to ExportFS)."""

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

    def stats(self) -> dict:
        return export_statistics(self)  # never passed through: pyfuse3 cannot register backing files


@dataclass(eq=False)
class _Handle:
    export: _Export
    writable: bool


class ExportFS(pyfuse3.Operations):
    """A FUSE file system exporting BlockSources as ``NAME/disk.img``.

    ``add``/``remove`` change the set of exports at any time, also while mounted.
    ``remove`` waits a bounded time for open handles to go, then refuses with
    BusyError (a loop device still attached, say): it never pulls a file from
    under its users. Handlers run concurrently; each answers with the source's data
    or an errno from ``lazyfs.errors.to_errno``, and never takes the daemon down.
    """

    supports_dot_lookup = False  # no NFS export, so the kernel never looks up "." / ".."
    enable_writeback_cache = False  # writes reach the source before write() returns
    enable_acl = False

    def __init__(self) -> None:
        super().__init__()
        self._by_name: dict[str, _Export] = {}
        self._by_inode: dict[int, tuple[_Export, bool]] = {}  # inode -> (export, is_file)
        self._handles: dict[int, _Handle] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._next_fh = 1
        self._root_times = time.time_ns()
        self._mounted = False
        self._c = Counters()

    # -- management (called by the daemon, not by the kernel) --------------------

    def add(self, name: str, source: BlockSource) -> None:
        """Export *source* as ``NAME/disk.img``; BusyError if *name* is taken."""
        _check_name(name)
        if name in self._by_name:
            raise BusyError(f"export {name!r} already exists")
        now = time.time_ns()
        exp = _Export(name, source, self._next_inode, self._next_inode + 1, now, now, now)
        self._next_inode += 2  # inode numbers are never reused, so stale kernel inodes stay dead
        self._by_name[name] = exp
        self._by_inode[exp.dir_inode] = (exp, False)
        self._by_inode[exp.file_inode] = (exp, True)
        self._root_times = now

    async def remove(self, name: str, *, wait: float = 5.0) -> BlockSource:
        """Stop exporting *name* and return its source (the caller closes it).

        While ``disk.img`` is open, new opens fail and this waits up to *wait*
        seconds for the open handles to go (the kernel sends RELEASE after
        close(2) or ``losetup -d`` has returned, so a short wait is normal), then
        gives up with BusyError and leaves the export as it was.
        """
        exp = self._by_name.get(name)
        if exp is None or exp.removing:
            raise NotFoundError(f"no export named {name!r}")
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
        self._root_times = time.time_ns()
        if self._mounted:
            # The kernel may hold a positive dentry for up to _ENTRY_TIMEOUT; drop it now.
            # The async variant runs in pyfuse3's notify thread, so it cannot deadlock
            # against a request this thread is serving.
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name.encode(), ignore_enoent=True)
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
        """Request, byte and error counters, in total and per export."""
        return statistics(self._c, open_handles=len(self._handles), exports=self._by_name, passthrough=False)

    # -- attributes ---------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = _ENTRY_TIMEOUT
        a.attr_timeout = _ATTR_TIMEOUT
        a.st_uid = 0
        a.st_gid = 0
        a.st_blksize = _PREFERRED_IO
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | _DIR_MODE
            a.st_nlink = 2 + len(self._by_name)
            a.st_size = 0
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._root_times
            return a
        try:
            exp, is_file = self._by_inode[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = exp.atime_ns, exp.mtime_ns, exp.ctime_ns
        if is_file:
            a.st_mode = stat.S_IFREG | (_FILE_MODE_RO if exp.source.read_only else _FILE_MODE_RW)
            a.st_nlink = 1
            a.st_size = exp.source.size
            a.st_blocks = (exp.source.size + 511) // 512
        else:
            a.st_mode = stat.S_IFDIR | _DIR_MODE
            a.st_nlink = 2
            a.st_size = 0
        return a

    @_handler("lookup")
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE:
            exp = self._by_name.get(os.fsdecode(name))
            if exp is not None:
                return self._attr(exp.dir_inode)
        else:
            entry = self._by_inode.get(parent_inode)
            if entry is not None and not entry[1] and name == IMAGE_NAME.encode():
                return self._attr(entry[0].file_inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_handler("getattr")
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @_handler("setattr")
    async def setattr(self, inode, attr, fields, fh, ctx):
        current = self._attr(inode)
        if fields.update_size and attr.st_size != current.st_size:
            # An export is a window on a fixed-size device; O_TRUNC lands here too.
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            # Mode and owner say whether the export is writable; pretending to change them would lie.
            raise pyfuse3.FUSEError(errno.EPERM)
        entry = self._by_inode.get(inode)
        if entry is not None:
            # Times are harmless and losetup/qemu/touch may set them: keep them.
            exp = entry[0]
            now = time.time_ns()
            if fields.update_atime:
                exp.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                exp.mtime_ns = attr.st_mtime_ns
            exp.ctime_ns = now
        return self._attr(inode)

    @_handler("statfs")
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = _PREFERRED_IO
        s.f_frsize = BLOCK_SIZE
        total = sum(e.source.size for e in self._by_name.values())
        s.f_blocks = (total + BLOCK_SIZE - 1) // BLOCK_SIZE
        s.f_bfree = s.f_bavail = 0
        s.f_files = 1 + 2 * len(self._by_name)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories --------------------------------------------------------------

    @_handler("opendir")
    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            entry = self._by_inode.get(inode)
            if entry is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if entry[1]:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode  # directory handles carry no state: the inode is enough

    @_handler("readdir")
    async def readdir(self, fh, start_id, token):
        if fh == pyfuse3.ROOT_INODE:
            # Offsets are directory inode numbers: never reused, increasing with
            # age, so an export added or removed mid-listing is neither repeated
            # nor makes another one skipped.
            for exp in sorted(self._by_name.values(), key=lambda e: e.dir_inode):
                if exp.dir_inode <= start_id:
                    continue
                if not pyfuse3.readdir_reply(token, exp.name.encode(), self._attr(exp.dir_inode), exp.dir_inode):
                    return
            return
        entry = self._by_inode.get(fh)
        if entry is None:
            return  # removed while listed: an empty directory is the truthful answer
        if start_id == 0:
            pyfuse3.readdir_reply(token, IMAGE_NAME.encode(), self._attr(entry[0].file_inode), 1)

    async def releasedir(self, fh):
        """Directory handles hold no state: nothing to release."""

    async def fsyncdir(self, fh, datasync):
        """The tree is fixed in memory: nothing to make durable."""

    async def forget(self, inode_list):
        pass  # inodes live as long as their export, not as long as the kernel knows them

    # -- the namespace is managed by the daemon -----------------------------------

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- the exported file --------------------------------------------------------

    @_handler("open")
    async def open(self, inode, flags, ctx):
        entry = self._by_inode.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        exp, is_file = entry
        if not is_file:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if exp.removing:
            raise pyfuse3.FUSEError(errno.ENOENT)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and exp.source.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(exp, writable)
        exp.open_handles += 1
        self._c.opens += 1
        # direct_io=False: the page cache stays in play for buffered users (qemu
        # cache=writeback, cp, mkfs), whose big readahead/writeback requests amortise
        # the per-request Python cost, and mmap keeps working. A writable image's loop
        # device uses O_DIRECT and bypasses this cache (ext4's is the only copy); a
        # read-only image's loop is buffered by default, so re-reads are served from this
        # cache by the kernel, at the price of a second copy (docs/warm.md).
        # keep_cache only for read-only exports: their bytes never change, so cached
        # pages stay valid across opens. A writable source might be changed by other
        # front ends between opens, so its cache is dropped at each open.
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=exp.source.read_only)

    def _handle(self, fh: int) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    @_handler("read")
    async def read(self, fh, off, size):
        return await exportio.read(self._c, self._handle(fh).export, off, size)

    @_handler("write")
    async def write(self, fh, off, buf):
        h = self._handle(fh)
        return await exportio.write(self._c, h.export, h.writable, off, buf, pyfuse3.FUSEError)

    async def _flush_source(self, exp: _Export) -> None:
        await exportio.flush(self._c, exp)

    @_handler("flush")
    async def flush(self, fh):
        # Called at every close(2). Flushing there lets close report a failed
        # flush, but only when this export was written since the last flush:
        # read-only opens and closes stay free.
        h = self._handle(fh)
        if h.writable and h.export.dirty:
            await self._flush_source(h.export)

    @_handler("fsync")
    async def fsync(self, fh, datasync):
        self._c.fsyncs += 1
        h = self._handle(fh)
        if not h.export.source.read_only:
            await self._flush_source(h.export)

    async def release(self, fh):
        # No reply can carry an error from release; it must only drop the handle.
        h = self._handles.pop(fh, None)
        if h is not None:
            h.export.open_handles -= 1
            if h.export.released is not None:
                h.export.released.set()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ConfigError(f"invalid export name {name!r}")
    if len(name.encode()) > 255:
        raise ConfigError(f"export name longer than 255 bytes: {name[:40]!r}...")


async def serve(
    mountpoint: str | os.PathLike,
    fs: ExportFS,
    *,
    options: Iterable[str] = DEFAULT_OPTIONS,
    max_tasks: int = 64,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount *fs* at *mountpoint* and serve requests until cancelled or unmounted.

    ``task_status.started()`` is reported once the mount exists; requests are
    answered as soon as the caller yields to trio. At most *max_tasks* requests
    are handled concurrently. The mount is removed on the way out (a lazy
    unmount when files are still open). BusyError if a session already runs in
    this process (pyfuse3 supports only one).
    """
    global _session_active
    opts = set(options)
    if any(o.startswith("max_read") for o in opts):
        raise ConfigError("the max_read mount option is not supported (it kills the session)")
    if _session_active:
        raise BusyError("a FUSE session is already running in this process")
    _session_active = True
    namespace = hostns.configured()
    try:
        if namespace is None:
            pyfuse3.init(fs, os.fspath(mountpoint), opts)
        else:
            # mounted in the host's namespace, where losetup/containerd/qemu see it (see hostns)
            await _init_in_namespace(fs, mountpoint, opts, namespace)
        try:
            fs._mounted = True
            log.info("serving FUSE exports at %s%s", mountpoint, f" in {namespace.path}" if namespace else "")
            task_status.started()
            await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        finally:
            fs._mounted = False
            pyfuse3.close(unmount=True)  # libfuse unmounts only what it mounted itself
            if namespace is not None:
                await _unmount_in_namespace(mountpoint)
            log.info("unmounted %s", mountpoint)
    finally:
        _session_active = False


async def _init_in_namespace(fs: ExportFS, mountpoint, opts: set[str], namespace: hostns.MountNamespace) -> None:
    fd = hostns.open_fuse_device()
    try:
        await hostns.mount_fuse(fd, mountpoint, opts, namespace)
    except BaseException:
        os.close(fd)
        raise
    try:
        # libfuse takes an open, already mounted connection as "/dev/fd/N" and owns the fd from then on
        pyfuse3.init(fs, f"/dev/fd/{fd}", opts)
    except BaseException:
        os.close(fd)
        with trio.CancelScope(shield=True):
            await _unmount_in_namespace(mountpoint)
        raise


async def _unmount_in_namespace(mountpoint) -> None:
    # The connection is closed by now, so the kernel answers anyone still using the mount with
    # ENOTCONN; a lazy unmount then detaches it even while files are open, as libfuse does.
    with trio.CancelScope(shield=True):
        try:
            await system.umount(mountpoint, lazy=True, timeout=30)
        except LazyfsError as exc:
            log.warning("could not unmount %s: %s", mountpoint, exc)
