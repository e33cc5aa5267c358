"""Local readahead (docs/warm.md §4), end to end: real registry, daemon, FUSE, loop device and ext4.

The daemon's C READ path counts the READs answered in each window of the exported file; a READ in a
window that had one READ per 8 of its pages before it, and whose blocks are all on local disk, asks
the kernel (posix_fadvise WILLNEED through the daemon's own open file of the export) to read the
whole window into the page cache, so a reader's later reads there never reach the daemon. Checked here, each broken on purpose
once (2026-12-07) and seen red:

* a window with blocks not yet fetched is never asked for, so the hint never makes the daemon fetch
  (broken: ``local_range`` in native/fastread.c answering 1: ``hints`` 1, and three more chunks
  fetched);
* a window of local blocks is read whole into the page cache, with the image's bytes, and the reader's
  later reads there reach no daemon (broken: ``maybe_hint`` not called: no hint issued);
* evicted, that window is asked for again only after as many READs as the first time (broken: its
  count not reset when it was asked for: a hint on the first READ);
* an O_DIRECT reader (a direct-I/O loop) gets no hints: it never reads the page cache (broken: the
  O_DIRECT test removed: a hint);
* ``lazyfs umount`` closes the daemon's own file, so the export is not kept busy (broken: ``remove``
  not closing it: the umount failed with "still open").
"""

import ctypes
import json
import mmap
import os
import time

import pytest

from lazyfs.serve.control import call
from tests.serve.conftest import leftovers

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop]

WINDOW = 1 << 20
CHUNK = 256 << 10  # the image's chunk size (DEFAULT_CHUNK_SIZE): four chunks per window
PAGE = 4096
HINT_AFTER = max(2, WINDOW // (8 * PAGE))  # READs in C a window needs before the next one asks (fastread.c)


@pytest.fixture(scope="module")
def renv(env):
    # no chunk readahead after a miss (it would make a window local by itself), no hydrated file
    # (it would pass later opens through), two FUSE worker threads (the C path)
    env.doc.update(local_readahead=WINDOW, readahead_chunks=0, hydrated_max_bytes=0, fuse_threads=2)
    with open(env.config_path, "w") as f:
        json.dump(env.doc, f)
    with open(env.flat, "rb") as f:
        env.want = f.read()
    return env


def _fuse(env) -> dict:
    return call(env.socket, "fuse-stats", timeout=30)


def _fetches(env) -> int:
    return call(env.socket, "stats", timeout=30)["scheduler"]["fetches"]


def _idle_hints(env) -> dict:
    """The local readahead counters once nothing is queued (bounded wait)."""
    for _ in range(200):
        ra = _fuse(env)["local_readahead"]
        if ra["queued"] == 0:
            return ra
        time.sleep(0.01)
    raise AssertionError(f"hints still queued: {ra}")


def _data_windows(want: bytes) -> list[int]:
    """Windows each of whose chunks holds data (so none of them is local before it is read)."""
    return [w for w in range(len(want) // WINDOW)
            if all(any(want[w * WINDOW + c * CHUNK:w * WINDOW + (c + 1) * CHUNK]) for c in range(WINDOW // CHUNK))]


def _resident(fd: int, offset: int, length: int) -> int:
    """Pages of [offset, offset + length) of the file in the page cache, up to date (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = ctypes.create_string_buffer(length // PAGE)
        assert libc.mincore(addr, length, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(b & 1 for b in vec.raw)
    finally:
        libc.munmap(addr, length)


def _open_random(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead: each read is its own page
    return fd


@pytest.fixture(scope="module")
def mounted(renv):
    target = renv.tmp / "mnt-ra"
    target.mkdir()
    info = json.loads(renv.lazyfs("mount", renv.ref, str(target), "--json").stdout)
    assert info["loop_route"] == "buffered"
    yield info
    renv.lazyfs("umount", str(target))  # fails while the export is kept open
    assert leftovers(renv) == []


def test_a_window_with_blocks_not_fetched_is_never_read_ahead(renv, mounted):
    env = renv
    windows = _data_windows(env.want)
    assert len(windows) >= 2, "the test image needs two windows of data"
    w = windows[-1]
    assert _fuse(env)["local_readahead"]["window"] == WINDOW
    fd = _open_random(mounted["path"])
    try:
        before = _fetches(env)
        base = w * WINDOW
        assert os.pread(fd, PAGE, base) == env.want[base:base + PAGE]  # a miss: its chunk is fetched
        fetched = _fetches(env)
        assert fetched > before
        # more reads of other pages of the same chunk: one planning the handle, then HINT_AFTER + 1 in C
        for k in range(1, HINT_AFTER + 3):
            at = base + k * PAGE
            assert os.pread(fd, PAGE, at) == env.want[at:at + PAGE]
        ra = _idle_hints(env)
        assert ra["hints"] == 0, ra  # three chunks of the window are not local: nothing asked for
        assert _fetches(env) == fetched  # and nothing fetched behind the reader's back
    finally:
        os.close(fd)


def test_a_local_window_is_read_whole_into_the_page_cache(renv, mounted):
    env = renv
    path = mounted["path"]
    # every block local: one O_DIRECT pass (no page cache filled)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, WINDOW)
    try:
        at = 0
        while at < len(env.want):
            n = os.preadv(fd, [buf], at)
            assert n > 0
            at += n
    finally:
        os.close(fd)
    fd = _open_random(path)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the earlier test's pages out of the cache
        w = _data_windows(env.want)[0]
        base = w * WINDOW
        issued = _idle_hints(env)["issued"]
        for k in range(HINT_AFTER + 2):  # the first plans the handle; the last READ in C asks
            at = base + k * 2 * PAGE
            assert os.pread(fd, PAGE, at) == env.want[at:at + PAGE]
        ra = _idle_hints(env)
        assert ra["hints"] >= 1 and ra["issued"] >= issued + 1, ra
        for _ in range(500):  # the READs the hint caused are answered in the background
            if _resident(fd, base, WINDOW) == WINDOW // PAGE:
                break
            time.sleep(0.01)
        reads = _fuse(env)["reads"]
        got = b"".join(os.pread(fd, PAGE, base + i) for i in range(0, WINDOW, PAGE))
        assert got == env.want[base:base + WINDOW]
        assert _fuse(env)["reads"] == reads  # the whole window came from the page cache

        # evicted, the window must be read densely again before it is asked for again: its count
        # started from 0 when it was asked for (bounds the disk reads a sparse reader causes)
        os.posix_fadvise(fd, base, WINDOW, os.POSIX_FADV_DONTNEED)
        hints = _idle_hints(env)["hints"]
        for k in range(HINT_AFTER):
            at = base + (2 * k + 1) * PAGE
            assert os.pread(fd, PAGE, at) == env.want[at:at + PAGE]
        assert _idle_hints(env)["hints"] == hints
        at = base + (2 * HINT_AFTER + 1) * PAGE
        assert os.pread(fd, PAGE, at) == env.want[at:at + PAGE]
        assert _idle_hints(env)["hints"] == hints + 1
    finally:
        os.close(fd)


def test_an_o_direct_reader_gets_no_hints(renv, mounted):
    env = renv
    fd = os.open(mounted["path"], os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, PAGE)
    try:
        hints = _idle_hints(env)["hints"]
        base = _data_windows(env.want)[1] * WINDOW
        for k in range(HINT_AFTER + 4):
            at = base + k * 2 * PAGE
            assert os.preadv(fd, [buf], at) == PAGE and bytes(buf) == env.want[at:at + PAGE]
        assert _idle_hints(env)["hints"] == hints
    finally:
        os.close(fd)
