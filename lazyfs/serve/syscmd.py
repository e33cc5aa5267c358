"""The host commands lazyfs runs (losetup, mount, umount, the FUSE abort), written once, run two ways.

Each helper is a generator of *steps* that does no I/O itself: it yields a `Command` to run, or
a plain blocking callable (a file write, a socket probe), and is sent back the command's stdout
or the callable's result; a failure is thrown into it where it yielded. It builds the command
lines and reads their answers. Two thin runners drive the same steps:

* ``run_steps_blocking`` here, for a process without trio (the CLI's mount path, a worker
  thread), with ``subprocess``;
* ``system.run_steps``, for the daemon, with ``trio.run_process`` so its event loop never blocks.

Either way a command gets the same environment, errors (`CommandError`, `BusyError` for EBUSY)
and timeout. This module does not import trio.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lazyfs.errors import BusyError, LazyfsError, NotFoundError
from lazyfs.serve import hostns, mountinfo
from lazyfs.serve.fusekernel import keeper


def _log():
    """This module's logger, named as these lines always were. logging is imported when a line is
    logged, not at the top: the CLI's mount path seldom logs and its start waits for imports (issue 14)."""
    import logging

    return logging.getLogger("lazyfs.serve.system")


READAHEAD_SECTORS = 2048  # 1 MiB in 512-byte sectors: big sequential requests through FUSE
FUSECTL_DIR = "/sys/fs/fuse/connections"
TERM_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for a command past its timeout


class CommandError(LazyfsError):
    """A system command (losetup, mount, mkfs ...) failed or timed out.

    ``cmd``, ``returncode`` (None on timeout), ``stderr`` and ``stdout`` say what happened.
    """

    def __init__(self, cmd: Sequence[str], returncode: int | None, stderr: str, stdout: str = "") -> None:
        self.cmd, self.returncode, self.stderr, self.stdout = list(cmd), returncode, stderr, stdout
        status = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"{' '.join(self.cmd)} {status}: {stderr.strip() or '(no output)'}")


@dataclass(frozen=True, slots=True)
class Command:
    """One command to run: *argv*, the fds it inherits under the same numbers, and how long it may take."""

    argv: tuple[str, ...]
    pass_fds: tuple[int, ...] = ()
    timeout: float = 60.0


#: what a step generator yields, is sent back, and returns
Steps = Generator[Command | Callable[[], Any], Any, Any]


def command_env() -> dict[str, str]:
    """The environment of every command: this one's, with messages in English (they are parsed)."""
    return {**os.environ, "LC_ALL": "C"}


def command_output(cmd: Sequence[str], returncode: int, stdout: bytes, stderr: bytes) -> str:
    """The stdout of a finished command; CommandError if it failed (BusyError if it says busy)."""
    err = stderr.decode(errors="replace")
    if returncode != 0:
        if "busy" in err.lower():
            raise BusyError(f"{' '.join(cmd)}: {err.strip()}")
        raise CommandError(cmd, returncode, err, stdout.decode(errors="replace"))
    return stdout.decode(errors="replace")


