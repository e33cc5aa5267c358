"""The trio shell around the FUSE codec: mount(2), read /dev/fuse, dispatch, answer with writev.

``mount_session`` opens /dev/fuse, mounts it (``mount -t fuse.lazyfs -o fd=N,...`` through the
mount(2) syscall) and answers the kernel's INIT; ``Session.serve`` then reads requests from the
non-blocking fd (``trio.lowlevel.wait_readable``) and answers each in a task of its own.

A session can also be *taken over*: a new daemon gets a dup of a live connection's fd (from the
fd keeper, ``lazyfs.serve.fusekernel.keeper``) and the parameters INIT settled, asks the kernel
to resend what the dead daemon had read but not answered (``FUSE_NOTIFY_RESEND``), and serves on.
The kernel never notices the gap: readers wait, they get no error.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import stat
import struct
import subprocess
import threading

import trio

from lazyfs.errors import FormatError, LazyfsError
from lazyfs.serve import hostns
from lazyfs.serve.fusekernel import protocol as p
from lazyfs.serve.fusekernel.exports import ExportFS
from lazyfs.serve.fusekernel.passthrough import BackingFiles

log = logging.getLogger(__name__)

DEVICE = "/dev/fuse"
MS_NOSUID, MS_NODEV = 2, 4
# the head of a READ as the worker threads peek at it: len opcode unique, then fh offset size
_HEAD = struct.Struct("<IIQ")
_READ_HEAD = struct.Struct("<QQI")
_READ_MIN = p.IN_HEADER.size + p.READ_IN.size
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process runs on (find_library spawns ldconfig)


class FuseMountError(LazyfsError):
    """/dev/fuse could not be opened, mounted or initialised."""


def mount_options(fd: int, *, allow_other: bool = True) -> str:
    """The mount data for a session on *fd* (what fusermount would pass)."""
    opts = [f"fd={fd}", "rootmode=40000", "user_id=0", "group_id=0", "default_permissions"]
    if allow_other:
        opts.append("allow_other")  # qemu, runc and loop workers may run as other users
    return ",".join(opts)


def _mount(fd: int, mountpoint: str, fsname: str, subtype: str) -> None:
    data = mount_options(fd).encode()
    if _libc.mount(fsname.encode(), os.fsencode(mountpoint), f"fuse.{subtype}".encode(),
                   ctypes.c_ulong(MS_NOSUID | MS_NODEV), data) != 0:
        code = ctypes.get_errno()
        raise FuseMountError(f"mount -t fuse.{subtype} {mountpoint}: {os.strerror(code)}")


MOUNT_OPTIONS = frozenset({"fsname=lazyfs", "subtype=lazyfs", "allow_other", "default_permissions"})


def unmount(mountpoint: str, *, lazy: bool = True) -> None:
    """Unmount *mountpoint* (lazily by default: files still open keep working until closed), in
    the host's mount namespace when lazyfs mounts there (``lazyfs.serve.hostns``)."""
    namespace = hostns.configured()
    if namespace is not None:
        cmd = hostns.command(["umount", *(["-l"] if lazy else []), mountpoint], namespace)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, pass_fds=hostns.pass_fds(namespace))
        if proc.returncode and "not mounted" not in proc.stderr:
            raise FuseMountError(f"umount {mountpoint}: {proc.stderr.strip()}")
        return
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point (any more)
            raise FuseMountError(f"umount {mountpoint}: {os.strerror(code)}")


def open_device() -> int:
    try:
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise FuseMountError(f"cannot open {DEVICE}: {exc.strerror}") from None
    return fd


