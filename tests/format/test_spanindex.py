"""Span maps: every span of every codec decodes from its compressed range (a chained gzip span with the
tail of the span before it) and checks its digest."""

from __future__ import annotations

import gzip
import io
import random
import subprocess

import msgpack
import pytest
import zstandard

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.spanindex import (
    CHAINED,
    MAX_CHAIN,
    WINDOW,
    ZSTD_WHOLE,
    MappedExtent,
    build_spans,
    decode_location,
    decode_span_map,
    decode_window,
    encode_span_map,
    read_tar_range,
)

SPAN = 64 << 10
MAP_BLOB = "sha256:" + "cd" * 32  # the span map blob's name in these tests


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


def _build(kind: str, data: bytes, **options):
    blob = BLOBS[kind](data)
    codec = kind.split("-")[0]
    out = bytearray()
    built = build_spans(io.BytesIO(blob), codec, len(blob), out.extend, span_size=SPAN, **options)
    assert bytes(out) == data
    return blob, built.span_map("sha256:" + "ab" * 32, ())


def _decode(span, blob: bytes, raws: dict, source: str = "", map_blob: bytes = b"") -> bytes:
    """A span's raw bytes from its own range, a chained one with its prev's tail (from *raws*), one whose
    window is stored apart with that window read from *map_blob*."""
    window = raws[span.prev.digest][-WINDOW:] if span.prev is not None else None
    if span.window_at is not None:
        w = span.window_at
        window = decode_window(w, map_blob[w.offset:w.end])
    raw = decode_location(span, blob[span.offset:span.end], source, window)
    raws[span.digest] = raw
    return raw


def _round_trip(m, change=None, version=None):
    """*m* stored (version 3: windows, then the document) and read back, the document changed by *change*;
    with *version* < 3, a document of that version with the windows inline. Returns (map, map blob)."""
    stored = encode_span_map(m)
    windows_end = len(stored.data) - stored.doc_length

    def inline(doc):
        doc["version"] = version
        doc["windows"] = [stored.data[o:o + n] for o, n, _d, _r in doc["windows"]]

    doc = stored.doc
    for c in ([inline] if version else []) + ([change] if change else []):
        doc = _rewrite(doc, c)
    return decode_span_map(doc, blob=MAP_BLOB, windows_end=windows_end), stored.data


