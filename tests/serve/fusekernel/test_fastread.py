"""The FUSE worker threads' READ path in C (lazyfs/serve/fusekernel/native/fastread.c), alone.

A SOCK_SEQPACKET socket pair stands in for /dev/fuse (one message per read(2), as the device
gives one request): the test writes FUSE requests into one end, ``Server.serve`` reads them from
the other and answers there. The layer files are real files with real maps (``BlockMap``). Real
FUSE, with the daemon's threads, is in test_warm_threads.py.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import socket
import struct
import threading

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.device.merged import DECLINE, EXTENT
from lazyfs.fetch.flatmap import HASH_LEN, BlockMap, block_hashes
from lazyfs.serve.fusekernel import fastpath
from lazyfs.serve.fusekernel import protocol as p

BS = 4096
_fastread = pytest.importorskip("lazyfs.serve.fusekernel._fastread", reason="the C READ path is not built")


def test_the_c_path_is_built_here():
    """scripts/setup.sh builds it (pip install -e): a host that runs the tests has it."""
    assert fastpath.available(), fastpath.why_unavailable()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 4), st.booleans())
def test_its_block_hash_is_blake3_128(seed, blocks, patterned):
    """The hash C checks is the one the maps record (lazyfs.fetch.flatmap.block_hashes)."""
    rng = random.Random(seed)
    data = (rng.randbytes(7) * (blocks * BS))[: blocks * BS] if patterned else rng.randbytes(blocks * BS)
    assert _fastread.block_hashes(data, BS) == block_hashes(data, BS) == b"".join(
        blake3.blake3(data[i:i + BS]).digest(HASH_LEN) for i in range(0, len(data), BS))


class Layer:
    """A layer file of *blocks* random blocks; ``hold`` lists blocks in its map, as verified."""

    def __init__(self, tmp_path, name: str, blocks: int, seed: int) -> None:
        self.data = random.Random(seed).randbytes(blocks * BS)
        path = tmp_path / name
        path.write_bytes(self.data)
        self.fd = os.open(path, os.O_RDWR)
        self.map = BlockMap(blocks, BS)

    def hold(self, start: int, end: int) -> None:
        self.map.set(start, block_hashes(self.data[start * BS:end * BS], BS))

    def entry(self) -> tuple:
        return (self.fd, *self.map.buffers(), self.map.blocks)


def _extents(*rows) -> bytes:
    return b"".join(EXTENT.pack(*row) for row in rows)


def _read_request(unique: int, fh: int, offset: int, size: int) -> bytes:
    body = p.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
    return p.IN_HEADER.pack(p.IN_HEADER.size + len(body), p.READ, unique, 5, 0, 0, 0, 0, 0) + body


class Pair:
    """The kernel's end (``kernel``) and the daemon's (``fd``) of a stand-in connection."""

    def __init__(self) -> None:
        self.kernel, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        daemon.setblocking(False)
        self.daemon = daemon
        self.fd = daemon.fileno()
        self.wake_r, self.wake_w = os.pipe()
        self.buf = bytearray(p.READ_BUFFER)

    def close(self) -> None:
        self.kernel.close()
        self.daemon.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


@pytest.fixture
def pair():
    pr = Pair()
    yield pr
    pr.close()


def _serve_one(server, pair: Pair, request: bytes):
    """Send *request* and a marker after it; serve until the marker comes back to Python.
    Returns (the reply to the request or None, what serve handed back first)."""
    marker = p.IN_HEADER.pack(p.IN_HEADER.size, p.GETATTR, 999, 1, 0, 0, 0, 0, 0)
    pair.kernel.send(request)
    pair.kernel.send(marker)
    n = server.serve(pair.fd, pair.wake_r, pair.buf)
    handed = bytes(pair.buf[:n])
    if handed == request:  # declined: the marker is still queued
        n = server.serve(pair.fd, pair.wake_r, pair.buf)
        assert bytes(pair.buf[:n]) == marker
        return None, handed
    assert handed == marker
    pair.kernel.setblocking(False)
    try:
        reply = pair.kernel.recv(1 << 22)
    finally:
        pair.kernel.setblocking(True)
    return reply, handed


def _data_of(reply: bytes, unique: int) -> bytes:
    length, error, uniq = p.OUT_HEADER.unpack_from(reply)
    assert (length, error, uniq) == (len(reply), 0, unique)
    return reply[p.OUT_HEADER.size:]


def test_reads_across_layers_and_holes_equal_the_model(tmp_path, pair):
    """Two layers, a hole between their extents and a hole at the end; reads of every alignment
    (within a block, across extents, over the device's end) equal the model, byte for byte."""
    size_blocks = 40
    lower, upper = Layer(tmp_path, "lower", 32, 1), Layer(tmp_path, "upper", size_blocks, 2)
    lower.hold(0, 32)
    upper.hold(0, size_blocks)
    rows = [(0, 10, 0), (10, 14, 1), (20, 30, 0), (30, 34, 1)]  # holes: 14-20 and 34-40
    model = bytearray(size_blocks * BS)
    for start, end, layer in rows:
        src = (lower, upper)[layer].data
        model[start * BS:end * BS] = src[start * BS:end * BS]
    size = size_blocks * BS - 1000  # the last block is partial
    server, counter = _fastread.Server(), _fastread.Counter()
    server.add(7, (counter,), size, BS, _extents(*rows), [lower.entry(), upper.entry()])
    rng = random.Random(3)
    cases = [(0, BS), (100, 50), (9 * BS + 7, 2 * BS), (13 * BS, 8 * BS), (0, size), (size - 10, 4 * BS)]
    cases += [(rng.randrange(size), rng.randrange(1, 300_000)) for _ in range(40)]
    for i, (off, length) in enumerate(cases):
        reply, _ = _serve_one(server, pair, _read_request(100 + i, 7, off, length))
        assert reply is not None, (off, length)
        assert _data_of(reply, 100 + i) == model[off:min(off + length, size)], (off, length)
    assert counter.reads == len(cases) and counter.declined == 0 and counter.inflight == 0


@pytest.mark.parametrize("fault", ["not-held", "tampered", "mapped", "no-file", "other-fh", "resent", "past-end"])
def test_what_it_is_not_sure_of_is_handed_back_untouched(tmp_path, pair, fault):
    """Every READ the C path cannot answer exactly as Python would comes back to Python as it
    came, with nothing written to the connection. (Broken on purpose once: ``hashes_match``
    accepting a mismatch made the "tampered" row answer, and it went red.)"""
    layer = Layer(tmp_path, "layer", 16, 4)
    layer.hold(0, 16)
    kind = 0
    fd = layer.fd
    if fault == "not-held":
        layer.map.clear(5, 1)
    elif fault == "tampered":
        os.pwrite(layer.fd, bytes([layer.data[5 * BS + 17] ^ 0xFF]), 5 * BS + 17)
    elif fault == "mapped":
        kind = DECLINE
    elif fault == "no-file":
        fd = -1
    server, counter = _fastread.Server(), _fastread.Counter()
    server.add(7, (counter,), 16 * BS, BS, _extents((0, 16, kind)), [(fd, *layer.map.buffers(), 16)])
    fh, unique, off = 7, 1, 4 * BS
    if fault == "other-fh":
        fh = 8
    elif fault == "resent":
        unique |= p.UNIQUE_RESEND
    elif fault == "past-end":
        off = 16 * BS
    request = _read_request(unique, fh, off, 2 * BS)
    reply, handed = _serve_one(server, pair, request)
    assert reply is None and handed == request
    assert counter.reads == 0


def test_a_plan_outlives_its_map_objects_until_discarded(tmp_path, pair):
    """The plan holds the map's buffers: dropping every Python reference to them does not free
    what C reads; ``discard`` does (and a second discard finds nothing)."""
    layer = Layer(tmp_path, "layer", 8, 5)
    layer.hold(0, 8)
    server, counter = _fastread.Server(), _fastread.Counter()
    server.add(1, (counter,), 8 * BS, BS, _extents((0, 8, 0)), [layer.entry()])
    layer.map = None
    gc.collect()
    reply, _ = _serve_one(server, pair, _read_request(2, 1, 0, 8 * BS))
    assert _data_of(reply, 2) == layer.data
    assert server.plans() == 1 and server.discard(1) is True and server.discard(1) is False
    assert server.plans() == 0
    reply, handed = _serve_one(server, pair, _read_request(3, 1, 0, BS))
    assert reply is None


@pytest.mark.parametrize("bad", ["unsorted", "overlap", "empty", "layer", "bits", "hashes", "block-size", "counters"])
def test_a_bad_plan_is_refused(tmp_path, bad):
    layer = Layer(tmp_path, "layer", 8, 6)
    bits, hashes = layer.map.buffers()
    rows, files, bs, counters = [(0, 4, 0), (4, 8, 0)], [(layer.fd, bits, hashes, 8)], BS, (_fastread.Counter(),)
    if bad == "unsorted":
        rows = rows[::-1]
    elif bad == "overlap":
        rows = [(0, 5, 0), (4, 8, 0)]
    elif bad == "empty":
        rows = [(3, 3, 0)]
    elif bad == "layer":
        rows = [(0, 8, 1)]
    elif bad == "bits":
        files = [(layer.fd, bytearray(0), hashes, 8)]
    elif bad == "hashes":
        files = [(layer.fd, bits, bytearray(7 * HASH_LEN), 8)]
    elif bad == "block-size":
        bs = 1000
    else:
        counters = ()
    server = _fastread.Server()
    with pytest.raises((ValueError, TypeError)):
        server.add(1, counters, 8 * BS, bs, _extents(*rows), files)
    assert server.plans() == 0


def test_stop_wakes_a_thread_waiting_for_requests(pair):
    """``stop`` and a byte on the wake-up pipe end a serve() that waits in poll: it returns 0."""
    server = _fastread.Server()
    result = []
    t = threading.Thread(target=lambda: result.append(server.serve(pair.fd, pair.wake_r, pair.buf)))
    t.start()
    server.stop()
    os.write(pair.wake_w, b"x")
    t.join(timeout=30)
    assert not t.is_alive() and result == [0]
    server.start()
    pair.kernel.send(_read_request(1, 1, 0, BS))  # started again: serves (hands back: no plan)
    assert server.serve(pair.fd, pair.wake_r, pair.buf) > 0


def test_a_closed_connection_is_reported(pair):
    server = _fastread.Server()
    pair.kernel.close()
    # read(2) of a closed peer gives 0 bytes; /dev/fuse gives ENODEV once unmounted: both end it
    assert server.serve(pair.fd, pair.wake_r, pair.buf) == -errno.ENODEV


def test_a_read_unpacks_as_the_protocol_says():
    """The request the tests build is the one protocol.py parses (so the C offsets are checked
    against the Python codec, not against themselves)."""
    req = p.parse_request(_read_request(5, 7, 3 * BS, 2 * BS))
    assert (req.header.opcode, req.header.unique, req.args) == (p.READ, 5, p.Read(7, 3 * BS, 2 * BS))
    assert struct.calcsize("<QQi4x") == EXTENT.size == 24


# -- local readahead (docs/warm.md §4) --------------------------------------------------------------

WINDOW = 64  # blocks (256 KiB): a window is asked for after one READ per 8 of its pages
HINT_AFTER = WINDOW * BS // (8 * 4096)


def _read_request_flags(unique: int, fh: int, offset: int, size: int, flags: int) -> bytes:
    body = p.READ_IN.pack(fh, offset, size, 0, 0, flags, 0)
    return p.IN_HEADER.pack(p.IN_HEADER.size + len(body), p.READ, unique, 5, 0, 0, 0, 0, 0) + body


def _hinting(tmp_path, blocks: int, window: int = WINDOW):
    """A server with one plan (fh 7) over a layer of *blocks* blocks, all held, whose READs may
    ask for windows of *window* blocks through a registered file (never read by these tests:
    no hint thread runs unless a test starts one)."""
    layer = Layer(tmp_path, "layer", blocks, 6)
    layer.hold(0, blocks)
    hint_fd = os.open(tmp_path / "hint", os.O_RDWR | os.O_CREAT)
    server, counter = _fastread.Server(), _fastread.Counter()
    server.hint_file(hint_fd, 11)
    server.add(7, (counter,), blocks * BS, BS, _extents((0, blocks, 0)), [layer.entry()], hint_fd, 11, window)
    return server, counter, layer, hint_fd


def _reads(server, pair, blocks, flags: int = 0) -> None:
    for i, b in enumerate(blocks):
        reply, _ = _serve_one(server, pair, _read_request_flags(1000 + i, 7, b * BS, BS, flags))
        assert reply is not None


def test_a_densely_read_local_window_is_asked_for_once_then_counted_again(tmp_path, pair):
    """The READ after HINT_AFTER others in a window queues it, once; its count starts again from 0.
    (Broken on purpose once: the reset removed, every later READ queued the window again.)"""
    server, counter, _, hint_fd = _hinting(tmp_path, 2 * WINDOW)
    _reads(server, pair, range(HINT_AFTER))
    assert counter.hints == 0 and server.hint_stats()["queued"] == 0
    _reads(server, pair, [HINT_AFTER])
    assert counter.hints == 1 and server.hint_stats()["queued"] == 1
    _reads(server, pair, range(HINT_AFTER + 1, 2 * HINT_AFTER + 1))
    assert counter.hints == 1
    _reads(server, pair, [2 * HINT_AFTER + 1])
    assert counter.hints == 2
    os.close(hint_fd)


def test_a_read_of_a_whole_window_asks_for_nothing(tmp_path, pair):
    """The kernel holds all of it once that READ is answered."""
    server, counter, _, hint_fd = _hinting(tmp_path, 16, window=8)  # 2 READs before asking
    _reads(server, pair, [8, 9])
    reply, _ = _serve_one(server, pair, _read_request_flags(2000, 7, 8 * BS, 8 * BS, 0))
    assert reply is not None and counter.hints == 0
    _reads(server, pair, [10])
    assert counter.hints == 1
    os.close(hint_fd)


@pytest.mark.parametrize("why", ["a block not held", "O_DIRECT", "not registered", "no window"])
def test_a_window_is_never_asked_for_when(tmp_path, pair, why):
    """Not when one of its blocks is not held (the hint would make the daemon fetch), not for an
    O_DIRECT reader (it never reads the page cache), not through a file forgotten, not when off."""
    server, counter, layer, hint_fd = _hinting(tmp_path, WINDOW, window=0 if why == "no window" else WINDOW)
    flags = 0
    if why == "a block not held":
        layer.map.clear(WINDOW - 1, 1)
    elif why == "O_DIRECT":
        flags = os.O_DIRECT
    elif why == "not registered":
        assert server.forget_hint_file(hint_fd, 11) is True
    _reads(server, pair, range(3 * HINT_AFTER), flags)
    assert counter.hints == 0 and server.hint_stats()["queued"] == 0
    os.close(hint_fd)


def test_the_queue_is_bounded_and_says_what_it_dropped(tmp_path, pair):
    """With no hint thread taking them, 64 windows wait and the rest are dropped, counted.
    (Broken on purpose once: without the length check the ring overwrote queued windows.)"""
    server, counter, _, hint_fd = _hinting(tmp_path, 80 * 8, window=8)  # 2 READs before asking
    for w in range(80):
        _reads(server, pair, [w * 8, w * 8 + 1, w * 8 + 2])
    stats = server.hint_stats()
    assert (stats["queued"], stats["dropped"], counter.hints) == (64, 16, 64)
    os.close(hint_fd)


def test_the_hint_thread_asks_forgets_and_stops(tmp_path, pair):
    """``hints`` takes each queued window (an fadvise on the registered file), ``forget_hint_file``
    drops a file's queued windows and returns once the thread is not using it, ``stop_hints``
    ends the thread."""
    server, counter, _, hint_fd = _hinting(tmp_path, 4 * WINDOW)
    server.start()
    thread = threading.Thread(target=server.hints)
    thread.start()
    try:
        _reads(server, pair, range(HINT_AFTER + 1))
        for _ in range(1000):
            if server.hint_stats()["issued"] == 1:
                break
            threading.Event().wait(0.005)
        stats = server.hint_stats()
        assert (stats["issued"], stats["queued"], counter.hints) == (1, 0, 1)
        assert server.forget_hint_file(hint_fd, 11) is True and server.forget_hint_file(hint_fd, 11) is False
        assert server.hint_stats()["files"] == 0
    finally:
        server.stop_hints()
        thread.join(timeout=10)
    assert not thread.is_alive()
    os.close(hint_fd)
