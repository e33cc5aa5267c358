"""The fd keeper: a tiny process that holds a live /dev/fuse connection across daemon restarts.

Standard library only, and runnable as a plain script (``python3 -I keeper.py ...``), so an
upgrade that replaces lazyfs never touches a running keeper.

The kernel keeps a FUSE connection alive as long as some process holds its /dev/fuse file open.
The daemon that mounted the connection starts a keeper (``spawn``) and hands it a dup of the fd
and the parameters INIT settled. When the daemon dies (``kill -9`` included) the connection lives
on in the keeper: requests queue in the kernel and readers wait. A new daemon asks the keeper for
the fd (``take``: a dup sent with SCM_RIGHTS over ``RUN_DIR/fuse-keeper.sock``), takes the
connection over without INIT and asks the kernel to resend what the dead daemon had read but not
answered (``FUSE_NOTIFY_RESEND``).

The keeper exits when the connection goes (unmounted or aborted: the fd polls POLLERR), or when a
daemon shutting down for good asks it to (``release``). It never reads the fd.

Under systemd, the daemon stores the fd in the service's fd store instead (``FDSTORE=1``, see
``sd_store_fd``): systemd itself then plays the keeper's part across ``systemctl restart``.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys

SOCKET_NAME = "fuse-keeper.sock"
FDSTORE_NAME = "lazyfs-fuse"
_MAX_MESSAGE = 4096
_TIMEOUT = 5.0


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


# -- the daemon's side ----------------------------------------------------------------------------


def _ask(path: str, word: bytes, *, with_fd: bool = False, timeout: float = _TIMEOUT):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # no keeper (or a dead one's socket file)
        s.sendall(word + b"\n")
        if with_fd:
            msg, fds, _flags, _addr = socket.recv_fds(s, _MAX_MESSAGE, 1)
            if not fds:
                return None
            for extra in fds[1:]:
                os.close(extra)
            return fds[0], msg
        return s.recv(_MAX_MESSAGE)


def take(path: str, timeout: float = _TIMEOUT) -> tuple[int, bytes] | None:
    """A dup of the kept /dev/fuse fd and its session parameters (JSON), or None if no keeper answers."""
    try:
        return _ask(path, b"take", with_fd=True, timeout=timeout)
    except OSError:
        return None


def alive(path: str, timeout: float = _TIMEOUT) -> bool:
    """Whether a keeper answers on *path* (then its connection must not be aborted)."""
    try:
        return bool(_ask(path, b"ping", timeout=timeout))
    except OSError:
        return False


def release(path: str, timeout: float = _TIMEOUT) -> bool:
    """Tell the keeper to let its fd go and exit (the daemon shuts down for good). False if none."""
    try:
        return _ask(path, b"release", timeout=timeout) is not None
    except OSError:
        return False


def spawn(fd: int, params: bytes, path: str, *, log_path: str | None = None) -> int:
    """Start a keeper holding a dup of *fd* and *params*, listening on *path*; its pid.

    The socket is bound here, before the keeper runs, so a daemon dying right after this call
    still leaves a keeper that answers.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o077)
        try:
            listener.bind(path)  # 0600: the daemon's user alone hands fds around
        finally:
            os.umask(old)
        listener.listen(8)
        log = open(log_path or os.devnull, "ab")
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), "--fuse-fd", str(fd), "--listen-fd",
                 str(listener.fileno()), "--socket", path, "--params", params.decode()],
                pass_fds=(fd, listener.fileno()), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, cwd="/")  # its own session: a signal to the daemon's group spares it
        return proc.pid
    finally:
        listener.close()


