"""One daemon per run directory: an exclusive ``flock`` on ``RUN_DIR/daemon.lock``.

The daemon takes the lock before it touches the FUSE export or the control socket and holds it
for its whole life; the kernel drops it when the process dies, however it dies. So whoever holds
the lock may treat every mount and socket under ``run_dir`` as left behind by a dead owner, and
whoever cannot take it knows a live daemon (perhaps still starting) owns them.

A second lock, ``RUN_DIR/start.lock``, serializes the clients that would start a daemon
(`ensure_daemon`), so concurrent ``lazyfs mount`` calls on a host with no daemon start one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator

from lazyfs.errors import BusyError

DAEMON_LOCK = "daemon.lock"
START_LOCK = "start.lock"


def _open(run_dir: str, name: str) -> int:
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    return os.open(os.path.join(run_dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def owner_pid(run_dir: str) -> int | None:
    """The pid of the live daemon that holds *run_dir*'s lock, 0 if its pid is unknown, None if none does."""
    try:
        fd = os.open(os.path.join(run_dir, DAEMON_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if _try_flock(fd, fcntl.LOCK_SH):
            return None  # nobody holds it exclusively: no daemon
        return _read_pid(fd) or 0
    finally:
        os.close(fd)


@contextlib.contextmanager
def daemon_lock(run_dir: str) -> Iterator[None]:
    """Own *run_dir* (its export, socket and state) while the block runs, or raise `BusyError` at once.

    Inside the block any FUSE export or socket under *run_dir* belongs to a dead process.
    """
    fd = _open(run_dir, DAEMON_LOCK)
    try:
        if not _try_flock(fd, fcntl.LOCK_EX):
            pid = _read_pid(fd)
            who = f"pid {pid}" if pid else "another process"
            raise BusyError(f"a lazyfs daemon ({who}) already owns {run_dir}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # drops the lock


@contextlib.contextmanager
def start_lock(run_dir: str, deadline: float) -> Iterator[None]:
    """Hold *run_dir*'s start lock (waiting until the monotonic *deadline*, then `BusyError`)."""
    fd = _open(run_dir, START_LOCK)
    try:
        while not _try_flock(fd, fcntl.LOCK_EX):
            if time.monotonic() >= deadline:
                raise BusyError(f"another lazyfs command has been starting the daemon of {run_dir} for too long")
            time.sleep(0.02)
        yield
    finally:
        os.close(fd)