class Session:
    """One FUSE connection (its /dev/fuse fd and INIT parameters) serving an ExportFS."""

    def __init__(self, fd: int, params: p.SessionParams, fs: ExportFS, mountpoint: str) -> None:
        os.set_blocking(fd, False)
        self.fd, self.params, self.fs, self.mountpoint = fd, params, fs, mountpoint
        self.closed = False
        self.resend_sent = False
        self.unanswerable = 0  # answers the kernel refused (request interrupted or connection gone)
        self._bind_backing()

    def _bind_backing(self) -> None:
        """Let the export tree register backing files when INIT settled passthrough."""
        self.fs.backing = BackingFiles(self.fd) if self.params.passthrough else None

    # -- writing ----------------------------------------------------------------------------------

    def send(self, iov: list) -> bool:
        """Write one answer or notification; False if the kernel no longer wants it."""
        try:
            os.writev(self.fd, iov)
            return True
        except OSError as exc:
            # ENOENT: the request was interrupted or resent meanwhile; ENODEV: the connection is gone
            if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED):
                self.unanswerable += 1
                return False
            raise

    def notify(self, iov: list) -> None:
        """Send a notification from a thread of its own, never failing or blocking the caller.

        An invalidation takes the directory's lock in the kernel, which a request waiting for
        this very loop may hold: written from the loop's thread, it could deadlock.
        """
        def write() -> None:
            try:
                self.send(iov)
            except OSError as exc:
                log.warning("FUSE notification not delivered: %s", exc)

        threading.Thread(target=write, name="lazyfs-fuse-notify", daemon=True).start()

    def resend(self) -> bool:
        """Ask the kernel to send again every request a dead daemon read but never answered.

        False (and one log line) where the kernel lacks FUSE_NOTIFY_RESEND: those requests then
        wait until the connection is aborted.
        """
        if not self.params.has_resend:
            log.warning("FUSE_NOTIFY_RESEND: the kernel speaks FUSE 7.%d (< 7.%d): requests in flight at the "
                        "previous daemon's death are not replayed", self.params.kernel_minor, p.RESEND_MINOR)
            return False
        try:
            self.send(p.notify_resend())
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            log.warning("FUSE_NOTIFY_RESEND refused by the kernel (%s): requests in flight at the previous "
                        "daemon's death are not replayed", exc.strerror)
            return False
        self.resend_sent = True
        log.info("FUSE_NOTIFY_RESEND sent: requests in flight at the previous daemon's death are replayed")
        return True

    # -- reading ----------------------------------------------------------------------------------

    async def read_message(self) -> bytes | None:
        """The next message from the kernel, or None once the connection is gone."""
        while True:
            try:
                return os.read(self.fd, p.READ_BUFFER)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT):  # ENOENT: the request was interrupted meanwhile
                    continue
                if exc.errno in (errno.ENODEV, errno.ECONNABORTED):  # unmounted or aborted
                    return None
                raise

    async def initialise(self) -> None:
        """Answer the kernel's INIT (a fresh mount only) and settle the session parameters."""
        raw = await self.read_message()
        if raw is None:
            raise FuseMountError(f"the FUSE connection at {self.mountpoint} went away before INIT")
        req = p.parse_request(raw)
        if req.header.opcode != p.INIT:
            raise FuseMountError(f"expected FUSE INIT, got opcode {req.header.opcode}")
        try:
            self.params, payload = p.negotiate(req.args)
        except FormatError as exc:
            self.send(p.error_reply(req.header.unique, errno.EPROTO))
            raise FuseMountError(str(exc)) from None
        self.send(p.reply(req.header.unique, payload))
        self._bind_backing()
        log.info("FUSE session at %s: protocol 7.%d (kernel 7.%d), max_write %d, resend %s, passthrough %s",
                 self.mountpoint, self.params.minor, self.params.kernel_minor, self.params.max_write,
                 "available" if self.params.has_resend else "missing",
                 "available" if self.params.passthrough else "not offered by the kernel")

    async def serve(self, *, max_tasks: int = 64, threads: int = 0, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Answer requests until the connection goes (unmount, abort) or the caller cancels.

        Cancelled, requests being handled stay unanswered: a daemon taking over the connection
        gets them again through ``resend``.

        *threads* > 0: that many worker threads read the connection instead of the trio thread
        and answer the READs the export's source serves locally (``ExportFS.read_local``: warm,
        verified blocks) themselves; every other request is handed to the trio thread.
        """
        self.fs.notify = self.notify
        if threads > 0:
            try:
                await self._serve_threaded(max_tasks, threads, task_status)
            finally:
                self.fs.notify = None
            return
        limit = trio.Semaphore(max_tasks)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await limit.acquire()
                    raw = await self.read_message()
                    if raw is None:
                        limit.release()
                        log.info("FUSE connection at %s closed by the kernel", self.mountpoint)
                        break
                    try:
                        req = p.parse_request(raw)
                    except FormatError as exc:
                        limit.release()
                        log.error("dropping a malformed FUSE message: %s", exc)
                        continue
                    if req.header.opcode == p.INIT:  # only a fresh mount sends one: refuse a second
                        limit.release()
                        self.send(p.error_reply(req.header.unique, errno.EPROTO))
                        continue
                    nursery.start_soon(self._answer, req, limit)
        finally:
            self.fs.notify = None

    # -- worker threads ---------------------------------------------------------------------------

    async def _serve_threaded(self, max_tasks: int, threads: int, task_status) -> None:
        """Worker threads read the connection (one at a time: the leader polls, the others wait
        for the leader's lock, so a request wakes one thread) and answer local READs; the rest
        reaches the trio thread, at most *max_tasks* at once (the threads wait for a slot).

        On the way out (connection gone, or cancelled) the threads are stopped and joined before
        this returns: none reads the connection or an export's files any more.
        """
        token = trio.lowlevel.current_trio_token()
        slots = threading.Semaphore(max_tasks)
        stop = threading.Event()
        leader = threading.Lock()
        gone = trio.Event()
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        accepting = True
        workers: list[threading.Thread] = []
        hints: threading.Thread | None = None  # local readahead (docs/warm.md §4)
        if self.fs.fast is not None:
            self.fs.fast.start()
        try:
            async with trio.open_nursery() as nursery:
                def hand_over(raw: bytes) -> None:  # trio thread
                    if not accepting:
                        slots.release()  # unanswered, as a cancelled request: resent after a takeover
                        return
                    nursery.start_soon(self._answer_raw, raw, slots)

                def connection_gone() -> None:  # trio thread
                    gone.set()

                if self.fs.fast is not None:
                    hints = threading.Thread(target=self.fs.hint_thread, name="lazyfs-fuse-hints", daemon=True)
                    hints.start()
                for i in range(threads):
                    t = threading.Thread(target=self._worker, name=f"lazyfs-fuse-{i}", daemon=True,
                                         args=(token, hand_over, connection_gone, slots, stop, leader, wake_r))
                    t.start()
                    workers.append(t)
                task_status.started()
                try:
                    await gone.wait()
                    log.info("FUSE connection at %s closed by the kernel", self.mountpoint)
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self._stop_workers, workers, stop, wake_w, self.fs.fast, hints)
                    accepting = False
        finally:
            for fd in (wake_r, wake_w):
                os.close(fd)

    @staticmethod
    def _stop_workers(workers: list[threading.Thread], stop: threading.Event, wake_w: int, fast,
                      hints: threading.Thread | None) -> None:
        if hints is not None:
            # The hint thread first, while the workers still answer the READs its last fadvise
            # may wait for (the kernel's background requests are bounded).
            fast.stop_hints()
            hints.join()
        stop.set()
        if fast is not None:
            fast.stop()  # a thread in its serve() returns once the wake-up below reaches it
        try:
            os.write(wake_w, b"x")  # the leader wakes from poll; the others see stop once they lead
        except BlockingIOError:
            pass
        for t in workers:
            t.join()

    def _worker(self, token, hand_over, connection_gone, slots: threading.Semaphore, stop: threading.Event,
                leader: threading.Lock, wake_r: int) -> None:
        buf = bytearray(p.READ_BUFFER)
        view = memoryview(buf)
        fd, read_local, fast = self.fd, self.fs.read_local, self.fs.fast
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        try:
            while True:
                if fast is not None:  # C reads the connection and answers what it can; the rest comes here
                    n = self._lead_native(fast, fd, wake_r, buf)
                else:
                    with leader:
                        n = self._lead(fd, view, poller, stop)
                if n is None:
                    if not stop.is_set():  # the connection is gone: the trio thread winds up
                        token.run_sync_soon(connection_gone)
                    return
                if n >= _READ_MIN:
                    length, opcode, unique = _HEAD.unpack_from(buf)
                    if opcode == p.READ and length == n and not unique & p.UNIQUE_RESEND:
                        fh, offset, size = _READ_HEAD.unpack_from(buf, p.IN_HEADER.size)
                        iov = read_local(unique, fh, offset, size)
                        if iov is not None:
                            try:
                                self.send(iov)
                            except OSError as exc:  # the kernel refused the answer: that request only
                                log.warning("FUSE READ answer not written: %s", exc)
                            continue
                raw = bytes(view[:n])
                while not slots.acquire(timeout=0.5):  # bounded: the trio thread answers at most max_tasks at once
                    if stop.is_set():
                        return  # unanswered, as a cancelled request
                token.run_sync_soon(hand_over, raw)
        except trio.RunFinishedError:
            return
        except Exception:  # noqa: BLE001 - a thread's bug must not leave the session silently dead
            log.exception("FUSE worker thread failed")
            try:
                token.run_sync_soon(connection_gone)
            except trio.RunFinishedError:
                pass

    @staticmethod
    def _lead(fd: int, view: memoryview, poller, stop: threading.Event) -> int | None:
        """Read the next message into *view* (holding the leader lock); None when stopped or gone."""
        while not stop.is_set():
            try:
                return os.readv(fd, [view])
            except BlockingIOError:
                poller.poll()
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT):  # ENOENT: the request was interrupted meanwhile
                    continue
                if exc.errno in (errno.ENODEV, errno.ECONNABORTED):  # unmounted or aborted
                    return None
                raise
        return None

    @staticmethod
    def _lead_native(fast, fd: int, wake_r: int, buf: bytearray) -> int | None:
        """``_lead`` through the C path: the next message C did not answer, in *buf*; None when
        stopped or gone."""
        n = fast.serve(fd, wake_r, buf)
        if n > 0:
            return n
        if n == 0 or -n in (errno.ENODEV, errno.ECONNABORTED):  # stopped; unmounted or aborted
            return None
        raise OSError(-n, os.strerror(-n))

    async def _answer_raw(self, raw: bytes, slots: threading.Semaphore) -> None:
        try:
            try:
                req = p.parse_request(raw)
            except FormatError as exc:
                log.error("dropping a malformed FUSE message: %s", exc)
                return
            if req.header.opcode == p.INIT:  # only a fresh mount sends one: refuse a second
                self.send(p.error_reply(req.header.unique, errno.EPROTO))
                return
            iov = await self.fs.handle(req)
            if iov is not None:
                self.send(iov)
        finally:
            slots.release()

    async def _answer(self, req: p.Request, limit: trio.Semaphore) -> None:
        try:
            iov = await self.fs.handle(req)
            if iov is not None:
                self.send(iov)
        finally:
            limit.release()

    def close(self) -> None:
        """Close this process's fd of the connection (a keeper's dup keeps it alive)."""
        if not self.closed:
            self.closed = True
            if self.fs.backing is not None and self.fs.backing.fd == self.fd:
                self.fs.backing = None
            os.close(self.fd)


async def mount_session(mountpoint: str, fs: ExportFS, *, fsname: str = "lazyfs", subtype: str = "lazyfs") -> Session:
    """Mount a fresh FUSE connection at *mountpoint* and answer its INIT (FuseMountError if not)."""
    st = os.stat(mountpoint)
    if not stat.S_ISDIR(st.st_mode):
        raise FuseMountError(f"{mountpoint} is not a directory")
    fd = open_device()
    try:
        namespace = hostns.configured()
        if namespace is None:
            _mount(fd, mountpoint, fsname, subtype)
        else:  # mounted in the host's namespace, where losetup/containerd/qemu see it (docs/daemon.md)
            await hostns.mount_fuse(fd, mountpoint, MOUNT_OPTIONS, namespace)
        session = Session(fd, p.SessionParams(p.OUR_MINOR, 0, 0, 0, 0, p.MAX_WRITE), fs, mountpoint)
        try:
            with trio.fail_after(30):
                await session.initialise()
        except BaseException:
            unmount(mountpoint)
            raise
        return session
    except BaseException:
        os.close(fd)
        raise


async def serve(mountpoint: str, fs: ExportFS, *, max_tasks: int = 64, threads: int = 0,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount *fs* at *mountpoint* and serve until cancelled or unmounted; unmount on the way out.

    ``task_status.started()`` once the mount exists and INIT is answered.
    """
    session = await mount_session(mountpoint, fs)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: session.serve(max_tasks=max_tasks, threads=threads,
                                                                     task_status=task_status))
            task_status.started()
    finally:
        with trio.CancelScope(shield=True):
            unmount(mountpoint)
            session.close()
            log.info("unmounted %s", mountpoint)