def notify_socket() -> str | None:
    """systemd's notification socket (``NOTIFY_SOCKET``, an abstract one with its leading NUL), or None.

    The one reading of ``$NOTIFY_SOCKET`` in lazyfs (``hostns.store_namespace_fd`` uses it too)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return None
    return "\0" + target[1:] if target.startswith("@") else target


def sd_store_fd(fd: int, name: str = FDSTORE_NAME) -> bool:
    """Put *fd* in systemd's fd store (``FDSTORE=1``) under *name*, in place of any fd stored
    under *name* before, when running under systemd with ``FileDescriptorStoreMax=`` set; False
    when not under systemd. The next start finds it in ``LISTEN_FDS``/``LISTEN_FDNAMES``
    (``sd_stored_fd``).

    The store outlives restarts: without the ``FDSTOREREMOVE=1`` sent first, each start that
    stores again (``lazyfs store-mount-namespace`` runs at every start) would add a copy, until
    ``FileDescriptorStoreMax=`` is reached and systemd refuses the newest."""
    target = notify_socket()
    if target is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        # two datagrams, handled in order: in one, systemd might apply the removal after the store
        s.sendto(f"FDSTOREREMOVE=1\nFDNAME={name}\n".encode(), target)
        # sendmsg, not socket.send_fds: the latter ignores its address argument
        s.sendmsg([f"FDSTORE=1\nFDNAME={name}\n".encode()],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, target)
    return True


def sd_remove_fd(name: str) -> bool:
    """Drop the fds stored under *name* from systemd's fd store (``FDSTOREREMOVE=1``); False
    when not under systemd."""
    target = notify_socket()
    if target is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(f"FDSTOREREMOVE=1\nFDNAME={name}\n".encode(), target)
    return True


def sd_stored_fd(name: str = FDSTORE_NAME, environ: dict[str, str] | None = None, pid: int | None = None) -> int | None:
    """The fd systemd passed to this process under *name* (``$LISTEN_PID``/``$LISTEN_FDS``/
    ``$LISTEN_FDNAMES``: the fd store handed back, or a socket), or None. *environ* and *pid*
    default to this process's own."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid() if pid is None else pid):
        return None  # meant for another process (our parent, say)
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for i in range(min(count, len(names), 1024)):
        if names[i] == name:
            return 3 + i  # SD_LISTEN_FDS_START
    return None


# -- the keeper process ---------------------------------------------------------------------------


def _unlink_own(path: str, ours: int | None) -> None:
    with contextlib.suppress(OSError):
        if ours is not None and os.stat(path).st_ino == ours:
            os.unlink(path)  # only our own socket: a newer keeper's stays


def _serve_one(conn: socket.socket, fuse_fd: int, params: bytes, path: str, ours: int | None) -> bool:
    """Answer one client; False when the keeper should exit."""
    conn.settimeout(_TIMEOUT)
    try:
        word = conn.recv(64).strip()
        if word == b"take":
            socket.send_fds(conn, [params], [fuse_fd])
        elif word == b"ping":
            conn.sendall(f"{os.getpid()}\n".encode())
        elif word == b"release":
            _unlink_own(path, ours)  # gone before the answer: whoever asks next finds no keeper
            conn.sendall(b"released\n")
            return False
    except OSError:
        pass  # a client that went away: nothing kept changes
    return True


def run(fuse_fd: int, listen_fd: int, path: str, params: bytes) -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listener = socket.socket(fileno=listen_fd)
    ours = os.stat(path).st_ino if os.path.exists(path) else None
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(fuse_fd, 0)  # never read: only POLLERR (connection unmounted or aborted) matters
    keep = True
    while keep:
        for fd, events in poller.poll():
            if fd == fuse_fd and events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                keep = False  # the connection is gone: nothing left to keep
            elif fd == listener.fileno() and events & select.POLLIN:
                conn, _ = listener.accept()
                with conn:
                    keep = _serve_one(conn, fuse_fd, params, path, ours) and keep
    _unlink_own(path, ours)
    os.close(fuse_fd)
    listener.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hold a /dev/fuse connection for lazyfs daemons")
    ap.add_argument("--fuse-fd", type=int, required=True)
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--params", required=True)
    args = ap.parse_args(argv)
    return run(args.fuse_fd, args.listen_fd, args.socket, args.params.encode())


if __name__ == "__main__":
    sys.exit(main())