def _same_spans(a, b) -> bool:
    """Equal spans, whether their windows are inline or stored apart."""
    def key(s):
        return (s.digest, s.offset, s.compressed_length, s.raw_length, s.compression, s.tar_offset, s.skip, s.bits,
                s.prev.digest if s.prev is not None else None, bool(s.window or s.window_at))
    return [key(s) for s in a] == [key(s) for s in b]


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
    if kind in ("gzip", "gzip-cli"):  # one member: no chains, the first span needs no window, most others do
        assert all(s.prev is None for s in m.spans) and m.spans[0].window == b"", kind
        assert sum(bool(s.window) for s in m.spans) >= len(m.spans) // 2
    if kind == "gzip-members":  # each member's first span needs no window
        assert all(s.window == b"" for s in m.spans if s.tar_offset in (0, len(data) // 3))
    raws: dict = {}
    for span in m.spans:
        raw = _decode(span, blob, raws, "test")
        assert raw == data[span.tar_offset:span.tar_offset + span.raw_length]
    again, map_blob = _round_trip(m)
    assert _same_spans(again.spans, m.spans) and again.access == m.access
    assert all(s.window == b"" for s in again.spans)  # stored apart: the document holds no window
    cache: dict = {}
    for s in again.spans:
        _decode(s, blob, cache, map_blob=map_blob)
    assert read_tar_range(again, lambda s: cache[s.digest], 12345, 654321) == data[12345:654321]


@pytest.mark.parametrize("kind", ["gzip", "zstd-frames", "none"])
def test_a_flipped_byte_is_an_integrity_error(kind: str) -> None:
    data = _stream(2, 400_000)
    blob, m = _build(kind, data)
    raws: dict = {}
    for span in m.spans[:len(m.spans) // 2]:
        _decode(span, blob, raws)
    span = m.spans[len(m.spans) // 2]
    stored = bytearray(blob[span.offset:span.end])
    stored[len(stored) // 2] ^= 0x40
    window = raws[span.prev.digest][-WINDOW:] if span.prev is not None else None
    with pytest.raises(IntegrityError):
        decode_location(span, bytes(stored), "mirror", window)


def test_a_chained_span_with_a_wrong_window_or_none_is_refused() -> None:
    """The window of a chained span is the verified tail of its prev: any other 32 KiB inflate to bytes that
    fail the span's digest, and no window at all is a FormatError (nothing is decoded unchecked)."""
    data = _stream(12, 600_000)
    blob, m = _build("gzip", data, window_spacing=1 << 20)
    raws: dict = {}
    for span in m.spans[:3]:
        _decode(span, blob, raws)
    span = m.spans[3]
    assert span.prev == m.spans[2]
    stored = blob[span.offset:span.end]
    good = decode_location(span, stored, "", raws[m.spans[2].digest][-WINDOW:])
    assert good == data[span.tar_offset:span.tar_offset + span.raw_length]
    with pytest.raises(IntegrityError):
        decode_location(span, stored, "mirror", raws[m.spans[1].digest][-WINDOW:])
    with pytest.raises(FormatError):
        decode_location(span, stored, "mirror")


def test_windows_are_stored_every_window_spacing_bytes_and_chains_are_bounded() -> None:
    data = _stream(13, 3_000_000)
    blob = BLOBS["gzip"](data)
    built = build_spans(io.BytesIO(blob), "gzip", len(blob), lambda b: None, span_size=SPAN, window_spacing=1 << 20)
    anchors = [s.tar_offset for s, p in zip(built.spans, built.prevs) if p < 0]
    assert len(anchors) == 3 and all(b - a >= 1 << 20 for a, b in zip(anchors, anchors[1:])), anchors
    # the first span starts the member: no window; the others store theirs unless nothing refers back to it
    assert built.windows == len({s.window for s in built.spans if s.window}) <= 2
    # by default (and with spacing 1) every checkpoint keeps its window; a huge spacing is cut at MAX_CHAIN
    for every in (build_spans(io.BytesIO(blob), "gzip", len(blob), lambda b: None, span_size=SPAN),
                  build_spans(io.BytesIO(blob), "gzip", len(blob), lambda b: None, span_size=SPAN, window_spacing=1)):
        assert all(p < 0 for p in every.prevs) and every.windows == len({s.window for s in every.spans if s.window})
        # a checkpoint before random bytes (a stored block) refers to nothing before it: it needs no window
        assert every.windows < len(every.spans) - 1 and all(s.window for s in every.spans[1:4])
    capped = build_spans(io.BytesIO(blob), "gzip", len(blob), lambda b: None, span_size=SPAN,
                         window_spacing=1 << 40)
    depth = [0] * len(capped.prevs)
    for i, p in enumerate(capped.prevs):
        depth[i] = depth[p] + 1 if p >= 0 else 0
    assert max(depth) == MAX_CHAIN


def _rewrite(stored: bytes, change) -> bytes:
    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(stored), raw=False)
    change(doc)
    return zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(doc, use_bin_type=True))


def test_chained_rows_are_checked() -> None:
    data = _stream(14, 600_000)
    _, m = _build("gzip", data, window_spacing=1 << 20)
    assert _same_spans(_round_trip(m)[0].spans, m.spans)

    def version_1(doc):  # version 1 has no chained spans
        doc["version"] = 1

    def first_chained(doc):  # nothing ends where the first span starts
        doc["spans"][0][7] = CHAINED

    def long_chain(doc):  # MAX_CHAIN + 2 chained spans in a row (forged: a builder stops at MAX_CHAIN)
        rows = doc["spans"]
        base = rows[1]
        pos = rows[-1][0] + rows[-1][1]
        for i in range(MAX_CHAIN + 2):
            rows.append([pos, WINDOW, bytes([i]) * 32, base[3], base[4], 0, 0, CHAINED])
            pos += WINDOW
        doc["tar_size"] = pos

    for change in (first_chained, long_chain):
        with pytest.raises(FormatError):
            _round_trip(m, change)
    with pytest.raises(FormatError):
        _round_trip(m, version=1)
    # a version 1 map (every window stored, inline) and a version 2 map (inline windows) are still read
    _, every = _build("gzip", data, window_spacing=1)
    assert _round_trip(every, version=1)[0].spans == every.spans
    assert _round_trip(m, version=2)[0].spans == m.spans


def test_stored_windows_are_checked() -> None:
    """A version 3 window row must lie before the document, and a window read from the blob is verified."""
    data = _stream(15, 2_500_000)
    blob, m = _build("gzip", data, window_spacing=1 << 19)
    again, map_blob = _round_trip(m)
    stored = [s for s in again.spans if s.window_at is not None]
    assert stored, "some span should need a stored window"
    span = stored[0]
    w = span.window_at
    assert w.blob == MAP_BLOB and w.end <= len(map_blob)
    forged = bytearray(map_blob)
    forged[w.offset + w.compressed_length // 2] ^= 0x10
    with pytest.raises(IntegrityError):
        decode_window(w, forged[w.offset:w.end])
    # forged but self-consistent: a well-formed frame of other bytes of the right size
    other = zstandard.ZstdCompressor(write_content_size=True).compress(data[:w.raw_length])
    with pytest.raises(IntegrityError):
        decode_window(type(w)(w.digest, w.blob, 0, len(other), w.raw_length, w.compression), other)
    with pytest.raises(FormatError):  # a span with a stored window is never decoded without it
        decode_location(span, blob[span.offset:span.end], "mirror")

    def past_the_document(doc):
        doc["windows"][0][0] = len(map_blob)

    def too_long(doc):
        doc["windows"][0][3] = WINDOW + 1

    for change in (past_the_document, too_long):
        with pytest.raises(FormatError):
            _round_trip(m, change)
    with pytest.raises(FormatError):  # a version 3 document read without its blob
        decode_span_map(encode_span_map(m).doc)


def test_forged_span_digest_is_an_integrity_error() -> None:
    data = _stream(3, 300_000)
    blob, m = _build("gzip", data)
    span = m.spans[0]
    forged = type(span)(bytes(32), span.blob, span.offset, span.compressed_length, span.raw_length,
                        span.compression, span.tar_offset, span.skip, span.bits, span.window)
    with pytest.raises(IntegrityError):
        decode_location(forged, blob[span.offset:span.end])


def test_span_map_rules() -> None:
    data = _stream(4, 200_000)
    _, m = _build("gzip", data)
    good = type(m)(m.source_digest, m.source_size, m.codec, m.access, m.tar_size, 4096, m.spans,
                   (MappedExtent(0, 2, 0, 5000), MappedExtent(5, 1, 8192, 4096)))
    assert _round_trip(good)[0].mapped == good.mapped
    for mapped in [(MappedExtent(0, 2, 0, 5000), MappedExtent(1, 1, 0, 10)),  # overlap
                   (MappedExtent(0, 1, m.tar_size - 10, 4096),),  # beyond the tar
                   (MappedExtent(0, 3, 0, 4096),)]:  # data ends before the last block
        bad = type(m)(m.source_digest, m.source_size, m.codec, m.access, m.tar_size, 4096, m.spans, mapped)
        with pytest.raises(FormatError):
            _round_trip(bad)
    short = type(m)(m.source_digest, m.source_size, m.codec, m.access, m.tar_size + 1, 4096, m.spans, ())
    with pytest.raises(FormatError):
        _round_trip(short)
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
    raws: dict = {}
    for span in m.spans:
        raw = _decode(span, blob, raws)
        assert raw == data[span.tar_offset:span.tar_offset + span.raw_length]


def test_mutated_span_maps_are_format_errors_or_valid() -> None:
    """Random byte flips and truncations of a span map's msgpack: never anything but FormatError."""
    data = _stream(8, 200_000)
    _, m = _build("gzip", data)
    stored_map = encode_span_map(m)
    raw = zstandard.ZstdDecompressor().decompress(stored_map.doc)
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
            decode_span_map(stored, blob=MAP_BLOB, windows_end=len(stored_map.data) - stored_map.doc_length)
            outcomes["ok"] += 1
        except FormatError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 30  # most flips land in digests and windows, which stay well-formed
