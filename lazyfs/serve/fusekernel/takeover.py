"""Get the daemon's FUSE connection: take over a kept one, or mount a fresh one and keep it.

``connect`` is called by the daemon while it holds the run directory's daemon lock. In order:

1. a kept connection (the fd keeper answers, or systemd's fd store has the fd) whose mount is
   still there is taken over: no INIT, the parameters come from the keeper;
2. otherwise the stale mount of a dead daemon, if any, is aborted and unmounted (the fallback:
   its readers get EIO), a fresh connection is mounted and a keeper is started for it.

``release`` ends a connection for good (a full stop); ``leave`` hands it over (the process exits,
the keeper keeps the connection for the next daemon).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import trio

from lazyfs.errors import FormatError
from lazyfs.serve import system
from lazyfs.serve.fusekernel import keeper
from lazyfs.serve.fusekernel import protocol as p
from lazyfs.serve.fusekernel.exports import ExportFS
from lazyfs.serve.fusekernel.session import Session, mount_session, unmount

log = logging.getLogger(__name__)

PARAMS_FILE = "fuse-session.json"  # next to the keeper socket: the systemd fd store carries no data


def _params_path(run_dir: str) -> str:
    return os.path.join(run_dir, PARAMS_FILE)


def _kept(run_dir: str) -> tuple[int, p.SessionParams, str] | None:
    """A kept connection's fd, parameters and keeper kind, or None."""
    got = keeper.take(keeper.socket_path(run_dir))
    kind = "keeper"
    if got is None:
        fd = keeper.sd_stored_fd()
        if fd is None:
            return None
        try:
            with open(_params_path(run_dir), "rb") as f:
                got = fd, f.read()
        except OSError:
            os.close(fd)
            return None
        kind = "systemd fd store"
    fd, raw = got
    try:
        return fd, p.SessionParams.from_json(raw), kind
    except FormatError as exc:
        log.error("the kept FUSE connection is unusable: %s", exc)
        os.close(fd)
        return None


async def connect(run_dir: str, export_dir: str, fs: ExportFS,
                  clear_stale: Callable[[str], Awaitable[None]]) -> tuple[Session, bool]:
    """The daemon's session for *export_dir* and whether it was taken over (then: restore the
    exports, ``resend``, and serve; else serve at once)."""
    kept = await trio.to_thread.run_sync(_kept, run_dir)
    if kept is not None:
        fd, params, kind = kept
        if system.is_mountpoint(export_dir):
            log.info("taking over the FUSE connection at %s from the %s (protocol 7.%d)", export_dir, kind,
                     params.minor)
            fs.adopt_handles = True
            return Session(fd, params, fs, export_dir), True
        os.close(fd)  # the mount went away meanwhile: nothing left to take over
        await trio.to_thread.run_sync(keeper.release, keeper.socket_path(run_dir))
    await clear_stale(export_dir)
    await trio.to_thread.run_sync(system.private_dir, export_dir)
    session = await mount_session(export_dir, fs)
    raw = session.params.to_json().encode()
    await trio.to_thread.run_sync(_keep, session.fd, raw, run_dir)
    return session, False


def _keep(fd: int, params: bytes, run_dir: str) -> None:
    from lazyfs.durable import write_atomically

    write_atomically(_params_path(run_dir), params)
    if keeper.sd_store_fd(fd):
        log.info("FUSE connection stored in systemd's fd store")
    pid = keeper.spawn(fd, params, keeper.socket_path(run_dir), log_path=os.path.join(run_dir, "keeper.log"))
    log.info("FUSE connection kept by keeper pid %d", pid)


def release(session: Session, run_dir: str) -> None:
    """End the connection for good: unmount, let the keeper go, close the fd."""
    unmount(session.mountpoint)
    keeper.release(keeper.socket_path(run_dir))
    session.close()


def leave(session: Session) -> None:
    """Hand the connection over: close this daemon's fd only; the keeper holds the connection."""
    session.close()
