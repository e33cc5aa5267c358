"""Loop devices, mounts and mkfs, driven from trio without blocking the event loop.

A daemon serving FUSE must never block its own thread on its own files: losetup,
mount and mkfs open the exported file, and the open waits for a reply only the
daemon's event loop can send. So every command runs through ``trio.run_process``
and every wait is bounded. What can be learnt from /proc or /sys (mountinfo, loop
backing files) is read directly: those reads never touch a FUSE mount.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from lazyfs.errors import BusyError, ConfigError, LazyfsError, NotFoundError
from lazyfs.serve import hostns
from lazyfs.serve.fusekernel import keeper

log = logging.getLogger(__name__)

READAHEAD_SECTORS = 2048  # 1 MiB in 512-byte sectors: big sequential requests through FUSE
FUSECTL_DIR = "/sys/fs/fuse/connections"


class CommandError(LazyfsError):
    """A system command (losetup, mount, mkfs ...) failed or timed out.

    ``cmd``, ``returncode`` (None on timeout), ``stderr`` and ``stdout`` say what happened.
    """

    def __init__(self, cmd: Sequence[str], returncode: int | None, stderr: str, stdout: str = "") -> None:
        self.cmd, self.returncode, self.stderr, self.stdout = list(cmd), returncode, stderr, stdout
        status = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"{' '.join(self.cmd)} {status}: {stderr.strip() or '(no output)'}")


async def _deliver_cancel(proc: trio.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    await trio.sleep(2)
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
                deliver_cancel=_deliver_cancel, env={**os.environ, "LC_ALL": "C"}, pass_fds=tuple(pass_fds),
            )
    except trio.TooSlowError:
        raise CommandError(cmd, None, f"no answer after {timeout:g} s") from None
    except OSError as exc:  # the program itself is missing or not executable
        raise CommandError(cmd, None, str(exc)) from exc
    return _result(cmd, done.returncode, done.stdout, done.stderr)


def _result(cmd: list[str], returncode: int, stdout: bytes, stderr: bytes) -> str:
    err = stderr.decode(errors="replace")
    if returncode != 0:
        if "busy" in err.lower():
            raise BusyError(f"{' '.join(cmd)}: {err.strip()}")
        raise CommandError(cmd, returncode, err, stdout.decode(errors="replace"))
    return stdout.decode(errors="replace")


def run_blocking(cmd: Sequence[str], *, timeout: float = 60.0, pass_fds: Sequence[int] = ()) -> str:
    """:func:`run` for a worker thread outside trio (the snapshotter's gRPC handlers): same errors.

    Never call it from a trio thread: it blocks until the command ends.
    """
    cmd = [os.fspath(c) for c in cmd]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C"}, pass_fds=tuple(pass_fds))
    except subprocess.TimeoutExpired:
        raise CommandError(cmd, None, f"no answer after {timeout:g} s") from None
    except OSError as exc:
        raise CommandError(cmd, None, str(exc)) from exc
    return _result(cmd, done.returncode, done.stdout, done.stderr)


# -- loop devices ---------------------------------------------------------------


def _loop_sysfs(dev: str) -> str:
    return f"/sys/block/{os.path.basename(dev)}/loop"


def loop_direct_io(dev: str) -> bool:
    """Whether loop device *dev* does direct I/O on its backing file."""
    try:
        with open(os.path.join(_loop_sysfs(dev), "dio")) as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        raise NotFoundError(f"{dev} is not an attached loop device") from None


async def losetup_attach(
    path: str | os.PathLike, read_only: bool = False, direct_io: bool = True, *, timeout: float = 60.0
) -> str:
    """Attach a free loop device to *path* and return its name (``/dev/loopN``).

    With *direct_io*, the device does O_DIRECT I/O on the file (no second copy in
    the page cache) and falls back to buffered I/O if the kernel refuses. The
    device's readahead is set to 1 MiB.
    """
    path = os.path.abspath(path)  # abspath, not realpath: that would stat the FUSE file here
    # the file is opened where it is mounted: in the host's namespace if lazyfs mounts there
    ns = hostns.configured()
    base = hostns.command(["losetup", "--show", "-f"] + (["-r"] if read_only else []), ns)
    fds = hostns.pass_fds(ns)
    dev = None
    if direct_io:
        try:
            dev = (await run(base + ["--direct-io=on", path], timeout=timeout, pass_fds=fds)).strip()
        except CommandError as exc:
            # losetup may attach the device and only then fail to switch on direct
            # I/O; it printed the device then, and the device works without it.
            printed = exc.stdout.strip()
            if printed.startswith("/dev/loop"):
                dev = printed
            log.info("losetup --direct-io=on %s failed (%s); using buffered I/O", path, exc.stderr.strip())
    if not dev:
        dev = (await run(base + [path], timeout=timeout, pass_fds=fds)).strip()
    if not dev.startswith("/dev/loop"):
        raise CommandError(base + [path], 0, f"unexpected output {dev!r}")
    if direct_io and not loop_direct_io(dev):
        log.info("%s attached to %s without direct I/O (the kernel declined it)", dev, path)
    try:
        await run(["blockdev", "--setra", str(READAHEAD_SECTORS), dev], timeout=timeout)
    except LazyfsError as exc:
        log.warning("could not set readahead on %s: %s", dev, exc)
    return dev


async def losetup_detach(dev: str, *, timeout: float = 60.0) -> None:
    """Detach loop device *dev* (the kernel finishes it once nothing holds it open).

    Run where :func:`losetup_attach` ran (the host's namespace, if configured), like every
    losetup/mount/umount of lazyfs.
    """
    ns = hostns.configured()
    await run(hostns.command(["losetup", "-d", dev], ns), timeout=timeout, pass_fds=hostns.pass_fds(ns))


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
    opts = (["ro"] if read_only else []) + list(options)
    cmd = ["mount", "-t", fstype] + (["-o", ",".join(opts)] if opts else []) + [dev, os.fspath(target)]
    ns = hostns.configured()
    await run(hostns.command(cmd, ns), timeout=timeout, pass_fds=hostns.pass_fds(ns))


def _umount_command(target: str | os.PathLike, lazy: bool) -> tuple[list[str], tuple[int, ...]]:
    ns = hostns.configured()
    cmd = ["umount"] + (["-l"] if lazy else []) + [os.fspath(target)]
    return hostns.command(cmd, ns), hostns.pass_fds(ns)


async def umount(target: str | os.PathLike, lazy: bool = False, *, timeout: float = 60.0) -> None:
    """Unmount *target* (BusyError if in use, unless *lazy*), in the host's namespace if configured."""
    cmd, fds = _umount_command(target, lazy)
    await run(cmd, timeout=timeout, pass_fds=fds)


def umount_blocking(target: str | os.PathLike, lazy: bool = False, *, timeout: float = 60.0) -> None:
    """:func:`umount` for a worker thread outside trio (see :func:`run_blocking`)."""
    cmd, fds = _umount_command(target, lazy)
    run_blocking(cmd, timeout=timeout, pass_fds=fds)


# -- /proc/self/mountinfo -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo (the fields lazyfs needs)."""

    mount_id: int
    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str
    #: the optional fields (propagation tags): ``shared:N`` (peer group N), ``master:N`` (a
    #: slave of peer group N), ``propagate_from:N``, ``unbindable``; none for a private mount
    tags: tuple[str, ...] = ()

    @property
    def is_slave(self) -> bool:
        """Whether unmounts in the peer group this mount was copied from reach it (``master:N``)."""
        return any(t.startswith("master:") for t in self.tags)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse the text of /proc/<pid>/mountinfo (sans-IO)."""
    entries = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
            major, minor = parts[2].split(":")
            entries.append(MountEntry(int(parts[0]), int(major), int(minor), _unescape(parts[4]),
                                      parts[sep + 1], _unescape(parts[sep + 2]), tuple(parts[6:sep])))
        except (ValueError, IndexError):
            continue  # a line we do not understand is not one we are looking for
    return entries


def mounts() -> list[MountEntry]:
    """The mounts of this process's namespace, or of the host's (``lazyfs.serve.hostns``)."""
    with open(hostns.mountinfo_path(hostns.configured())) as f:
        return parse_mountinfo(f.read())


def _mount_at(path: str | os.PathLike) -> MountEntry | None:
    want = os.path.abspath(path)
    found = None
    for entry in mounts():
        if entry.mountpoint == want:
            found = entry  # the last one is on top
    return found


def is_mountpoint(path: str | os.PathLike) -> bool:
    """Whether something is mounted at *path*; never touches the mount itself."""
    return _mount_at(path) is not None


async def fuse_abort(mountpoint: str | os.PathLike) -> None:
    """Abort the FUSE connection mounted at *mountpoint*.

    Every pending and future request on it fails with ENOTCONN, so processes
    stuck on a hung daemon wake up; then the mount can be unmounted.
    NotFoundError if *mountpoint* is not a FUSE mount.
    """
    entry = _mount_at(mountpoint)
    if entry is None or not entry.fstype.startswith("fuse"):
        raise NotFoundError(f"no FUSE mount at {mountpoint}")
    # The connection directory is named after the superblock's device number in the
    # kernel's encoding (major << 20 | minor); FUSE uses anonymous devices (major 0).
    conn = f"{FUSECTL_DIR}/{(entry.major << 20) | entry.minor}"
    if not any(e.fstype == "fusectl" and e.mountpoint == FUSECTL_DIR for e in mounts()):
        try:
            await run(["mount", "-t", "fusectl", "none", FUSECTL_DIR], timeout=30)
        except BusyError:
            pass  # mounted by someone else meanwhile
    abort = os.path.join(conn, "abort")

    def write_abort() -> None:
        with open(abort, "w") as f:
            f.write("1")

    try:
        await trio.to_thread.run_sync(write_abort)
    except FileNotFoundError:
        raise NotFoundError(f"no FUSE connection {conn} for {mountpoint}") from None


def private_dir(path: str | os.PathLike) -> str:
    """Make *path* (and missing parents) a directory only its owner can enter: mode 0700, every call.

    Refuses a symlink, or a directory another user owns (someone could have made it first
    to watch or plant files): ConfigError naming the path.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:  # a file: said below
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} must be a directory, not a symlink or a file")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}): remove it or "
                          f"choose another directory")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


