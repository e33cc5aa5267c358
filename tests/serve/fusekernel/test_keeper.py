"""The fd keeper as a process, without FUSE: a pipe's read end stands in for /dev/fuse.

It hands out dups of the very file it holds (SCM_RIGHTS), answers pings, exits on release (its
socket gone before the answer), and exits by itself once the kept file reports a hangup, as a
/dev/fuse fd reports POLLERR once its connection is unmounted or aborted.
"""

from __future__ import annotations

import os
import time

import pytest

from lazyfs.serve.fusekernel import keeper

PARAMS = b'{"minor": 40}'


@pytest.fixture
def kept(tmp_path):
    r, w = os.pipe()
    path = keeper.socket_path(str(tmp_path))
    pid = keeper.spawn(r, PARAMS, path, log_path=str(tmp_path / "keeper.log"))
    os.close(r)  # the keeper's copy is the one that counts now
    yield path, w, pid
    keeper.release(path)
    try:
        os.close(w)
    except OSError:
        pass
    _reap(pid)


def _reap(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True  # reaped already
        if done:
            return True
        time.sleep(0.02)
    return False


def test_take_hands_out_a_dup_of_the_kept_file(kept):
    path, w, _pid = kept
    assert keeper.alive(path)
    got = keeper.take(path)
    assert got is not None
    fd, params = got
    try:
        assert params == PARAMS
        os.write(w, b"same file")
        assert os.read(fd, 100) == b"same file"  # one open file: what the keeper holds, not a copy
    finally:
        os.close(fd)
    assert keeper.take(path) is not None  # as many times as daemons come
    os.close(keeper.take(path)[0])


def test_release_ends_the_keeper(kept):
    path, _w, pid = kept
    assert keeper.release(path)
    assert not os.path.exists(path)  # gone before the answer: the next daemon finds no keeper
    assert _reap(pid)
    assert keeper.take(path) is None and not keeper.alive(path) and not keeper.release(path)


def test_the_keeper_goes_when_its_connection_goes(kept):
    path, w, pid = kept
    os.close(w)  # the read end hangs up, as /dev/fuse reports POLLERR after an abort
    assert _reap(pid)
    assert not os.path.exists(path)


def test_systemd_fd_store_messages(tmp_path, monkeypatch):
    """What the daemon tells systemd (a datagram socket stands in for NOTIFY_SOCKET), and how it
    finds the fd again in LISTEN_FDS/LISTEN_FDNAMES after a restart."""
    import socket

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert keeper.sd_store_fd(0) is False  # not under systemd: nothing sent
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        r, w = os.pipe()
        try:
            assert keeper.sd_store_fd(r)
            # an fd stored before under the name goes first: restarts leave no duplicates
            assert socket.recv_fds(listener, 4096, 4)[:2] == (b"FDSTOREREMOVE=1\nFDNAME=lazyfs-fuse\n", [])
            msg, fds, _flags, _addr = socket.recv_fds(listener, 4096, 4)
            assert msg == b"FDSTORE=1\nFDNAME=lazyfs-fuse\n" and len(fds) == 1
            os.write(w, b"x")
            assert os.read(fds[0], 1) == b"x"  # the very file
            os.close(fds[0])
        finally:
            os.close(r)
            os.close(w)
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "other:lazyfs-fuse")
    assert keeper.sd_stored_fd() == 4
    monkeypatch.setenv("LISTEN_PID", "1")  # meant for another process
    assert keeper.sd_stored_fd() is None
