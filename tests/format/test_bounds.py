"""Bounds on what a registry sends: each bomb is one line of FormatError, within its memory budget.

Memory is measured with tracemalloc (Python allocations, which is where these
bombs would land: msgpack, json and zstd output are all Python objects).
"""

import json
import struct
import tracemalloc

import msgpack
import pytest
import trio
import zstandard

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.layer import (
    BLOB_NAME_COST,
    CHUNK_COST,
    DEFAULT_MAX_VIRTUAL_SIZE,
    EXTENT_COST,
    FOOTER_SIZE,
    Footer,
    MetadataBudget,
    decode_metadata,
    parse_anchored_tail,
    parse_metadata,
    tail_digest,
)
from lazyfs.format.chunk import chunk_digest
from lazyfs.format.oci import (
    ANN_META_DIGEST,
    ANN_META_LENGTH,
    ANN_META_OFFSET,
    ANN_VIRTUAL_SIZE,
    MAX_JSON_DEPTH,
    MEDIA_TYPE_CONFIG,
    LayerDescriptor,
    parse_json,
    parse_manifest,
)
from lazyfs.format.numbers import decimal, pax_time_ns
from lazyfs.image.image import ImageLimits, load_image
from tests.support.forgery import hostile_blob, lazyfs_manifest, raw_zstd_frame
from tests.support.layers import MemoryBackend

GIB = 1 << 30


