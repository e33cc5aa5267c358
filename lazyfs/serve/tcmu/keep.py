"""Keep a TCMU LUN's uio fd across daemon restarts, exactly like the /dev/fuse connection.

``target_core_user`` lets one process at a time open ``/dev/uioN`` (a second open gets EBUSY)
and keeps the device, its ring and every command queued on it for as long as some process holds
the open file. So the daemon that opens the uio device hands a dup of the fd to a keeper
(``lazyfs.serve.fusekernel.keeper``: the same standard-library process, one per LUN, on
``RUN_DIR/tcmu-<hash>.sock``) and, under systemd, to the fd store (``FDNAME=lazyfs-tcmu-<NAME>``).
A new daemon takes the fd back (``take``), maps the ring again and serves what is on it
(``lazyfs.serve.tcmu.ring``: a restartable ring re-parses ``[cmd_tail, cmd_head)``).

The keeper exits when the uio device goes (POLLERR on the fd) or when told to (``release``:
the LUN is detached for good).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from lazyfs.errors import FormatError
from lazyfs.serve.fusekernel import keeper

log = logging.getLogger(__name__)


def socket_path(run_dir: str, name: str) -> str:
    # a hash, not the name: a unix socket path has room for 107 bytes only
    digest = hashlib.sha256(f"lazyfs-tcmu-keeper/{name}".encode()).hexdigest()[:16]
    return os.path.join(run_dir, f"tcmu-{digest}.sock")


def fdstore_name(name: str) -> str:
    return f"lazyfs-tcmu-{name}"


def keep(run_dir: str, name: str, fd: int, uio: str) -> None:
    """Hand a dup of the uio *fd* of LUN *name* (device *uio*, like ``uio0``) to a keeper and,
    under systemd, to the fd store. Blocking: call it from a worker thread."""
    params = json.dumps({"tcmu": name, "uio": uio}).encode()
    if keeper.sd_store_fd(fd, fdstore_name(name)):
        log.info("TCMU %s: uio fd stored in systemd's fd store", name)
    pid = keeper.spawn(fd, params, socket_path(run_dir, name), log_path=os.path.join(run_dir, "keeper.log"))
    log.info("TCMU %s: uio fd (%s) kept by keeper pid %d", name, uio, pid)


def take(run_dir: str, name: str) -> tuple[int, str, str] | None:
    """The kept uio fd of LUN *name*, its device name and who kept it; None if nobody did."""
    got = keeper.take(socket_path(run_dir, name))
    kind = "keeper"
    if got is None:
        fd = keeper.sd_stored_fd(fdstore_name(name))
        if fd is None:
            return None
        return fd, "", "systemd fd store"
    fd, raw = got
    try:
        doc = json.loads(raw)
        if not (isinstance(doc, dict) and doc.get("tcmu") == name and isinstance(doc.get("uio"), str)):
            raise FormatError(f"keeper parameters {raw[:200]!r} are not those of TCMU LUN {name}")
    except (ValueError, FormatError) as exc:
        log.error("TCMU %s: the kept uio fd is unusable: %s", name, exc)
        os.close(fd)
        return None
    return fd, doc["uio"], kind


def release(run_dir: str, name: str) -> None:
    """Let the kept fd of LUN *name* go (the LUN is detached for good). Blocking."""
    keeper.release(socket_path(run_dir, name))
    keeper.sd_remove_fd(fdstore_name(name))
