"""Mapped blocks: virtual blocks whose bytes are bytes of an ordinary layer's tar stream (docs/index.md).

An indexed layer's ``MappedExtent`` says blocks ``[start, start + count)``
read ``length`` tar bytes from ``tar_offset``, then zeros. The tar bytes come
from spans (``SpanLocation``), which the chunk store fetches from the original
blob, decodes and verifies like any chunk, and caches by their digest. So a
mapped read is: which spans cover these tar bytes (``span_locations``), get
them from the store, copy the slices (``copy_mapped``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lazyfs.format.spanindex import ZSTD_WHOLE, MappedExtent, SpanLocation, SpanMap


@dataclass(frozen=True, slots=True, eq=False)
class MappedRef:
    """A mapped extent and the span map of its layer (a Segment's source when it is mapped)."""

    spans: SpanMap
    extent: MappedExtent


def tar_range(ref: MappedRef, first_block: int, blocks: int) -> tuple[int, int]:
    """Tar bytes ``[lo, hi)`` that *blocks* blocks from the extent's block *first_block* read (then zeros)."""
    bs = ref.spans.block_size
    e = ref.extent
    lo = e.tar_offset + first_block * bs
    hi = min(lo + blocks * bs, e.tar_offset + e.length)
    return lo, max(lo, hi)


def span_locations(ref: MappedRef, first_block: int, blocks: int) -> list[SpanLocation]:
    """The spans a read of these blocks needs: those covering its tar bytes.

    For a single-frame zstd layer (``zstd-whole``), all of its spans: each is decoded
    from the blob's first byte, so they are asked for together and served from one fetch.
    """
    if ref.spans.access == ZSTD_WHOLE:
        return list(ref.spans.spans)
    lo, hi = tar_range(ref, first_block, blocks)
    return ref.spans.spans_for(lo, hi)


def copy_mapped(buf: bytearray, buf_offset: int, start: int, end: int, ref: MappedRef, first_block: int,
                raws: dict[bytes, bytes]) -> None:
    """Copy the bytes of virtual blocks ``[start, end)`` (extent block *first_block* on) that overlap *buf*.

    *buf* holds virtual bytes from *buf_offset* and is zero where nothing is copied;
    *raws*: the verified raw bytes of the spans, by digest.
    """
    bs = ref.spans.block_size
    lo = max(start * bs, buf_offset)
    hi = min(end * bs, buf_offset + len(buf))
    if lo >= hi:
        return
    tar0, tar_end = tar_range(ref, first_block, end - start)  # tar byte of virtual byte start * bs
    a = tar0 + (lo - start * bs)
    b = min(tar0 + (hi - start * bs), tar_end)
    pos = lo - buf_offset
    for span in ref.spans.spans_for(a, b):
        raw = raws[span.digest]
        s = max(a, span.tar_offset)
        t = min(b, span.tar_offset + span.raw_length)
        buf[pos + (s - a) : pos + (t - a)] = raw[s - span.tar_offset : t - span.tar_offset]
