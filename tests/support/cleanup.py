"""Tearing down what a test made: mounts and loop devices under its directory, and its lazyfs daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from lazyfs.serve import system
from lazyfs.serve.control import call
from lazyfs.serve.fusekernel import keeper


def loop_backing_files() -> list[tuple[str, str]]:
    """``(/dev/loopN, backing file)`` of every attached loop device, from sysfs. Not ``losetup -a``:
    its status ioctl stats the backing file, which hangs for good when that file is on a FUSE
    export whose server stopped answering (another test's wedged daemon must not hang this one)."""
    found = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return found
    for name in sorted(names):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                found.append((f"/dev/{name}", f.read().strip()))
        except OSError:  # not a loop device, or nothing attached
            continue
    return found


def loops_under(directory: str | os.PathLike) -> list[str]:
    """``/dev/loopN: backing file`` of every loop device backed by a file under *directory*."""
    prefix = os.fspath(directory).rstrip("/") + "/"
    return [f"{dev}: {backing}" for dev, backing in loop_backing_files() if backing.startswith(prefix)]


def release_under(directory: str | os.PathLike, daemon_socket: str | None = None, timeout: float = 20.0) -> None:
    """Unmount everything mounted below *directory* (deepest first), detach loop devices whose
    backing file is below it, then stop the daemon answering on *daemon_socket* (bounded wait)
    and let its FUSE connection's keeper go.

    A connection kept for a daemon that never came back would leave I/O waiting forever (and
    ``losetup -a`` hanging on the host): with no daemon answering, its keeper is released first.
    """
    directory = str(directory)
    kept = keeper.socket_path(os.path.dirname(daemon_socket)) if daemon_socket else None
    if kept is not None and not _answers(daemon_socket):
        keeper.release(kept)
    for m in sorted(system.mounts(), key=lambda m: -len(m.mountpoint)):
        if m.mountpoint.startswith(directory):
            subprocess.run(["umount", "-l", m.mountpoint], capture_output=True)
    for dev, backing in loop_backing_files():
        if directory in backing:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
    if daemon_socket is None:
        return
    try:
        try:
            call(daemon_socket, "stop", timeout=10)  # a full stop: SIGTERM would hand the connection over
        except Exception:
            os.kill(call(daemon_socket, "ping", timeout=10)["pid"], signal.SIGTERM)
    except Exception:  # no daemon (or a dead one): nothing to stop
        pass
    deadline = time.monotonic() + timeout
    while os.path.exists(daemon_socket) and time.monotonic() < deadline:
        time.sleep(0.1)
    keeper.release(kept)


def _answers(daemon_socket: str) -> bool:
    try:
        call(daemon_socket, "ping", timeout=5)
        return True
    except Exception:
        return False
