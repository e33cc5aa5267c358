"""Property-based fuzzing of every parser of wire input: only one-line FormatError (or IntegrityError) comes out.

The metadata parsers are fuzzed past the digest gates (footer blake3 and
manifest meta-digest are computed for the fuzzed bytes), so the decoder and
the validator see hostile input directly. Bounded for CI; set
``LAZYFS_FUZZ_EXAMPLES`` (e.g. 20000) for a longer run. A coverage-guided run
is ``tests/fuzz/atheris_parsers.py`` (see its docstring).
"""

import io
import json
import os
import tarfile
import tempfile

import msgpack
from hypothesis import HealthCheck, given, settings, strategies as st

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.fetch.trace import decode_trace, encode_trace
from lazyfs.format.chunk import chunk_digest
from lazyfs.format.layer import (
    FOOTER_SIZE,
    ZEROED,
    Footer,
    MetadataBudget,
    decode_metadata,
    encode_footer,
    encode_metadata,
    parse_anchored_tail,
    parse_metadata,
    tail_digest,
    validate_metadata,
)
from lazyfs.format.oci import parse_index, parse_json, parse_manifest
from lazyfs.format.ociimage import parse_converted_layers, parse_platforms, parse_source_config
from lazyfs.image.referrers import _entries as referrer_entries
from lazyfs.image.tarapply import scan_layer
from tests.support.forgery import raw_zstd_frame
from tests.support.layers import build_blob

EXAMPLES = int(os.environ.get("LAZYFS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BUDGET = 64 << 20


def rejected_cleanly(call) -> object:
    """Run *call*: its result, or None after a one-line FormatError/IntegrityError; anything else fails."""
    try:
        return call()
    except (FormatError, IntegrityError) as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
        return None


# ---------------------------------------------------------------- layer metadata

scalars = st.one_of(st.integers(-(1 << 63), (1 << 64) - 1),  # what msgpack can carry st.binary(max_size=40), st.text(max_size=20), st.booleans(),
                    st.none(), st.floats(allow_nan=True))
small_ints = st.one_of(st.integers(-2, 70), st.sampled_from([0, 1, 4096, 65536, 1 << 18, 1 << 24, 1 << 40, 1 << 62,
                                                             (1 << 64) - 1, -(1 << 63)]))
chunk_rows = st.lists(st.one_of(
    st.tuples(st.binary(min_size=32, max_size=32), st.integers(-1, 3), small_ints, small_ints, small_ints,
              st.integers(-1, 2)).map(list),
    st.lists(scalars, max_size=8)), max_size=12)
extent_rows = st.lists(st.one_of(
    st.tuples(small_ints, small_ints, st.integers(-2, 12), small_ints).map(list),
    st.lists(scalars, max_size=6)), max_size=12)
docs = st.fixed_dictionaries(
    {},
    optional={"version": st.one_of(st.just(2), scalars), "virtual_size": small_ints, "block_size": small_ints,
              "chunk_size": small_ints,
              "blobs": st.one_of(st.lists(st.sampled_from(["", "sha256:" + "a" * 64, "sha256:x", 5]), max_size=4),
                                 scalars),
              "chunks": st.one_of(chunk_rows, scalars), "extents": st.one_of(extent_rows, scalars),
              "unknown": st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=10)})


def check_meta(meta, frames_end: int) -> None:
    """What a LayerMeta that got through must satisfy."""
    assert meta.virtual_size % meta.block_size == 0
    prev = 0
    for e in meta.extents:
        assert e.count > 0 and e.start >= prev and e.end <= meta.blocks
        if e.chunk != ZEROED:
            c = meta.chunks[e.chunk]
            assert (e.chunk_offset + e.count) * meta.block_size <= c.raw_length
        prev = e.end
    for c in meta.chunks:
        assert 0 <= c.blob < len(meta.blobs) and 0 < c.compressed_length <= c.raw_length <= meta.chunk_size
        assert c.blob or c.offset + c.compressed_length <= frames_end


@given(docs, st.integers(0, 1 << 20))
@FUZZ
def test_validate_metadata_directly(doc, frames_end):
    meta = rejected_cleanly(lambda: validate_metadata(doc, frames_end))
    if meta is not None:
        check_meta(meta, frames_end)


@given(docs, st.integers(0, 1 << 20))
@FUZZ
def test_parse_metadata_past_the_footer_digest(doc, frames_end):
    metadata = raw_zstd_frame(msgpack.packb(doc, use_bin_type=True))
    footer = Footer(2, frames_end, len(metadata), chunk_digest(metadata))
    meta = rejected_cleanly(lambda: parse_metadata(metadata, footer, budget=MetadataBudget(BUDGET)))
    if meta is not None:
        check_meta(meta, frames_end)


@given(st.binary(max_size=2000))
@FUZZ
def test_decode_metadata_of_any_bytes(raw):
    rejected_cleanly(lambda: decode_metadata(raw, MetadataBudget(BUDGET)))


def _valid_metadata() -> tuple[bytes, int]:
    blob, _, meta = build_blob(32 * 4096, [(0, os.urandom(4096) * 3), (20, b"x" * 8192)], zeroed=[(10, 3)],
                               chunk_size=8192)
    frames_end = len(blob) - FOOTER_SIZE - len(encode_metadata(meta))
    return encode_metadata(meta), frames_end


VALID_METADATA, VALID_FRAMES_END = _valid_metadata()


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
@FUZZ
def test_mutated_valid_metadata_past_both_gates(flips):
    """Byte flips of real metadata, decompressed and re-framed so the flips reach the decoder, not zstd."""
    import zstandard

    raw = bytearray(zstandard.ZstdDecompressor().decompress(VALID_METADATA))
    for at, value in flips:
        raw[at % len(raw)] = value
    metadata = raw_zstd_frame(bytes(raw))
    tail = metadata + encode_footer(VALID_FRAMES_END, metadata)
    meta = rejected_cleanly(lambda: parse_anchored_tail(tail, tail_digest(tail), VALID_FRAMES_END + len(tail),
                                                        budget=MetadataBudget(BUDGET)))
    if meta is not None:
        check_meta(meta[1], VALID_FRAMES_END)


# ---------------------------------------------------------------- manifests, indexes, configs, referrers

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.text(max_size=30),
              st.sampled_from(["sha256:" + "a" * 64, "application/vnd.lazyfs.layer.v2", "4096",
                               "dev.lazyfs.layer.meta-digest", "²", "٣"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
        st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "annotations", "digest", "size",
                         "manifests", "subject", "platform", "rootfs", "diff_ids", "type", "artifactType",
                         "dev.lazyfs.layer.meta-offset", "dev.lazyfs.layer.meta-length",
                         "dev.lazyfs.layer.meta-digest", "dev.lazyfs.image.virtual-size", "x"]),
        inner, max_size=6)),
    max_leaves=40)
