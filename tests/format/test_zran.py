"""Sparse gzip windows (lazyfs.format.zran.sparse_window): inflating from a checkpoint with one gives the same
bytes as with the whole window, for every kind of deflate block, and it keeps only bytes that are referred to."""

import gzip
import random

import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.format.zran import WINDOW, GzipScanner, inflate_from, sparse_window
from tests.format.test_spanindex import _stream


def _mixed(seed: int, size: int) -> bytes:
    """``_stream``'s text, zeros and random runs, with copies of what came before spliced in: back-references
    that often reach into a checkpoint's window."""
    base = _stream(seed, size)
    rnd = random.Random(seed)
    out = bytearray()
    for start in range(0, size, 50_000):
        out += base[start:start + 50_000]
        at = rnd.randrange(len(out))
        out += out[at:at + rnd.randint(1, 20_000)]
    return bytes(out[:size])


def _checkpoints(blob: bytes, spacing: int):
    scanner = GzipScanner(spacing)
    out = b"".join(scanner.feed(blob))
    scanner.finish()
    return out, scanner.checkpoints


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1 << 30), level=st.integers(1, 9), spacing=st.sampled_from([8 << 10, 40 << 10]))
def test_a_sparse_window_inflates_to_the_same_bytes(seed: int, level: int, spacing: int) -> None:
    data = _mixed(seed, 300_000)
    blob = gzip.compress(data, level)
    out, checkpoints = _checkpoints(blob, spacing)
    assert out == data
    for cp in checkpoints:
        if not cp.window:
            continue
        rest = min(len(data) - cp.out, 3 * WINDOW)
        sparse = sparse_window(blob[cp.start:], cp.bits, cp.window, len(data) - cp.out, "test")
        assert len(sparse) in (0, len(cp.window))
        assert inflate_from(blob[cp.start:], cp.bits, sparse, 0, rest, "test") == data[cp.out:cp.out + rest]


def test_a_sparse_window_keeps_only_what_is_referred_to_and_packs_small() -> None:
    data = _mixed(7, 1_500_000)
    blob = gzip.compress(data, 6)
    _, checkpoints = _checkpoints(blob, 64 << 10)
    pack = zstandard.ZstdCompressor(level=9).compress
    whole = sparse_total = 0
    kept = 0
    for cp in checkpoints:
        if len(cp.window) != WINDOW:
            continue
        sparse = sparse_window(blob[cp.start:], cp.bits, cp.window, len(data) - cp.out, "test")
        whole += len(pack(cp.window))
        sparse_total += len(pack(sparse)) if sparse else 0
        if not sparse:
            continue
        # each kept byte is referred to: changing it changes what the checkpoint inflates to
        rest = min(len(data) - cp.out, WINDOW)
        at = next(i for i, b in enumerate(sparse) if b)
        changed = bytearray(sparse)
        changed[at] ^= 0xFF
        assert inflate_from(blob[cp.start:], cp.bits, bytes(changed), 0, rest, "test") != data[cp.out:cp.out + rest]
        kept += 1
    assert kept >= 5
    assert sparse_total * 3 < whole, (sparse_total, whole)


def test_a_window_nothing_refers_to_is_dropped() -> None:
    """Random bytes after a checkpoint are stored blocks or literals: no window is needed to inflate them."""
    rnd = random.Random(4)
    text = " ".join(str(rnd.randint(0, 999)) for _ in range(40_000)).encode()
    data = text + rnd.randbytes(200_000)
    blob = gzip.compress(data, 6)
    _, checkpoints = _checkpoints(blob, 64 << 10)
    after = [cp for cp in checkpoints if cp.out > len(text) and cp.window]
    assert after
    for cp in after:
        assert sparse_window(blob[cp.start:], cp.bits, cp.window, len(data) - cp.out, "test") == b""