def peak_of(call) -> tuple[object, int]:
    """``(result or exception, peak bytes allocated while it ran)``."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def footer_for(metadata: bytes, meta_offset: int = 0) -> Footer:
    return Footer(2, meta_offset, len(metadata), chunk_digest(metadata))


def one_line(exc: BaseException) -> str:
    assert isinstance(exc, FormatError), repr(exc)
    text = str(exc)
    assert text and "\n" not in text
    return text


def doc(**changes) -> dict:
    base = {"version": 2, "virtual_size": 1 << 30, "block_size": 4096, "chunk_size": 1 << 18, "blobs": [""],
            "chunks": [], "extents": []}
    return {**base, **changes}


# ---------------------------------------------------------------- zstd


def test_a_zstd_frame_declaring_8_gib_is_refused_before_decompressing():
    metadata = raw_zstd_frame(msgpack.packb(doc()), declared=8 * GIB)
    assert len(metadata) < 2048
    result, peak = peak_of(lambda: parse_metadata(metadata, footer_for(metadata)))
    assert "declares 8589934592 bytes" in one_line(result)
    assert peak < 1 << 20


def test_a_frame_within_the_format_but_over_the_budget_is_refused_before_decompressing():
    real = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))  # 64 MiB of zeros, 2 KB
    result, peak = peak_of(lambda: parse_metadata(real, footer_for(real), budget=MetadataBudget(16 << 20)))
    assert "metadata budget" in one_line(result)
    assert peak < 1 << 20


def test_a_frame_without_a_declared_size_or_with_trailing_bytes_is_refused():
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    unsized = cobj.compress(msgpack.packb(doc())) + cobj.flush()
    one_line(pytest.raises(FormatError, parse_metadata, unsized, footer_for(unsized)).value)
    sized = zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(doc()))
    for bad in (sized + sized, sized + b"x", raw_zstd_frame(msgpack.packb(doc()), declared=10)):
        one_line(pytest.raises(FormatError, parse_metadata, bad, footer_for(bad)).value)


# ---------------------------------------------------------------- msgpack


@pytest.mark.parametrize("key, header", [
    ("chunks", b"\xdd" + struct.pack(">I", (1 << 32) - 1)),
    ("extents", b"\xdd" + struct.pack(">I", (1 << 32) - 1)),
    ("blobs", b"\xdd" + struct.pack(">I", (1 << 32) - 1)),
])
def test_an_array_claiming_2_to_the_32_items_allocates_nothing(key, header):
    packed = msgpack.packb({key: []})
    raw = packed.replace(key.encode() + b"\x90", key.encode() + header) + b"\x01" * 64
    result, peak = peak_of(lambda: decode_metadata(raw, MetadataBudget()))
    one_line(result)
    assert peak < 64 << 10


def test_a_map_claiming_2_to_the_32_keys_allocates_nothing():
    raw = b"\xdf" + struct.pack(">I", (1 << 32) - 1) + b"\xa1a\x01" * 10
    result, peak = peak_of(lambda: decode_metadata(raw))
    one_line(result)
    assert peak < 64 << 10


def test_nested_containers_in_a_table_are_refused_at_their_header():
    """``[[], [], ...]`` would cost 64 bytes of lists per byte of input if msgpack built it."""
    n = 1 << 20
    raw = msgpack.packb(doc()).replace(b"\xa6chunks\x90", b"\xa6chunks\xdd" + struct.pack(">I", n) + b"\x90" * n)
    result, peak = peak_of(lambda: decode_metadata(raw, MetadataBudget(1 << 30)))
    assert "chunks claims 1048576 entries" in one_line(result)
    assert peak < 2 * len(raw) + (64 << 10)  # the decoder's copy of the bytes, which parse_metadata charges
    raw = msgpack.packb(doc()).replace(b"\xa6chunks\x90", b"\xa6chunks\x91\x90" + b"\x01" * 64)
    assert "chunks[0] is not an array of 6" in one_line(pytest.raises(FormatError, decode_metadata, raw).value)
    deep = b"\x91" * 100_000 + b"\x01"  # a chunk entry made of nested arrays
    raw = msgpack.packb(doc()).replace(b"\xa6chunks\x90", b"\xa6chunks\x91" + b"\x96" + deep)
    result, peak = peak_of(lambda: decode_metadata(raw, MetadataBudget(1 << 30)))
    one_line(result)
    assert peak < 2 * len(raw) + (64 << 10)


def test_unknown_keys_are_skipped_unread_and_duplicates_refused():
    raw = msgpack.packb({**doc(), "future": [[[1, 2]] * 1000]})
    assert decode_metadata(raw)["version"] == 2
    twice = b"\x82\xa7version\x02\xa7version\x02"
    assert "twice" in one_line(pytest.raises(FormatError, decode_metadata, twice).value)


def test_the_budget_bounds_what_decoding_allocates():
    """The guarantee behind metadata_budget: a parse never allocates more than it charged."""
    n = 50_000
    d = doc(virtual_size=1 << 40, blobs=[""] + [f"sha256:{i:064x}" for i in range(100)],
            chunks=[[i.to_bytes(32, "big"), 1 + i % 100, (1 << 40) + i * 99_991, 100_000 + i, 1 << 18, 1]
                    for i in range(n)],
            extents=[[1000 + i * 5000, 64, i, 0] for i in range(n)])
    metadata = zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(d, use_bin_type=True))
    budget = MetadataBudget(1 << 30)
    meta, peak = peak_of(lambda: parse_metadata(metadata, footer_for(metadata, 1 << 42), budget=budget,
                                               max_virtual_size=1 << 50))
    assert not isinstance(meta, Exception), meta
    assert len(meta.chunks) == n
    assert budget.peak >= n * (CHUNK_COST + EXTENT_COST) + 101 * BLOB_NAME_COST
    assert peak <= budget.peak, (peak, budget.peak)
    assert budget.used == n * (CHUNK_COST + EXTENT_COST) + 101 * BLOB_NAME_COST  # the tables stay charged
    # the decompressed bytes (counted against the same limit, never refunded) are far less than the tables
    assert 0 < budget.inflated < budget.used // 5, (budget.inflated, budget.used)
    small = MetadataBudget(n * CHUNK_COST)  # room for the chunks, not for the extents too
    assert "metadata budget" in one_line(pytest.raises(
        FormatError, parse_metadata, metadata, footer_for(metadata, 1 << 42), budget=small,
        max_virtual_size=1 << 50).value)


# ---------------------------------------------------------------- virtual size and images


def image_manifest(layers, virtual_size: int) -> bytes:
    return lazyfs_manifest(layers, virtual_size)[1]


def test_a_virtual_size_of_2_to_the_60_is_refused():
    blob, layer = hostile_blob(zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(doc())))
    assert "larger than the" in one_line(pytest.raises(FormatError, parse_manifest,
                                                       image_manifest([layer], 1 << 60)).value)
    # the limit is the host's: a smaller one refuses a smaller image
    manifest = image_manifest([layer], 1 << 30)
    assert parse_manifest(manifest).virtual_size == 1 << 30
    assert "max_virtual_size" in one_line(pytest.raises(FormatError, parse_manifest, manifest, 1 << 29).value)
    # and a layer larger than the image its manifest states
    big = zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(doc(virtual_size=1 << 40)))
    blob, layer = hostile_blob(big)
    backend = MemoryBackend({layer.digest: blob})
    error = pytest.raises(FormatError, trio.run, lambda: load_image(parse_manifest(image_manifest([layer], 1 << 30)),
                                                                   [backend])).value
    assert "larger than the image" in one_line(error)
    meta_2_60 = zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(doc(virtual_size=1 << 60)))
    blob, layer = hostile_blob(meta_2_60)
    error = pytest.raises(FormatError, parse_anchored_tail, blob[layer.meta_offset:], layer.meta_digest, layer.size,
                          max_virtual_size=DEFAULT_MAX_VIRTUAL_SIZE).value
    assert "virtual_size" in one_line(error)


def test_255_layers_of_maximal_tails_are_refused_before_any_read():
    """Each tail as long as the format allows: the manifest alone says they cannot fit the budget."""
    longest = (512 << 20) + FOOTER_SIZE
    layers = [LayerDescriptor(f"sha256:{i:064x}", longest + 4096, 4096, longest, f"sha256:{i:064x}")
              for i in range(255)]
    manifest = parse_manifest(image_manifest(layers, 1 << 30))
    backend = MemoryBackend()
    error, peak = peak_of(lambda: trio.run(lambda: load_image(manifest, [backend], name="bomb")))
    assert "255 layers declare" in one_line(error) and "metadata budget" in str(error)
    assert backend.reads == [] and peak < 4 << 20


def test_many_layers_whose_metadata_is_large_stop_at_the_budget():
    """Small tails that each decompress to 8 MiB: the budget refuses the image part way, within itself."""
    padded = msgpack.packb({**doc(), "pad": bytes(8 << 20)}, use_bin_type=True)
    metadata = zstandard.ZstdCompressor(write_content_size=True).compress(padded)
    blobs, layers = [], []
    for i in range(40):
        blob, layer = hostile_blob(metadata, frames=i.to_bytes(8, "big"))  # distinct blobs, same metadata
        blobs.append(blob)
        layers.append(layer)
    manifest = parse_manifest(image_manifest(layers, 1 << 30))
    backend = MemoryBackend({layer.digest: blob for blob, layer in zip(blobs, layers)})
    limits = ImageLimits(metadata_budget=64 << 20)
    error, peak = peak_of(lambda: trio.run(lambda: load_image(manifest, [backend], name="bomb", limits=limits)))
    assert "metadata budget" in one_line(error)
    assert peak < (64 << 20) + (8 << 20)  # the budget, plus one decompression's output buffer granularity


def test_tails_parsed_one_after_another_add_up_against_the_budget():
    """The same tails parsed one at a time (as a loaded host may): each alone fits the budget and is
    refunded when done, yet their decompressed bytes add up and the image is refused (deterministic,
    not only when parses overlap). Broken on purpose once (2026-12-06): with ``budget.inflate``
    removed from ``parse_metadata``, all 40 parsed and this test failed."""
    padded = msgpack.packb({**doc(), "pad": bytes(8 << 20)}, use_bin_type=True)
    metadata = zstandard.ZstdCompressor(write_content_size=True).compress(padded)
    budget = MetadataBudget(64 << 20, what="bomb")
    parsed = 0
    with pytest.raises(FormatError) as error:
        for _ in range(40):
            parse_metadata(metadata, footer_for(metadata, 1 << 30), budget=budget)
            parsed += 1
    assert "metadata budget of bomb" in one_line(error.value)
    assert parsed == (64 << 20) // len(zstandard.ZstdDecompressor().decompress(metadata))  # 7 fit, the 8th does not
    assert budget.inflated <= 64 << 20


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize("text", [
    b"[" * 200_000 + b"]" * 200_000,
    b"[" * 60_000 + b"]" * 60_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"layers": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}",
])
def test_nested_json_is_refused_without_recursion(text):
    result, peak = peak_of(lambda: parse_json(text, "manifest"))
    message = one_line(result)
    assert "nested more than" in message or "arrays and objects" in message
    assert peak < 2 * len(text) + (1 << 20)


def test_json_limits():
    assert parse_json(b'{"a": "' + b"[" * 50 + b'"}', "x") == {"a": "[" * 50}
    assert parse_json(b'{"a": [[[["\\"]]]]"]]]]}', "x") == {"a": [[[['"]]]]']]]]}
    for bad, words in [(b'{"a": NaN}', "NaN"), (b'{"a": Infinity}', "Infinity"), (b'{"a":1,"a":2}', "twice"),
                       (b"[" + b"[]," * 70_000 + b"[]]", "arrays and objects"), (b"x" * ((4 << 20) + 1), "limit"),
                       (b'{"a": ' + b"9" * 5000 + b"}", "not JSON"), (b"[1]", "not a JSON object")]:
        assert words in one_line(pytest.raises(FormatError, parse_json, bad, "x").value), bad[:40]


# ---------------------------------------------------------------- manifests and numbers


def layer_json(**annotations) -> dict:
    ann = {ANN_META_OFFSET: "10", ANN_META_LENGTH: "100", ANN_META_DIGEST: "sha256:" + "a" * 64, **annotations}
    return {"mediaType": "application/vnd.lazyfs.layer.v2", "digest": "sha256:" + "b" * 64, "size": 110,
            "annotations": {k: v for k, v in ann.items() if v is not None}}


def manifest_json(layers, size="4096") -> bytes:
    return json.dumps({"schemaVersion": 2, "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": "sha256:" + "c" * 64,
                                                      "size": 2},
                       "layers": layers, "annotations": {ANN_VIRTUAL_SIZE: size}}).encode()


def test_layers_without_the_anchor_are_refused_with_a_way_out():
    assert parse_manifest(manifest_json([layer_json()])).layers[0].meta_length == 100
    no_digest = manifest_json([layer_json(**{ANN_META_DIGEST: None})])
    v1 = manifest_json([{**layer_json(**{ANN_META_DIGEST: None}), "mediaType": "application/vnd.lazyfs.layer.v1"}])
    for data in (no_digest, v1):
        text = one_line(pytest.raises(FormatError, parse_manifest, data).value)
        assert "meta-digest" in text and "lazyfs convert" in text


@pytest.mark.parametrize("field, value", [
    (ANN_META_OFFSET, "²"), (ANN_META_OFFSET, "٣"), (ANN_META_OFFSET, " 10"), (ANN_META_OFFSET, "1_0"),
    (ANN_META_OFFSET, "+10"), (ANN_META_OFFSET, "0x10"), (ANN_META_OFFSET, "9" * 400), (ANN_META_LENGTH, "50"),
    (ANN_META_LENGTH, "99"), (ANN_META_DIGEST, "sha256:" + "A" * 64), (ANN_META_DIGEST, "sha256:" + "a" * 64 + "\n"),
])
def test_bad_anchor_annotations(field, value):
    one_line(pytest.raises(FormatError, parse_manifest, manifest_json([layer_json(**{field: value})])).value)


@pytest.mark.parametrize("size", ["²", "-4096", "0", "4095", "1e9", str(1 << 60)])
def test_bad_virtual_sizes(size):
    one_line(pytest.raises(FormatError, parse_manifest, manifest_json([layer_json()], size)).value)


def test_strict_numbers():
    assert decimal("0", "x") == 0 and decimal("123", "x") == 123
    for bad in ("", " 1", "1 ", "²", "٣", "1_0", "+1", "-1", "1.0", "0x1", "1" * 21, None, 5):
        pytest.raises(FormatError, decimal, bad, "x")
    assert pax_time_ns("1.5", "t") == 1_500_000_000 and pax_time_ns("-2.25", "t") == -2_250_000_000
    assert pax_time_ns("7.0000000019", "t") == 7_000_000_001
    for bad in ("Infinity", "inf", "nan", "1e400", " 12", "1_0", "٣", "1.", ".5", "", str(1 << 41)):
        assert bad in one_line(pytest.raises(FormatError, pax_time_ns, bad, "t").value) or bad == ""


def test_the_digest_gate_comes_before_everything():
    """A tail that would be a bomb if parsed is an IntegrityError when it does not match its meta-digest."""
    bomb = raw_zstd_frame(b"", declared=8 * GIB)
    blob, layer = hostile_blob(bomb)
    tail = blob[layer.meta_offset:]
    other = tail_digest(tail[:-1] + b"\0")
    result, peak = peak_of(lambda: parse_anchored_tail(tail, other, layer.size))
    assert isinstance(result, IntegrityError) and peak < 64 << 10
    assert "declares" in one_line(pytest.raises(FormatError, parse_anchored_tail, tail, layer.meta_digest,
                                                layer.size).value)


# ---------------------------------------------------------------- traces


def test_trace_bombs_allocate_nothing():
    from lazyfs.fetch.trace import MAX_TRACE_BYTES, decode_trace

    base = msgpack.packb({"format": "lazyfs-trace", "version": 1, "blobs": [], "chunks": []})
    claim = base.replace(b"\xa6chunks\x90", b"\xa6chunks\xdd" + struct.pack(">I", (1 << 32) - 1)) + b"\x90" * 1000
    nested = base.replace(b"\xa6chunks\x90", b"\xa6chunks\xdc" + struct.pack(">H", 60_000)) + b"\x90" * 60_000
    for data in (claim, nested, b"\x90" * 100, bytes(MAX_TRACE_BYTES + 1)):
        result, peak = peak_of(lambda: decode_trace(data))
        one_line(result)
        assert peak < 2 * len(data) + (64 << 10), peak


def test_config_defaults_match_the_format():
    from lazyfs.config import Config
    from lazyfs.format.layer import DEFAULT_METADATA_BUDGET
    from lazyfs.image.tarapply import DEFAULT_MAX_LAYER_BYTES

    config = Config()
    assert ImageLimits.from_config(config) == ImageLimits()
    assert (config.max_virtual_size, config.metadata_budget, config.convert_max_layer_bytes) == \
        (DEFAULT_MAX_VIRTUAL_SIZE, DEFAULT_METADATA_BUDGET, DEFAULT_MAX_LAYER_BYTES)