JSON_PARSERS = [
    lambda d: parse_manifest(d), lambda d: parse_index(d), lambda d: parse_platforms(d),
    lambda d: parse_source_config(d), lambda d: parse_converted_layers(d), lambda d: referrer_entries(d),
    lambda d: parse_json(d, "x"),
]


def _valid_manifest() -> bytes:
    from tests.support.forgery import hostile_blob, lazyfs_manifest

    _, layer = hostile_blob(VALID_METADATA, frames=bytes(VALID_FRAMES_END))
    return lazyfs_manifest([layer], 32 * 4096)[1]


VALID_MANIFEST = _valid_manifest()


@given(json_values)
@FUZZ
def test_json_parsers_on_structures(doc):
    data = json.dumps(doc).encode()
    for parse in JSON_PARSERS:
        rejected_cleanly(lambda: parse(data))


@given(st.one_of(st.binary(max_size=400),
                 st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=6).map(
                     lambda flips: bytes(_flip(VALID_MANIFEST, flips)))))
@FUZZ
def test_json_parsers_on_bytes(data):
    for parse in JSON_PARSERS:
        rejected_cleanly(lambda: parse(data))


def _flip(data: bytes, flips) -> bytearray:
    out = bytearray(data)
    for at, value in flips:
        out[at % len(out)] = value
    return out


# ---------------------------------------------------------------- traces

trace_docs = st.fixed_dictionaries({}, optional={
    "format": st.one_of(st.just("lazyfs-trace"), scalars), "version": st.one_of(st.just(1), scalars),
    "blobs": st.one_of(st.lists(st.sampled_from(["sha256:" + "b" * 64, "", "x:y", 3]), max_size=3), scalars),
    "chunks": st.one_of(chunk_rows, scalars), "extra": scalars})


@given(st.one_of(st.binary(max_size=600), trace_docs.map(lambda d: msgpack.packb(d, use_bin_type=True))))
@FUZZ
def test_trace_decoder(data):
    locations = rejected_cleanly(lambda: decode_trace(data))
    if locations is not None:
        assert decode_trace(encode_trace(locations)) == locations


# ---------------------------------------------------------------- tar headers


def _valid_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind in (("d", tarfile.DIRTYPE), ("d/f", tarfile.REGTYPE), ("l", tarfile.SYMTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.pax_headers = {"mtime": "1.5", "SCHILY.xattr.user.a": "b"}
            data = b"hello" if kind == tarfile.REGTYPE else b""
            ti.size = len(data)
            ti.linkname = "d/f" if kind == tarfile.SYMTYPE else ""
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


VALID_TAR = _valid_tar()


@given(st.one_of(
    st.binary(max_size=1536),
    st.lists(st.tuples(st.integers(0, len(VALID_TAR) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda flips: bytes(_flip(VALID_TAR, flips)))))
@FUZZ
def test_tar_header_parser(data):
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        rejected_cleanly(lambda: scan_layer(f.name, "none", "fuzzed layer", limit=1 << 20))
