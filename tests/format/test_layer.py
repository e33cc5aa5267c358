import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.builder import BlobBuilder, split_window
from lazyfs.format.chunk import decode_chunk, encode_chunk
from lazyfs.format.layer import BLOCK_SIZE, FOOTER_SIZE, ZEROED, parse_blob, parse_tail
from tests.support.layers import build_blob


def _read_all(blob: bytes, meta) -> bytearray:
    """Reconstruct the virtual disk of a single self-contained layer."""
    out = bytearray(meta.virtual_size)
    for e in meta.extents:
        if e.chunk == ZEROED:
            continue
        c = meta.chunks[e.chunk]
        raw = decode_chunk(c.digest, blob[c.offset : c.offset + c.compressed_length], c.compression, c.raw_length)
        out[e.start * BLOCK_SIZE : e.end * BLOCK_SIZE] = raw[e.chunk_offset * BLOCK_SIZE : (e.chunk_offset + e.count) * BLOCK_SIZE]
    return out


blocks = st.lists(
    st.tuples(st.integers(0, 63), st.sampled_from(["zero", "rand", "text", "same"])), max_size=30)


@given(blocks, st.sampled_from([4096, 8192, 65536]))
@settings(max_examples=80, deadline=None)
def test_round_trip(spec, chunk_size):
    size = 64 * BLOCK_SIZE
    model = bytearray(size)
    rng = random.Random(len(spec))
    for block, kind in spec:
        data = {"zero": bytes(BLOCK_SIZE), "rand": rng.randbytes(BLOCK_SIZE),
                "text": (b"lazyfs %d " % block) * 400, "same": b"\x07" * BLOCK_SIZE}[kind][:BLOCK_SIZE]
        model[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE] = data.ljust(BLOCK_SIZE, b"\0")
    blob, digest, meta = build_blob(size, [(0, bytes(model))], chunk_size=chunk_size)
    assert _read_all(blob, meta) == model
    # all-zero blocks are never stored, every chunk is within the chunk size, and identical chunks are stored once
    assert all(c.raw_length <= chunk_size for c in meta.chunks)
    assert len({c.digest for c in meta.chunks}) == len(meta.chunks)
    stored = sum(e.count for e in meta.extents)
    nonzero = sum(1 for b in range(64) if any(model[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]))
    assert stored == nonzero
    footer, meta2 = parse_tail(blob[meta_offset(blob):], len(blob))
    assert meta2 == meta


def meta_offset(blob: bytes) -> int:
    footer, _ = parse_blob(blob)
    return footer.meta_offset


def test_split_window_skips_zero_blocks():
    z, a = bytes(BLOCK_SIZE), b"a" * BLOCK_SIZE
    assert [(s, len(r)) for s, r in split_window(10, z + a + a + z + a)] == [(11, 2 * BLOCK_SIZE), (14, BLOCK_SIZE)]
    assert list(split_window(0, z * 3)) == []


def test_compression_falls_back_to_raw():
    noise = os.urandom(BLOCK_SIZE)
    digest, stored, compression = encode_chunk(noise)
    assert compression == 0 and stored == noise
    digest, stored, compression = encode_chunk(bytes(100) + b"x" * (BLOCK_SIZE - 100))
    assert compression == 1 and len(stored) < BLOCK_SIZE


def test_dedup_against_known_chunks():
    data = os.urandom(BLOCK_SIZE) * 1 + b"q" * BLOCK_SIZE
    lower_blob, lower_digest, lower_meta = build_blob(16 * BLOCK_SIZE, [(0, data)], chunk_size=BLOCK_SIZE)
    known = {loc.digest: loc for loc in lower_meta.locations(lower_digest)}
    blob, _, meta = build_blob(16 * BLOCK_SIZE, [(5, data)], chunk_size=BLOCK_SIZE, known=known)
    assert meta.blobs == ("", lower_digest)
    assert all(c.blob == 1 for c in meta.chunks)
    footer, _ = parse_blob(blob)
    assert footer.meta_offset == 0  # no frames stored at all


def test_builder_rejects_out_of_order_and_out_of_range():
    b = BlobBuilder(8 * BLOCK_SIZE, 4 * BLOCK_SIZE)
    d, s, c = encode_chunk(b"x" * BLOCK_SIZE)
    b.add_chunk(4, d, s, c, BLOCK_SIZE)
    with pytest.raises(FormatError):
        b.add_chunk(2, d, s, c, BLOCK_SIZE)
    with pytest.raises(FormatError):
        b.add_zeroed(7, 5)
    with pytest.raises(FormatError):
        BlobBuilder(1000, 4096)
    with pytest.raises(FormatError):
        BlobBuilder(8192, 3000)


def _small_blob() -> bytes:
    rng = random.Random(7)
    writes = [(0, b"hello".ljust(BLOCK_SIZE, b"\1")), (3, rng.randbytes(BLOCK_SIZE)),
              (4, b"abc" * 2730 + b"ab"), (9, b"z" * BLOCK_SIZE)]
    blob, _, _ = build_blob(16 * BLOCK_SIZE, writes, zeroed=[(12, 2)], chunk_size=2 * BLOCK_SIZE)
    return blob


def _parse_and_read(blob: bytes) -> bytearray:
    _, meta = parse_blob(blob)
    return _read_all(blob, meta)


def test_every_single_byte_corruption_is_caught():
    blob = _small_blob()
    good = _parse_and_read(blob)
    for i in range(len(blob)):
        for flip in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= flip
            try:
                got = _parse_and_read(bytes(bad))
            except (FormatError, IntegrityError):
                continue
            raise AssertionError(f"flipping byte {i} (^{flip:#x}) was not detected (same data: {got == good})")


def test_every_truncation_is_caught():
    blob = _small_blob()
    for n in range(len(blob)):
        with pytest.raises((FormatError, IntegrityError)):
            _parse_and_read(blob[:n])
    with pytest.raises((FormatError, IntegrityError)):
        _parse_and_read(blob + b"\0")


@given(st.binary(max_size=300))
@settings(max_examples=200)
def test_garbage_never_crashes(data):
    with pytest.raises((FormatError, IntegrityError)):
        parse_blob(data + _small_blob()[-FOOTER_SIZE:] if len(data) % 2 else data)


def test_decode_chunk_refuses_a_frame_with_anything_around_it():
    """A chunk's stored bytes must be exactly one zstd frame of its declared size: trailing bytes,
    a second frame, a truncated frame or a wrong declared size are IntegrityError, never bytes.
    Broken on purpose: `allow_extra_data=True` in `_decompress_exact` returned the chunk for the
    trailing-bytes and second-frame cases (red)."""
    import zstandard

    raw = bytes(range(256)) * 1024  # 256 KiB, compressible
    digest, stored, compression = encode_chunk(raw)
    assert decode_chunk(digest, stored, compression, len(raw)) == raw
    other = zstandard.ZstdCompressor(write_content_size=True).compress(raw[: len(raw) // 2])
    for bad in (stored + b"\0", stored + stored, stored[:-1], stored[: len(stored) // 2], other):
        with pytest.raises(IntegrityError):
            decode_chunk(digest, bad, compression, len(raw))
    with pytest.raises(IntegrityError):
        decode_chunk(digest, stored, compression, len(raw) - 1)
