"""The uio fd keeper of a TCMU LUN (lazyfs/serve/tcmu/keep.py), on the host with a stand-in fd.

A real keeper process holds the fd; ``take`` gets a dup of the same open file back, with the
device name; ``release`` lets it go. (The real uio device is exercised in the qemu guest by
test_tcmu_restart.py.)
"""

from __future__ import annotations

import os

from lazyfs.serve.fusekernel import keeper
from lazyfs.serve.tcmu import keep


def test_keep_take_release(tmp_path):
    run_dir = str(tmp_path)
    name = "n" * 64  # the longest TCMU name still makes a short enough socket path
    path = keep.socket_path(run_dir, name)
    assert len(path.encode()) < 108 and path != keep.socket_path(run_dir, "other")
    stand_in = tmp_path / "uio-stand-in"
    stand_in.write_bytes(b"ring")
    fd = os.open(stand_in, os.O_RDWR)
    try:
        keep.keep(run_dir, name, fd, "uio7")
    finally:
        os.close(fd)  # the daemon dies: the keeper still holds the file
    assert keeper.alive(path)
    assert keep.take(run_dir, "other") is None
    got = keep.take(run_dir, name)
    assert got is not None
    taken, uio, kind = got
    try:
        assert (uio, kind) == ("uio7", "keeper")
        assert os.fstat(taken).st_ino == stand_in.stat().st_ino
    finally:
        os.close(taken)
    assert keeper.alive(path)  # taking leaves it kept: the next daemon may die too
    keep.release(run_dir, name)
    assert not keeper.alive(path)