__all__ = [
    "CommandError", "MountEntry", "READAHEAD_SECTORS", "find_loop_devices", "fuse_abort", "is_mountpoint",
    "loop_direct_io", "losetup_attach", "losetup_detach", "mkfs_ext4", "mount", "mounts", "parse_mountinfo",
    "private_dir", "run", "run_blocking", "umount", "umount_blocking",
]


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


async def clear_stale_export(export_dir: str) -> None:
    """A daemon that died leaves its FUSE mount behind, answering ENOTCONN: abort and unmount it.

    Call it only while holding the run directory's `daemon_lock`: then the export's owner is
    provably dead, and a live session is never aborted. A connection the fd keeper holds
    (``RUN_DIR/fuse-keeper.sock`` answers) is not stale: the next daemon takes it over.
    """
    if is_mountpoint(export_dir):
        kept = keeper.socket_path(os.path.dirname(os.path.abspath(export_dir)))
        if await trio.to_thread.run_sync(keeper.alive, kept):
            log.info("the FUSE export at %s is kept alive for the next daemon: not removed", export_dir)
            return
        log.warning("removing the stale FUSE export at %s left by a previous daemon", export_dir)
        try:
            await fuse_abort(export_dir)
        except LazyfsError as exc:
            log.info("fuse abort: %s", exc)
        await umount(export_dir, lazy=True)
