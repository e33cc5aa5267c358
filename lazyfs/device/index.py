"""The merged index of a layer stack: built once at open, O(log n) per lookup."""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from lazyfs.device.mapped import MappedRef, span_locations
from lazyfs.errors import FormatError
from lazyfs.format.layer import ZEROED, ChunkLocation, LayerMeta
from lazyfs.format.spanindex import ZSTD_WHOLE, SpanMap


@dataclass(frozen=True, slots=True)
class Segment:
    """Virtual blocks ``[start, end)`` served from *loc* starting at its block *chunk_block*; loc None = zeros.

    A mapped segment (*mapped* set, *loc* None) reads tar bytes from its extent's
    block *chunk_block* on (``lazyfs.device.mapped``).
    """

    start: int
    end: int
    loc: ChunkLocation | None
    chunk_block: int = 0
    mapped: MappedRef | None = None
    layer: int = -1  # index of the read-only layer (bottom first) the blocks come from

    def clip(self, start: int, end: int) -> "Segment":
        return Segment(start, end, self.loc, self.chunk_block + (start - self.start), self.mapped, self.layer)

    @property
    def has_data(self) -> bool:
        return self.loc is not None or self.mapped is not None

    def locations(self) -> list[ChunkLocation]:
        """What a read of the whole segment needs: its chunk, or the spans of its tar bytes."""
        if self.loc is not None:
            return [self.loc]
        if self.mapped is not None:
            return list(span_locations(self.mapped, self.chunk_block, self.end - self.start))
        return []


def layer_segments(meta: LayerMeta, blob_digest: str, layer: int = -1) -> list[Segment]:
    """One layer's extents as segments (ZEROED ones with loc None)."""
    locs = meta.locations(blob_digest)
    return [
        Segment(e.start, e.end, None if e.chunk == ZEROED else locs[e.chunk], e.chunk_offset, layer=layer)
        for e in meta.extents
    ]


def mapped_segments(spans: SpanMap) -> list[Segment]:
    return [Segment(e.start, e.end, None, 0, MappedRef(spans, e)) for e in spans.mapped]


def with_mapped(segments: list[Segment], mapped: list[Segment], what: str) -> list[Segment]:
    """A layer's chunk extents and its mapped extents, sorted (FormatError if they overlap)."""
    out = sorted(segments + mapped, key=lambda s: s.start)
    for prev, seg in zip(out, out[1:]):
        if seg.start < prev.end:
            raise FormatError(f"{what}: mapped blocks {seg.start}.. overlap the layer's own extents")
    return out


def overlay(lower: Sequence[Segment], upper: Sequence[Segment]) -> list[Segment]:
    """Segments of *upper* plus the parts of *lower* they do not cover, sorted."""
    kept: list[Segment] = []
    j = 0
    for seg in lower:
        while j < len(upper) and upper[j].end <= seg.start:
            j += 1
        cur, k = seg.start, j
        while k < len(upper) and upper[k].start < seg.end:
            if upper[k].start > cur:
                kept.append(seg.clip(cur, upper[k].start))
            cur = max(cur, upper[k].end)
            k += 1
        if cur < seg.end:
            kept.append(seg.clip(cur, seg.end))
    return list(heapq.merge(kept, upper, key=lambda s: s.start))


class MergedIndex:
    """Where each virtual block of a stack of read-only layers comes from."""

    def __init__(self, layers: Sequence[tuple[LayerMeta, str]], blocks: int,
                 mapped: Sequence[SpanMap | None] | None = None) -> None:
        """*layers*: ``(meta, blob digest)`` bottom first; *blocks*: the device size in blocks.

        *mapped*: per layer, the span map of an indexed layer (its mapped extents join the layer's own).
        """
        merged: list[Segment] = []
        for i, (meta, digest) in enumerate(layers):
            segments = layer_segments(meta, digest, i)
            spans = mapped[i] if mapped else None
            if spans is not None:
                segments = with_mapped(segments, mapped_segments(spans), f"layer {i} ({digest[:19]})")
            merged = overlay(merged, segments)
        # ZEROED segments have done their job (hiding lower data); gaps read as zeros anyway.
        self.segments = [s.clip(s.start, min(s.end, blocks)) for s in merged if s.has_data and s.start < blocks]
        self._starts = [s.start for s in self.segments]
        self._first_use: dict[bytes, int] | None = None  # chunk digest -> first segment, built on demand

    def lookup(self, start: int, end: int) -> list[Segment]:
        """Data segments intersecting blocks ``[start, end)``, clipped to it."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self.segments[i].end <= start:
            i += 1
        out = []
        while i < len(self.segments) and self.segments[i].start < end:
            seg = self.segments[i]
            out.append(seg.clip(max(seg.start, start), min(seg.end, end)))
            i += 1
        return out

    def locations(self) -> list[ChunkLocation]:
        """Every distinct chunk the merged view can read, in virtual order."""
        seen: dict[bytes, ChunkLocation] = {}
        for seg in self.segments:
            for loc in seg.locations():
                seen.setdefault(loc.digest, loc)
        return list(seen.values())

    def following(self, loc: ChunkLocation, count: int) -> list[ChunkLocation]:
        """Up to *count* distinct chunks or spans read after *loc*'s first use, in virtual order (for readahead).

        Spans of a single-frame zstd layer are never read ahead: its first read asks for all of them.
        """
        if self._first_use is None:
            first: dict[bytes, int] = {}
            for i, seg in enumerate(self.segments):
                for found in _readahead_locations(seg):
                    first.setdefault(found.digest, i)
            self._first_use = first
        i = self._first_use.get(loc.digest)
        if i is None:
            return []
        out: dict[bytes, ChunkLocation] = {}
        past = False  # in loc's own segment, only what comes after loc
        for seg in self.segments[i : i + 1 + 4 * count]:
            for found in _readahead_locations(seg):
                if found.digest == loc.digest:
                    past = True
                elif past:
                    out.setdefault(found.digest, found)
            past = True
            if len(out) >= count:
                break
        return list(out.values())[:count]


def _readahead_locations(seg: Segment) -> list[ChunkLocation]:
    if seg.mapped is not None and seg.mapped.spans.access == ZSTD_WHOLE:
        return []
    return seg.locations()