def run_blocking(cmd: Sequence[str], *, timeout: float = 60.0, pass_fds: Sequence[int] = ()) -> str:
    """Run *cmd* outside trio, return its stdout: the same errors as ``system.run``.

    A command past its *timeout* gets SIGTERM, then SIGKILL after ``TERM_GRACE`` seconds, as under
    trio. Never call it from a trio thread: it blocks until the command ends.
    """
    cmd = [os.fspath(c) for c in cmd]
    try:
        with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=command_env(), pass_fds=tuple(pass_fds)) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.communicate(timeout=TERM_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()  # leaving the with block waits for it (as long as the kernel holds it)
                raise CommandError(cmd, None, f"no answer after {timeout:g} s") from None
    except OSError as exc:
        raise CommandError(cmd, None, str(exc)) from exc
    return command_output(cmd, proc.returncode, stdout, stderr)


def run_steps_blocking(steps: Steps) -> Any:
    """Drive *steps* to their end in this thread and return what they return."""
    with contextlib.closing(steps):  # however this ends (an interrupt too), the steps end with it
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
                    reply = run_blocking(step.argv, timeout=step.timeout, pass_fds=step.pass_fds)
                else:
                    reply = step()
            except Exception as exc:  # noqa: BLE001 - it goes back into the steps, which decide
                failure = exc


def _in_host_namespace(argv: Sequence[str], timeout: float) -> Command:
    """*argv* run where lazyfs mounts: in the host's mount namespace if one is configured."""
    ns = hostns.configured()
    return Command(tuple(hostns.command(list(argv), ns)), tuple(hostns.pass_fds(ns)), timeout)


# -- loop devices ---------------------------------------------------------------


def loop_sysfs(dev: str) -> str:
    return f"/sys/block/{os.path.basename(dev)}/loop"


def loop_direct_io(dev: str) -> bool:
    """Whether loop device *dev* does direct I/O on its backing file."""
    try:
        with open(os.path.join(loop_sysfs(dev), "dio")) as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        raise NotFoundError(f"{dev} is not an attached loop device") from None


def losetup_attach_steps(path: str | os.PathLike, read_only: bool, direct_io: bool, timeout: float) -> Steps:
    """Attach a free loop device to *path*; returns its name (``/dev/loopN``).

    With *direct_io*, the device does O_DIRECT I/O on the file (no second copy in
    the page cache) and falls back to buffered I/O if the kernel refuses. The
    device's readahead is set to 1 MiB.
    """
    path = os.path.abspath(path)  # abspath, not realpath: that would stat the FUSE file here
    # the file is opened where it is mounted: in the host's namespace if lazyfs mounts there
    base = ["losetup", "--show", "-f"] + (["-r"] if read_only else [])
    buffered = _in_host_namespace(base + [path], timeout)
    dev = None
    if direct_io:
        try:
            dev = (yield _in_host_namespace(base + ["--direct-io=on", path], timeout)).strip()
        except CommandError as exc:
            # losetup may attach the device and only then fail to switch on direct
            # I/O; it printed the device then, and the device works without it.
            printed = exc.stdout.strip()
            if printed.startswith("/dev/loop"):
                dev = printed
            _log().info("losetup --direct-io=on %s failed (%s); using buffered I/O", path, exc.stderr.strip())
    if not dev:
        dev = (yield buffered).strip()
    if not dev.startswith("/dev/loop"):
        raise CommandError(buffered.argv, 0, f"unexpected output {dev!r}")
    if direct_io and not loop_direct_io(dev):
        _log().info("%s attached to %s without direct I/O (the kernel declined it)", dev, path)
    try:
        yield Command(("blockdev", "--setra", str(READAHEAD_SECTORS), dev), (), timeout)
    except LazyfsError as exc:
        _log().warning("could not set readahead on %s: %s", dev, exc)
    return dev


def losetup_detach_steps(dev: str, timeout: float) -> Steps:
    """Detach loop device *dev*, where :func:`losetup_attach_steps` attached it."""
    yield _in_host_namespace(["losetup", "-d", dev], timeout)


# -- mounts -----------------------------------------------------------------------


def mount_steps(dev: str, target: str | os.PathLike, fstype: str, read_only: bool, options: Iterable[str],
                timeout: float) -> Steps:
    """Mount *dev* at *target*, in the host's namespace if configured."""
    opts = (["ro"] if read_only else []) + list(options)
    yield _in_host_namespace(["mount", "-t", fstype] + (["-o", ",".join(opts)] if opts else [])
                             + [dev, os.fspath(target)], timeout)


def umount_steps(target: str | os.PathLike, lazy: bool, timeout: float) -> Steps:
    """Unmount *target* (BusyError if in use, unless *lazy*), in the host's namespace if configured."""
    yield _in_host_namespace(["umount"] + (["-l"] if lazy else []) + [os.fspath(target)], timeout)


def fuse_abort_steps(mountpoint: str | os.PathLike) -> Steps:
    """Abort the FUSE connection mounted at *mountpoint*.

    Every pending and future request on it fails with ENOTCONN, so processes
    stuck on a hung daemon wake up; then the mount can be unmounted.
    NotFoundError if *mountpoint* is not a FUSE mount.
    """
    entry = mountinfo.mount_at(mountpoint)
    if entry is None or not entry.fstype.startswith("fuse"):
        raise NotFoundError(f"no FUSE mount at {mountpoint}")
    # The connection directory is named after the superblock's device number in the
    # kernel's encoding (major << 20 | minor); FUSE uses anonymous devices (major 0).
    conn = f"{FUSECTL_DIR}/{(entry.major << 20) | entry.minor}"
    if not any(e.fstype == "fusectl" and e.mountpoint == FUSECTL_DIR for e in mountinfo.mounts()):
        try:
            yield Command(("mount", "-t", "fusectl", "none", FUSECTL_DIR), (), 30)
        except BusyError:
            pass  # mounted by someone else meanwhile
    abort = os.path.join(conn, "abort")

    def write_abort() -> None:
        with open(abort, "w") as f:
            f.write("1")

    try:
        yield write_abort
    except FileNotFoundError:
        raise NotFoundError(f"no FUSE connection {conn} for {mountpoint}") from None


def clear_stale_export_steps(export_dir: str, timeout: float = 60.0) -> Steps:
    """A daemon that died leaves its FUSE mount behind, answering ENOTCONN: abort and unmount it.

    Run it only while holding the run directory's `daemon_lock`: then the export's owner is
    provably dead, and a live session is never aborted. A connection the fd keeper holds
    (``RUN_DIR/fuse-keeper.sock`` answers) is not stale: the next daemon takes it over.
    """
    if not mountinfo.is_mountpoint(export_dir):
        return
    kept = keeper.socket_path(os.path.dirname(os.path.abspath(export_dir)))
    if (yield lambda: keeper.alive(kept)):
        _log().info("the FUSE export at %s is kept alive for the next daemon: not removed", export_dir)
        return
    _log().warning("removing the stale FUSE export at %s left by a previous daemon", export_dir)
    try:
        yield from fuse_abort_steps(export_dir)
    except LazyfsError as exc:
        _log().info("fuse abort: %s", exc)
    yield from umount_steps(export_dir, True, timeout)


# -- the same, for a caller without trio ----------------------------------------------


def losetup_attach_blocking(path: str | os.PathLike, read_only: bool = False, direct_io: bool = True, *,
                            timeout: float = 60.0) -> str:
    """``system.losetup_attach`` outside trio."""
    return run_steps_blocking(losetup_attach_steps(path, read_only, direct_io, timeout))


def losetup_detach_blocking(dev: str, *, timeout: float = 60.0) -> None:
    """``system.losetup_detach`` outside trio."""
    run_steps_blocking(losetup_detach_steps(dev, timeout))


def mount_blocking(dev: str, target: str | os.PathLike, fstype: str = "ext4", read_only: bool = False,
                   options: Iterable[str] = (), *, timeout: float = 60.0) -> None:
    """``system.mount`` outside trio."""
    run_steps_blocking(mount_steps(dev, target, fstype, read_only, options, timeout))


def umount_blocking(target: str | os.PathLike, lazy: bool = False, *, timeout: float = 60.0) -> None:
    """``system.umount`` outside trio."""
    run_steps_blocking(umount_steps(target, lazy, timeout))


def clear_stale_export_blocking(export_dir: str) -> None:
    """``system.clear_stale_export`` outside trio."""
    run_steps_blocking(clear_stale_export_steps(export_dir))
