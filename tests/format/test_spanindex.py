"""Span maps: every span of every codec decodes on its own from its compressed range and checks its digest."""

from __future__ import annotations

import gzip
import io
import random
import subprocess

import pytest
import zstandard

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.spanindex import (
    ZSTD_WHOLE,
    MappedExtent,
    build_spans,
    decode_location,
    decode_span_map,
    encode_span_map,
    read_tar_range,
)

SPAN = 64 << 10


def _stream(seed: int, size: int) -> bytes:
    """Text, zeros and random runs: gzip emits fixed, dynamic and stored blocks for them."""
    rnd = random.Random(seed)
    parts, total = [], 0
    while total < size:
        kind = rnd.random()
        n = rnd.randint(1, 40000)
        if kind < 0.3:
            part = rnd.randbytes(n)
        elif kind < 0.5:
            part = bytes(n)
        else:
            part = " ".join(str(rnd.randint(0, 999)) for _ in range(n // 4)).encode()
        parts.append(part)
        total += len(part)
    return b"".join(parts)[:size]


def _zstd_frames(data: bytes, frame: int) -> bytes:
    c = zstandard.ZstdCompressor(level=3, write_content_size=True)
    return b"".join(c.compress(data[i:i + frame]) for i in range(0, len(data), frame))


BLOBS = {
    "gzip": lambda d: gzip.compress(d, 6),
    "gzip-members": lambda d: gzip.compress(d[:len(d) // 3], 1) + gzip.compress(d[len(d) // 3:], 9),
    "zstd-frames": lambda d: _zstd_frames(d, 20000),
    "zstd-single": lambda d: zstandard.ZstdCompressor(level=3).compress(d),
    "none": lambda d: d,
    "gzip-cli": lambda d: subprocess.run(["gzip", "-c", "-n", "-9"], input=d, capture_output=True, check=True).stdout,
}


def _build(kind: str, data: bytes):
    blob = BLOBS[kind](data)
    codec = kind.split("-")[0]
    out = bytearray()
    built = build_spans(io.BytesIO(blob), codec, len(blob), out.extend, span_size=SPAN)
    assert bytes(out) == data
    return blob, built.span_map("sha256:" + "ab" * 32, ())


@pytest.mark.parametrize("kind", sorted(BLOBS))
def test_every_span_decodes_alone_and_round_trips(kind: str) -> None:
    data = _stream(1, 700_000)
    blob, m = _build(kind, data)
    assert m.tar_size == len(data)
    if kind == "zstd-single":
        assert m.access == ZSTD_WHOLE and all(s.offset == 0 and s.compressed_length == len(blob) for s in m.spans)
    else:
        assert len(m.spans) >= 700_000 // (4 * SPAN)
    if kind.startswith("gzip"):
        assert any(s.bits for s in m.spans), "some checkpoint should start mid-byte"
    for span in m.spans:
        raw = decode_location(span, blob[span.offset:span.offset + span.compressed_length], "test")
        assert raw == data[span.tar_offset:span.tar_offset + span.raw_length]
    again = decode_span_map(encode_span_map(m))
    assert again.spans == m.spans and again.access == m.access
    cache = {s.digest: decode_location(s, blob[s.offset:s.end]) for s in again.spans}
    assert read_tar_range(again, lambda s: cache[s.digest], 12345, 654321) == data[12345:654321]


@pytest.mark.parametrize("kind", ["gzip", "zstd-frames", "none"])
def test_a_flipped_byte_is_an_integrity_error(kind: str) -> None:
    data = _stream(2, 400_000)
    blob, m = _build(kind, data)
    span = m.spans[len(m.spans) // 2]
    stored = bytearray(blob[span.offset:span.end])
    stored[len(stored) // 2] ^= 0x40
    with pytest.raises(IntegrityError):
        decode_location(span, bytes(stored), "mirror")


def test_forged_span_digest_is_an_integrity_error() -> None:
    data = _stream(3, 300_000)
    blob, m = _build("gzip", data)
    span = m.spans[1]
    forged = type(span)(bytes(32), span.blob, span.offset, span.compressed_length, span.raw_length,
                        span.compression, span.tar_offset, span.skip, span.bits, span.window)
    with pytest.raises(IntegrityError):
        decode_location(forged, blob[span.offset:span.end])


def test_span_map_rules() -> None:
    data = _stream(4, 200_000)
    _, m = _build("gzip", data)
    good = type(m)(m.source_digest, m.source_size, m.codec, m.access, m.tar_size, 4096, m.spans,
                   (MappedExtent(0, 2, 0, 5000), MappedExtent(5, 1, 8192, 4096)))
    assert decode_span_map(encode_span_map(good)).mapped == good.mapped
    for mapped in [(MappedExtent(0, 2, 0, 5000), MappedExtent(1, 1, 0, 10)),  # overlap
                   (MappedExtent(0, 1, m.tar_size - 10, 4096),),  # beyond the tar
                   (MappedExtent(0, 3, 0, 4096),)]:  # data ends before the last block
        bad = type(m)(m.source_digest, m.source_size, m.codec, m.access, m.tar_size, 4096, m.spans, mapped)
        with pytest.raises(FormatError):
            decode_span_map(encode_span_map(bad))
    short = type(m)(m.source_digest, m.source_size, m.codec, m.access, m.tar_size + 1, 4096, m.spans, ())
    with pytest.raises(FormatError):
        decode_span_map(encode_span_map(short))
    with pytest.raises(FormatError):
        decode_span_map(b"garbage")


def test_bad_blobs_are_format_errors() -> None:
    data = _stream(5, 100_000)
    for codec, blob in [("gzip", gzip.compress(data)[:-100]), ("zstd", _zstd_frames(data, 30000)[:-5]),
                        ("gzip", b"not gzip at all")]:
        with pytest.raises(FormatError):
            build_spans(io.BytesIO(blob), codec, len(blob), lambda b: None, span_size=SPAN)
    with pytest.raises(FormatError):
        build_spans(io.BytesIO(gzip.compress(data)), "gzip", 10, lambda b: None, span_size=SPAN, limit=1000)


def test_long_deflate_blocks_are_split_into_spans_that_skip_from_their_checkpoint() -> None:
    rnd = random.Random(6)
    data = rnd.randbytes(100_000) + bytes(3_000_000) + rnd.randbytes(100_000)
    blob, m = _build("gzip", data)
    assert any(s.skip > 0 for s in m.spans), "a block longer than 4 spans must be cut with skips"
    assert max(s.raw_length for s in m.spans) <= 4 * SPAN
    for span in m.spans:
        raw = decode_location(span, blob[span.offset:span.offset + span.compressed_length])
        assert raw == data[span.tar_offset:span.tar_offset + span.raw_length]


def test_mutated_span_maps_are_format_errors_or_valid() -> None:
    """Random byte flips and truncations of a span map's msgpack: never anything but FormatError."""
    data = _stream(8, 200_000)
    _, m = _build("gzip", data)
    raw = zstandard.ZstdDecompressor().decompress(encode_span_map(m))
    rnd = random.Random(9)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):
        mutated = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            mutated[rnd.randrange(len(mutated))] = rnd.randrange(256)
        if rnd.random() < 0.2:
            mutated = mutated[:rnd.randrange(len(mutated))]
        stored = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(mutated))
        try:
            decode_span_map(stored)
            outcomes["ok"] += 1
        except FormatError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 30  # most flips land in digests and windows, which stay well-formed
