"""The merged index of a layer stack: built once at open, O(log n) per lookup."""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from lazyfs.format.layer import ZEROED, ChunkLocation, LayerMeta


@dataclass(frozen=True, slots=True)
class Segment:
    """Virtual blocks ``[start, end)`` served from *loc* starting at its block *chunk_block*; loc None = zeros."""

    start: int
    end: int
    loc: ChunkLocation | None
    chunk_block: int = 0

    def clip(self, start: int, end: int) -> "Segment":
        return Segment(start, end, self.loc, self.chunk_block + (start - self.start))


def layer_segments(meta: LayerMeta, blob_digest: str) -> list[Segment]:
    """One layer's extents as segments (ZEROED ones with loc None)."""
    locs = meta.locations(blob_digest)
    return [
        Segment(e.start, e.end, None if e.chunk == ZEROED else locs[e.chunk], e.chunk_offset) for e in meta.extents
    ]


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

    def __init__(self, layers: Sequence[tuple[LayerMeta, str]], blocks: int) -> None:
        """*layers*: ``(meta, blob digest)`` bottom first; *blocks*: the device size in blocks."""
        merged: list[Segment] = []
        for meta, digest in layers:
            merged = overlay(merged, layer_segments(meta, digest))
        # ZEROED segments have done their job (hiding lower data); gaps read as zeros anyway.
        self.segments = [s.clip(s.start, min(s.end, blocks)) for s in merged if s.loc is not None and s.start < blocks]
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
            seen.setdefault(seg.loc.digest, seg.loc)
        return list(seen.values())

    def following(self, loc: ChunkLocation, count: int) -> list[ChunkLocation]:
        """Up to *count* distinct chunks read after *loc*'s first use, in virtual order (for readahead)."""
        if self._first_use is None:
            first: dict[bytes, int] = {}
            for i, seg in enumerate(self.segments):
                first.setdefault(seg.loc.digest, i)
            self._first_use = first
        i = self._first_use.get(loc.digest)
        if i is None:
            return []
        out: dict[bytes, ChunkLocation] = {}
        for seg in self.segments[i + 1 : i + 1 + 4 * count]:
            if seg.loc.digest != loc.digest:
                out.setdefault(seg.loc.digest, seg.loc)
                if len(out) == count:
                    break
        return list(out.values())
