"""Loop devices, mounts and mkfs, driven from trio without blocking the event loop.

A daemon serving FUSE must never block its own thread on its own files: losetup,
mount and mkfs open the exported file, and the open waits for a reply only the
daemon's event loop can send. So every command runs through ``trio.run_process``
and every wait is bounded. What can be learnt from /proc or /sys (mountinfo, loop
backing files) is read directly: those reads never touch a FUSE mount.

The commands themselves (their lines, how their answers are read) are written once in
``syscmd``, which runs them without trio for the CLI; ``run_steps`` here runs the same steps
under trio. The trio-free helpers of ``syscmd``, ``mountinfo`` and ``privatedir`` are
offered here too, so daemon code has one module to ask.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterable, Sequence
from typing import Any

import trio

from lazyfs.errors import LazyfsError
from lazyfs.serve import hostns
from lazyfs.serve.mountinfo import MountEntry, is_mountpoint, mount_at, mounts, parse_mountinfo
from lazyfs.serve.privatedir import private_dir
from lazyfs.serve.syscmd import (
    FUSECTL_DIR, READAHEAD_SECTORS, TERM_GRACE, Command, CommandError, Steps, clear_stale_export_steps, command_env,
    command_output, fuse_abort_steps, loop_direct_io, losetup_attach_steps, losetup_detach_steps, mount_steps,
    run_blocking, umount_blocking, umount_steps,
)

log = logging.getLogger(__name__)


async def _deliver_cancel(proc: trio.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    await trio.sleep(TERM_GRACE)
    proc.kill()


async def run(cmd: Sequence[str], *, timeout: float = 60.0, stdin: bytes = b"", pass_fds: Sequence[int] = ()) -> str:
    """Run *cmd*, return its stdout; CommandError (BusyError for EBUSY) on failure.

    *pass_fds* stay open in the command under the same numbers.

    A command stuck in the kernel (D state, e.g. on a hung FUSE mount) cannot be
    killed; then this waits until the kernel lets go (see ``fuse_abort``).
    """
    cmd = [os.fspath(c) for c in cmd]
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(
                cmd, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False,
                deliver_cancel=_deliver_cancel, env=command_env(), pass_fds=tuple(pass_fds),
            )
    except trio.TooSlowError:
        raise CommandError(cmd, None, f"no answer after {timeout:g} s") from None
    except OSError as exc:  # the program itself is missing or not executable
        raise CommandError(cmd, None, str(exc)) from exc
    return command_output(cmd, done.returncode, done.stdout, done.stderr)


async def run_steps(steps: Steps) -> Any:
    """Drive *steps* (``syscmd``) to their end under trio: commands through :func:`run`, blocking
    calls in a worker thread; return what the steps return."""
    with contextlib.closing(steps):  # however this ends (a cancellation too), the steps end with it
        reply: Any = None
        failure: Exception | None = None
        while True:
            try:
                step = steps.send(reply) if failure is None else steps.throw(failure)
            except StopIteration as done:
                return done.value
            reply, failure = None, None
            try:
                if isinstance(step, Command):
                    reply = await run(step.argv, timeout=step.timeout, pass_fds=step.pass_fds)
                else:
                    reply = await trio.to_thread.run_sync(step)
            except Exception as exc:  # noqa: BLE001 - it goes back into the steps, which decide
                failure = exc


# -- loop devices ---------------------------------------------------------------


async def losetup_attach(
    path: str | os.PathLike, read_only: bool = False, direct_io: bool = True, *, timeout: float = 60.0
) -> str:
    """Attach a free loop device to *path* and return its name (``/dev/loopN``).

    With *direct_io*, the device does O_DIRECT I/O on the file (no second copy in
    the page cache) and falls back to buffered I/O if the kernel refuses. The
    device's readahead is set to 1 MiB.
    """
    return await run_steps(losetup_attach_steps(path, read_only, direct_io, timeout))


async def losetup_detach(dev: str, *, timeout: float = 60.0) -> None:
    """Detach loop device *dev* (the kernel finishes it once nothing holds it open).

    Run where :func:`losetup_attach` ran (the host's namespace, if configured), like every
    losetup/mount/umount of lazyfs.
    """
    await run_steps(losetup_detach_steps(dev, timeout))


async def find_loop_devices(backing_file: str | os.PathLike) -> list[str]:
    """Loop devices whose backing file is *backing_file*, sorted.

    Read from /sys (not ``losetup -j``, which stats the file and so would go
    through FUSE): the kernel's path is compared with ``os.path.abspath``.
    """
    want = os.path.abspath(backing_file)
    found = []
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                back = f.read().rstrip("\n")
        except (FileNotFoundError, NotADirectoryError, OSError):
            continue  # not attached (or detached meanwhile)
        if back == want:
            found.append(f"/dev/{name}")
    return sorted(found, key=lambda d: int(d.removeprefix("/dev/loop")))


# -- file systems -----------------------------------------------------------------


async def mkfs_ext4(
    path_or_dev: str | os.PathLike, *, label: str | None = None, extra: Iterable[str] = (), timeout: float = 600.0
) -> None:
    """Make an ext4 file system on *path_or_dev* (everything initialised up front).

    No discard (the FUSE file has no fallocate) and no lazy init (background
    zeroing would otherwise fetch and write the whole image later).
    4 KiB blocks and 256-byte inodes whatever the size, to match BLOCK_SIZE.
    """
    cmd = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256",
           "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
    if label is not None:
        cmd += ["-L", label]
    cmd += [*extra, os.fspath(path_or_dev)]
    await run(cmd, timeout=timeout)


async def mount(
    dev: str, target: str | os.PathLike, fstype: str = "ext4", read_only: bool = False,
    options: Iterable[str] = (), *, timeout: float = 60.0,
) -> None:
    """Mount *dev* at *target*."""
    await run_steps(mount_steps(dev, target, fstype, read_only, options, timeout))


async def umount(target: str | os.PathLike, lazy: bool = False, *, timeout: float = 60.0) -> None:
    """Unmount *target* (BusyError if in use, unless *lazy*), in the host's namespace if configured."""
    await run_steps(umount_steps(target, lazy, timeout))


async def fuse_abort(mountpoint: str | os.PathLike) -> None:
    """Abort the FUSE connection mounted at *mountpoint*.

    Every pending and future request on it fails with ENOTCONN, so processes
    stuck on a hung daemon wake up; then the mount can be unmounted.
    NotFoundError if *mountpoint* is not a FUSE mount.
    """
    await run_steps(fuse_abort_steps(mountpoint))


async def clear_stale_export(export_dir: str) -> None:
    """A daemon that died leaves its FUSE mount behind, answering ENOTCONN: abort and unmount it.

    Call it only while holding the run directory's `daemon_lock`: then the export's owner is
    provably dead, and a live session is never aborted. A connection the fd keeper holds
    (``RUN_DIR/fuse-keeper.sock`` answers) is not stale: the next daemon takes it over.
    """
    await run_steps(clear_stale_export_steps(export_dir))


def drop_copied_loop_mounts(export_dir: str | os.PathLike) -> list[str]:
    """Detach, in this process's own mount namespace only, the copies of mounts of lazyfs's
    exports (a file system on a loop device whose backing file is under *export_dir*); the
    mount points detached.

    A daemon sandboxed by systemd (``ProtectSystem=``, ``PrivateTmp=``) runs in a mount namespace
    of its own, made afresh at each start. Started while images are mounted (``systemctl
    restart``), it gets a copy of each of those mounts, nothing in the host's namespace unmounts
    it, and so the ext4 stays alive, its loop device keeps ``disk.img`` open, and ``lazyfs
    umount`` finds the export still open (issue 13). The daemon never uses these copies: it
    mounts and reads through the host's namespace (``lazyfs.serve.hostns``). Nothing is done
    unless such a namespace is configured and differs from this process's.

    On a systemd host ``/`` is a shared mount, so these copies are slaves (``master:N``) and an
    unmount in the host's namespace reaches them anyway. A copy that is no slave (the host's ``/``
    is private) does not follow the host's unmounts: it is logged as a warning, since any other
    process left in this namespace would keep the image's ext4 alive.
    """
    ns = hostns.configured()
    if ns is None:
        return []
    try:
        host, own = os.stat(ns.path), os.stat("/proc/self/ns/mnt")
    except OSError:
        return []
    if (host.st_dev, host.st_ino) == (own.st_dev, own.st_ino):
        return []
    prefix = os.path.abspath(export_dir) + os.sep
    with open("/proc/self/mountinfo") as f:
        entries = parse_mountinfo(f.read())
    dropped = []
    for entry in sorted(entries, key=lambda e: -e.mount_id):  # the newest (topmost) first
        if not entry.source.startswith("/dev/loop"):
            continue
        try:
            with open(f"/sys/block/{os.path.basename(entry.source)}/loop/backing_file") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue
        if not backing.startswith(prefix):
            continue
        if not entry.is_slave:
            log.warning("the copy of %s in the daemon's mount namespace is no slave of the host's mount: the host's "
                        "/ must be a shared mount (as systemd makes it) for unmounts to reach the copies",
                        entry.mountpoint)
        try:
            run_blocking(["umount", "-l", entry.mountpoint])  # here, not through nsenter: our copy only
        except LazyfsError as exc:
            log.warning("cannot detach the copy of %s in the daemon's mount namespace: %s", entry.mountpoint, exc)
            continue
        dropped.append(entry.mountpoint)
    return dropped


def set_readahead(mountpoint: str | os.PathLike, nbytes: int) -> tuple[int | None, str | None]:
    """Set the kernel's readahead for files under the mount at *mountpoint* (its backing device
    info's ``read_ahead_kb``) to *nbytes*, rounded down to KiB: ``(KiB now in force, None)``, or
    ``(KiB in force or None, why it was not set)``. The device numbers come from mountinfo, so a
    FUSE mount this process serves is never touched (a stat would wait for its own answer).

    A file takes the value when it is opened, so it must be set before the loop devices open
    the exported files. The kernel caps a FUSE connection at 128 KiB when it starts (its INIT);
    only this sysfs file (root, /sys writable) raises it.
    """
    entry = mount_at(mountpoint)
    if entry is None:
        return None, f"{mountpoint} is not a mount point"
    path = f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(nbytes >> 10))
        with open(path) as f:
            now = int(f.read())
    except (OSError, ValueError) as exc:
        return None, f"{path}: {exc.strerror if isinstance(exc, OSError) else exc}"
    if now != nbytes >> 10:
        return now, f"{path} reads {now} KiB after writing {nbytes >> 10}"
    return now, None


__all__ = [
    "FUSECTL_DIR", "CommandError", "MountEntry", "READAHEAD_SECTORS", "clear_stale_export", "drop_copied_loop_mounts",
    "find_loop_devices", "fuse_abort", "is_mountpoint", "loop_direct_io", "losetup_attach", "losetup_detach",
    "mkfs_ext4", "mount", "mount_at", "mounts", "parse_mountinfo", "private_dir", "run", "run_blocking", "run_steps",
    "set_readahead", "umount", "umount_blocking",
]
