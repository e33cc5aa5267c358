"""Mapped segments: blocks of an indexed layer read tar bytes through verified spans (no registry)."""

from __future__ import annotations

import gzip
import io
import random

import pytest
import trio

from lazyfs.device.index import MergedIndex
from lazyfs.device.merged import MergedDevice
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.direct import DirectChunkSource
from lazyfs.format.builder import BlobBuilder
from lazyfs.format.chunk import encode_chunk
from lazyfs.format.layer import parse_blob
from lazyfs.format.spanindex import MappedExtent, build_spans

BS = 4096
SOURCE = "sha256:" + "11" * 32
LAYER = "sha256:" + "22" * 32


class BlobsBackend(Backend):
    name = "memory"

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.reads: list[tuple[str, int, int]] = []

    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        self.reads.append((blob, offset, length))
        return self.blobs[blob][offset:offset + length]

    async def blob_size(self, blob: str) -> int:
        return len(self.blobs[blob])


def _layer(chunk_block: int, chunk: bytes) -> tuple:
    """A layer blob holding one chunk at *chunk_block* (the 'metadata' part of an indexed layer)."""
    b = BlobBuilder(64 * BS, 64 << 10)
    digest, stored, compression = encode_chunk(chunk)
    frames = b.add_chunk(chunk_block, digest, stored, compression, len(chunk))
    blob = frames + b.finish()
    return parse_blob(blob)[1], blob


def _setup(mapped: tuple[MappedExtent, ...]):
    tar = random.Random(3).randbytes(300_000)
    blob = gzip.compress(tar)
    built = build_spans(io.BytesIO(blob), "gzip", len(blob), lambda b: None, span_size=64 << 10)
    spans = built.span_map(SOURCE, mapped)
    meta, layer_blob = _layer(0, b"\x07" * BS)
    backend = BlobsBackend({SOURCE: blob, LAYER: layer_blob})
    return tar, blob, spans, meta, backend


def test_mapped_blocks_read_their_tar_bytes_then_zeros():
    mapped = (MappedExtent(2, 3, 1000, 2 * BS + 10), MappedExtent(10, 20, 100_000, 20 * BS))
    tar, _, spans, meta, backend = _setup(mapped)

    async def main():
        device = MergedDevice([(meta, LAYER)], DirectChunkSource(backend), size=64 * BS, mapped=[spans])
        whole = await device.read(0, 64 * BS)
        part = await device.read(11 * BS + 5, 3 * BS)
        return whole, part

    whole, part = trio.run(main)
    want = bytearray(64 * BS)
    want[0:BS] = b"\x07" * BS
    want[2 * BS:2 * BS + 2 * BS + 10] = tar[1000:1000 + 2 * BS + 10]
    want[10 * BS:30 * BS] = tar[100_000:100_000 + 20 * BS]
    assert whole == bytes(want)
    assert part == bytes(want[11 * BS + 5:14 * BS + 5])
    assert any(blob == SOURCE for blob, _, _ in backend.reads)


def test_a_span_that_fails_its_digest_is_never_served():
    tar, blob, spans, meta, backend = _setup((MappedExtent(4, 10, 70_000, 10 * BS),))
    bad = bytearray(blob)
    span = spans.spans_for(70_000, 70_001)[0]
    bad[span.offset + span.compressed_length // 2] ^= 0x20
    backend.blobs[SOURCE] = bytes(bad)

    async def main():
        device = MergedDevice([(meta, LAYER)], DirectChunkSource(backend), size=64 * BS, mapped=[spans])
        await device.read(4 * BS, BS)

    with pytest.raises(IntegrityError):
        trio.run(main)


def test_mapped_blocks_may_not_overlap_the_layers_own_extents():
    _, _, spans, meta, backend = _setup((MappedExtent(0, 2, 0, 2 * BS),))
    with pytest.raises(FormatError, match="overlap"):
        MergedDevice([(meta, LAYER)], DirectChunkSource(backend), size=64 * BS, mapped=[spans])


def test_an_upper_layer_cuts_a_mapped_extent_and_the_rest_keeps_its_tar_offsets():
    """Layer 0 maps blocks 0..12 to the tar; layer 1 stores blocks 3..5 and zeroes block 9: the clipped
    pieces of the mapped extent still read the tar bytes of their own blocks."""
    tar, _, spans, _, backend = _setup((MappedExtent(0, 12, 5000, 12 * BS),))
    bottom_meta, bottom_blob = _layer(40, b"\x01" * BS)  # layer 0's own chunk, away from the mapped blocks
    b = BlobBuilder(64 * BS, 64 << 10)
    digest, stored, compression = encode_chunk(b"\x09" * 3 * BS)
    frames = b.add_chunk(3, digest, stored, compression, 3 * BS)
    b.add_zeroed(9, 1)
    top_blob = frames + b.finish()
    top_meta = parse_blob(top_blob)[1]
    top = "sha256:" + "33" * 32
    backend.blobs[LAYER] = bottom_blob
    backend.blobs[top] = top_blob

    async def main():
        device = MergedDevice([(bottom_meta, LAYER), (top_meta, top)], DirectChunkSource(backend), size=64 * BS,
                              mapped=[spans, None])
        return await device.read(0, 16 * BS)

    got = trio.run(main)
    want = bytearray(tar[5000:5000 + 12 * BS] + bytes(4 * BS))
    want[3 * BS:6 * BS] = b"\x09" * 3 * BS
    want[9 * BS:10 * BS] = bytes(BS)
    assert got == bytes(want)


def test_readahead_after_a_span_is_the_spans_after_it_in_virtual_order():
    """A span miss reads ahead like a chunk miss: the next spans of its extent, then of the next extents."""
    mapped = (MappedExtent(2, 40, 0, 40 * BS), MappedExtent(50, 20, 200_000, 20 * BS))
    tar, _, spans, meta, backend = _setup(mapped)
    index = MergedIndex([(meta, LAYER)], 128, [spans])
    first = spans.spans_for(0, 40 * BS)
    second = spans.spans_for(200_000, 200_000 + 20 * BS)
    assert len(first) >= 3 and len(second) >= 2
    assert index.following(first[0], 2) == first[1:3]
    assert index.following(first[-1], 2) == [s for s in second if s not in first][:2]
    assert index.following(second[-1], 2) == []  # nothing after the last mapped extent
