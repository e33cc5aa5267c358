"""Startup traces: record which chunks an image reads first, replay them on the next mount.

A trace is the list of chunk locations in first-access order (deduplicated by
digest, bounded in length). Its wire form is msgpack (sans-IO:
``encode_trace``/``decode_trace``)::

    {"format": "lazyfs-trace", "version": 1,
     "blobs":  [blob digest str, ...],
     "chunks": [[digest bin32, blob index, offset, compressed_length, raw_length, compression], ...]}

Blob names are listed once and referenced by index, which keeps a trace of a
few thousand chunks to a few tens of KiB.

Version 2 (written only when the trace has one) adds **span entries**, the spans an
image mounted through a lazyfs index read (docs/index.md): the same six fields, with
compression ``SPAN_ENTRY`` (255), offset and compressed length the span's range of its
source blob, raw length its decoded length. A span entry says which span, not how to
decode it: ``decode_trace`` returns it as a placeholder ``ChunkLocation`` whose
compression is SPAN_ENTRY, and the reader replaces it with the image's own
``SpanLocation`` of that digest and range (``lazyfs.image.traces.resolve_trace``), or
counts it foreign. A placeholder is never fetched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import msgpack
import trio

from lazyfs.device.chunks import ChunkLocation, ChunkSource, Priority
from lazyfs.errors import ConfigError, FormatError, LazyfsError
from lazyfs.format.chunk import COMPRESSION_NONE, COMPRESSION_ZSTD, MAX_CHUNK_SIZE
from lazyfs.format.counted import Table, decode_counted_map
from lazyfs.format.digest import check_chunk_digest, split_digest
from lazyfs.format.spanindex import MAX_SPAN, SpanLocation
from lazyfs.nursery import open_nursery

__all__ = [
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "SPAN_ENTRY",
    "MAX_TRACE_ENTRIES",
    "TraceRecorder",
    "RecordingChunkSource",
    "encode_trace",
    "decode_trace",
    "replay",
]

log = logging.getLogger(__name__)

TRACE_FORMAT = "lazyfs-trace"
TRACE_VERSION = 2  # the newest this lazyfs reads; a trace without spans is written as version 1
SPAN_ENTRY = 255  # the compression field of a span entry (version 2)
MAX_SPAN_RANGE = 1 << 40  # a span's compressed range (a single-frame zstd layer's spans read from byte 0)
MAX_TRACE_ENTRIES = 1 << 17  # what decode_trace accepts at most (recording keeps 65536 by default)
MAX_TRACE_BLOBS = 1024
MAX_TRACE_BYTES = 8 << 20
_MIN_ENTRY_BYTES = 40  # fixarray + bin8(32) + 5 fixints
# A stored frame may be a little larger than its raw bytes (incompressible data is stored raw, but be lenient).
_MAX_FRAME = MAX_CHUNK_SIZE + (1 << 16)
_COMPRESSIONS = (COMPRESSION_NONE, COMPRESSION_ZSTD)


class TraceRecorder:
    """Collects chunk locations in first-access order, once per digest, up to ``max_entries``.

    ``record`` is cheap and synchronous: call it from the read path. After
    ``stop()`` (end of the startup window) or once full, it ignores new chunks.
    """

    def __init__(self, max_entries: int = 65536) -> None:
        if not 0 < max_entries <= MAX_TRACE_ENTRIES:
            raise ConfigError(f"trace max_entries must be in 1..{MAX_TRACE_ENTRIES}, got {max_entries}")
        self.max_entries = max_entries
        self._seen: set[bytes] = set()
        self._locations: list[ChunkLocation] = []
        self.stopped = False

    def record(self, loc: ChunkLocation) -> None:
        if self.stopped or loc.digest in self._seen or len(self._locations) >= self.max_entries:
            return
        self._seen.add(loc.digest)
        self._locations.append(loc)

    def stop(self) -> None:
        self.stopped = True

    @property
    def full(self) -> bool:
        return len(self._locations) >= self.max_entries

    @property
    def locations(self) -> tuple[ChunkLocation, ...]:
        return tuple(self._locations)

    def __len__(self) -> int:
        return len(self._locations)

    def encode(self) -> bytes:
        return encode_trace(self._locations)


class RecordingChunkSource(ChunkSource):
    """A ChunkSource that records every demand read into *recorder* before passing it on."""

    def __init__(self, inner: ChunkSource, recorder: TraceRecorder) -> None:
        self.inner = inner
        self.recorder = recorder

    async def get(self, loc: ChunkLocation, priority: Priority = Priority.DEMAND) -> bytes:
        if priority == Priority.DEMAND:
            self.recorder.record(loc)
        return await self.inner.get(loc, priority)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def statistics(self) -> dict:
        return {**self.inner.statistics(), "trace_entries": len(self.recorder)}


def encode_trace(locations: Iterable[ChunkLocation]) -> bytes:
    """The msgpack form of a trace (order kept)."""
    blobs: dict[str, int] = {}
    chunks = []
    spans = False
    for loc in locations:
        index = blobs.setdefault(loc.blob, len(blobs))
        span = isinstance(loc, SpanLocation) or loc.compression == SPAN_ENTRY
        spans |= span
        chunks.append([loc.digest, index, loc.offset, loc.compressed_length, loc.raw_length,
                       SPAN_ENTRY if span else loc.compression])
    doc = {"format": TRACE_FORMAT, "version": 2 if spans else 1, "blobs": list(blobs), "chunks": chunks}
    return msgpack.packb(doc, use_bin_type=True)


def decode_trace(data: bytes, max_entries: int = MAX_TRACE_ENTRIES) -> tuple[ChunkLocation, ...]:
    """Parse and validate a trace; FormatError for anything malformed.

    Decoded entry by entry: a container is read only after its header was
    counted against the limits (at most MAX_TRACE_BYTES in, *max_entries*
    chunks and MAX_TRACE_BLOBS blob names out), so a hostile trace costs no
    more memory than a legitimate one of its size.
    """
    if len(data) > MAX_TRACE_BYTES:
        raise FormatError(f"trace: {len(data)} bytes is larger than the {MAX_TRACE_BYTES}-byte limit")
    tables = {"blobs": Table(max_rows=MAX_TRACE_BLOBS),
              "chunks": Table(max_rows=min(max_entries, MAX_TRACE_ENTRIES), width=6, min_bytes=_MIN_ENTRY_BYTES)}
    doc = decode_counted_map(data, "trace", max_keys=16, scalars=("format", "version"), tables=tables,
                             max_str_len=1024, max_bin_len=64)
    if doc.get("format") != TRACE_FORMAT:
        raise FormatError(f"trace: format is {doc.get('format')!r}, expected {TRACE_FORMAT!r}")
    version = doc.get("version")
    if version not in (1, TRACE_VERSION):
        raise FormatError(f"trace: unsupported version {version!r} (this lazyfs reads 1 to {TRACE_VERSION})")
    blobs, chunks = doc.get("blobs"), doc.get("chunks")
    if not isinstance(blobs, list) or not all(split_digest(b) for b in blobs):
        raise FormatError("trace: 'blobs' must be a list of blob digests")
    if not isinstance(chunks, list):
        raise FormatError("trace: 'chunks' must be a list")
    return tuple(_decode_entry(i, entry, blobs, spans=version >= 2) for i, entry in enumerate(chunks))


def _decode_entry(i: int, entry, blobs: Sequence[str], *, spans: bool = False) -> ChunkLocation:
    if not isinstance(entry, tuple) or len(entry) != 6:  # decode_counted_map checked the width already
        raise FormatError(f"trace: chunk {i} is not a 6-element list")
    digest, blob, offset, clen, rlen, compression = entry
    check_chunk_digest(digest, f"trace: chunk {i}: digest")
    ints = (blob, offset, clen, rlen, compression)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
        raise FormatError(f"trace: chunk {i}: non-integer field")
    if not 0 <= blob < len(blobs):
        raise FormatError(f"trace: chunk {i}: blob index {blob} out of range (0..{len(blobs) - 1})")
    if offset < 0 or offset > 1 << 50:
        raise FormatError(f"trace: chunk {i}: offset {offset} out of range")
    if spans and compression == SPAN_ENTRY:  # a placeholder, resolved against the image's span maps
        if not 0 < clen <= MAX_SPAN_RANGE:
            raise FormatError(f"trace: span {i}: compressed length {clen} out of range")
        if not 0 < rlen <= MAX_SPAN:
            raise FormatError(f"trace: span {i}: raw length {rlen} out of range")
        return ChunkLocation(digest, blobs[blob], offset, clen, rlen, SPAN_ENTRY)
    if not 0 < clen <= _MAX_FRAME:
        raise FormatError(f"trace: chunk {i}: compressed length {clen} out of range")
    if not 0 < rlen <= MAX_CHUNK_SIZE:
        raise FormatError(f"trace: chunk {i}: raw length {rlen} out of range")
    if compression not in _COMPRESSIONS:
        raise FormatError(f"trace: chunk {i}: unknown compression {compression}")
    return ChunkLocation(digest, blobs[blob], offset, clen, rlen, compression)


async def replay(scheduler, trace: Iterable[ChunkLocation], concurrency: int = 16) -> dict:
    """Fetch every chunk of *trace* into the cache at TRACE priority, *concurrency* chunks at a time.

    *scheduler* is a ``FetchScheduler`` (anything with ``async ensure(loc,
    priority)``). Chunks are started in trace order; failures are counted and
    logged, never raised — a replay only warms the cache. Returns counts:
    chunks, failed.
    """
    if concurrency <= 0:
        raise ConfigError(f"replay concurrency must be positive, got {concurrency}")
    result = {"chunks": 0, "failed": 0}
    limit = trio.Semaphore(concurrency)

    async def one(loc: ChunkLocation) -> None:
        try:
            await scheduler.ensure(loc, Priority.TRACE)
        except LazyfsError as exc:
            result["failed"] += 1
            log.warning("trace replay: chunk %s of %s failed: %s", loc.digest.hex()[:16], loc.blob, exc)
        else:
            result["chunks"] += 1
        finally:
            limit.release()

    async with open_nursery() as nursery:
        for loc in trace:
            await limit.acquire()
            nursery.start_soon(one, loc)
    return result
