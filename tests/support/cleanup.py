"""Tearing down what a test made: mounts and loop devices under its directory, and its lazyfs daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from lazyfs.serve import system
from lazyfs.serve.control import call


def release_under(directory: str | os.PathLike, daemon_socket: str | None = None, timeout: float = 20.0) -> None:
    """Unmount everything mounted below *directory* (deepest first), detach loop devices whose
    backing file is below it, then stop the daemon answering on *daemon_socket* (bounded wait)."""
    directory = str(directory)
    for m in sorted(system.mounts(), key=lambda m: -len(m.mountpoint)):
        if m.mountpoint.startswith(directory):
            subprocess.run(["umount", "-l", m.mountpoint], capture_output=True)
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        if directory in line:
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True)
    if daemon_socket is None:
        return
    try:
        os.kill(call(daemon_socket, "ping", timeout=10)["pid"], signal.SIGTERM)
    except Exception:  # no daemon (or a dead one): nothing to stop
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(daemon_socket) and time.monotonic() < deadline:
        time.sleep(0.1)
