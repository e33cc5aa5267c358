"""The span map of an indexed layer (docs/index.md): values, codec, builder and span decoding.

An ordinary OCI layer is left as it is. Its *uncompressed* tar stream is cut
into spans of about ``SPAN_SIZE`` bytes, each named by the blake3-256 of its
bytes, and each readable on its own from a ranged read of the original blob:

* gzip: from a zran checkpoint (``lazyfs.format.zran``) at a deflate block boundary,
  with its 32 KiB window stored *sparse*: only the bytes the span refers back to.
  A builder may store windows only every *window_spacing* bytes (versions 2 and 3
  allow it; this one stores every window, docs/index.md §3); a span between two of
  them is *chained*: its window is the tail of the span before it (``SpanLocation.prev``);
* zstd: from a frame start (several frames); a single-frame layer has one
  checkpoint, so every span reads the blob from its start (fetched whole);
* plain tar: the span's own bytes.

The ext4 blocks of the index's metadata layer that hold file data are
*mapped*: ``MappedExtent`` says which tar bytes they read.

A span is served like a chunk: ``SpanLocation`` is a ``ChunkLocation`` (its
digest names its raw bytes; ``blob``/``offset``/``compressed_length`` say
what to fetch), so the fetch scheduler, the cache and failover handle spans
unchanged; ``decode_location`` turns fetched bytes into verified raw bytes.
Sans-IO apart from reading the blob it is given in ``build_spans``.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import blake3
import msgpack
import zstandard

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.chunk import COMPRESSION_ZSTD, decode_chunk, decompress_declared, declared_size
from lazyfs.format.layer import ChunkLocation
from lazyfs.format.zran import WINDOW, Checkpoint, GzipScanner, inflate_from, sparse_window

SPAN_VERSION = 3  # 3: windows stored beside the document, read lazily; 2: chained gzip spans; 1 and 2 are still read
SPAN_SIZE = 256 << 10
WINDOW_SPACING = 0  # gzip: a stored window at least this often, chained spans in between; 0: at every checkpoint
WINDOW_LEVEL = 9  # zstd level of a stored (sparse) window: 19 packs them 3% smaller at 40 times the time
CHAINED = -2  # a span row's window: the last WINDOW tar bytes before its checkpoint, from the span ending there
MAX_CHAIN = 32  # chained spans in a row before a stored window (a longer chain is refused)
MAX_SPAN = 16 << 20  # raw bytes of one span (the chunk limit: spans live in the chunk cache)
MAX_DOC = 256 << 20  # a span map, decompressed
MAX_ENTRIES = 1 << 22  # spans, windows or mapped extents in one span map
MAX_WINDOW_STORED = 64 << 10
READ_PIECE = 256 << 10
MEDIA_TYPE_SPANS = "application/vnd.lazyfs.spans.v1+zstd"

# ChunkLocation.compression of spans: never a chunk's (0, 1), so a plain chunk decoder refuses them.
SPAN_GZIP, SPAN_ZSTD, SPAN_NONE = 0x10, 0x11, 0x12
CODECS = {"gzip": SPAN_GZIP, "zstd": SPAN_ZSTD, "none": SPAN_NONE}
ACCESS = {"gzip": "gzip-checkpoints", "zstd": "zstd-frames", "none": "direct"}
ZSTD_WHOLE = "zstd-whole"  # a single-frame zstd layer: every span reads the blob from byte 0


@dataclass(frozen=True, slots=True)
class SpanLocation(ChunkLocation):
    """A span: ``raw_length`` uncompressed bytes at tar offset *tar_offset*.

    Fetch ``[offset, offset + compressed_length)`` of *blob*, resume decoding
    there (gzip: *bits* of the first byte and the zstd-compressed *window*),
    drop the first *skip* uncompressed bytes, keep ``raw_length``.

    A chained gzip span has no *window*: *prev* is the span that ends where its
    checkpoint starts, and the last ``WINDOW`` bytes of prev's (verified) raw
    bytes are the window (the fetch layer hands them to ``decode_span``).

    In a version 3 span map a stored window is not in the document either:
    *window_at* says where it is in the span map blob (a zstd frame named by the
    blake3 of the window, read and verified like a chunk when a span needs it).
    """

    tar_offset: int = 0
    skip: int = 0
    bits: int = 0
    window: bytes = b""
    prev: "SpanLocation | None" = None
    window_at: ChunkLocation | None = None


def window_key(loc: ChunkLocation) -> bytes | None:
    """The digest naming the window a span is decoded with, when it is not in its location: its prev's
    (chained: the prev's last ``WINDOW`` bytes) or its stored window's; None when it needs none."""
    if not isinstance(loc, SpanLocation):
        return None
    if loc.prev is not None:
        return loc.prev.digest
    return loc.window_at.digest if loc.window_at is not None else None


def decode_window(loc: ChunkLocation, stored: bytes | memoryview, source: str = "") -> bytes:
    """A stored window's verified bytes (a zstd frame of at most ``WINDOW`` bytes, named by its blake3)."""
    if not 0 < loc.raw_length <= WINDOW:
        raise FormatError(f"window {loc.digest.hex()[:16]} of {loc.blob}: {loc.raw_length} bytes (at most {WINDOW})")
    return decode_chunk(loc.digest, bytes(stored), loc.compression, loc.raw_length, source)


@dataclass(frozen=True, slots=True)
class MappedExtent:
    """Virtual blocks ``[start, start + count)`` read tar bytes ``[tar_offset, tar_offset + length)``, then zeros."""

    start: int
    count: int
    tar_offset: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True, slots=True, eq=False)
class SpanMap:
    """One indexed layer: its source blob, its spans (cover the tar stream in order) and mapped extents."""

    source_digest: str
    source_size: int
    codec: str  # gzip | zstd | none
    access: str  # gzip-checkpoints | zstd-frames | zstd-whole | direct
    tar_size: int
    block_size: int
    spans: tuple[SpanLocation, ...]
    mapped: tuple[MappedExtent, ...]
    windows_blob: str = ""  # the span map blob holding its stored windows (version 3), else ""
    starts: tuple[int, ...] = field(default=(), repr=False)  # the spans' tar offsets, for bisect

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts", tuple(s.tar_offset for s in self.spans))

    def spans_for(self, lo: int, hi: int) -> list[SpanLocation]:
        """The spans holding tar bytes ``[lo, hi)``, in order."""
        if lo >= hi:
            return []
        starts = self.starts
        i = bisect.bisect_right(starts, lo) - 1
        out = []
        while i < len(self.spans) and self.spans[i].tar_offset < hi:
            out.append(self.spans[i])
            i += 1
        return out


def read_tar_range(m: SpanMap, raw_of: Callable[[SpanLocation], bytes], lo: int, hi: int) -> bytes:
    """Tar bytes ``[lo, hi)`` assembled from the spans' raw bytes (``raw_of(span)``)."""
    out = bytearray()
    for span in m.spans_for(lo, hi):
        raw = raw_of(span)
        a = max(lo, span.tar_offset) - span.tar_offset
        b = min(hi, span.tar_offset + span.raw_length) - span.tar_offset
        out += raw[a:b]
    if len(out) != hi - lo:
        raise FormatError(f"tar bytes {lo}..{hi} of {m.source_digest} are not covered by its spans")
    return bytes(out)


# ---------------------------------------------------------------- decoding one span


def decode_span(loc: SpanLocation, stored: bytes | memoryview, source: str = "", window: bytes | None = None) -> bytes:
    """The verified raw bytes of a span from its fetched compressed range (IntegrityError if they are not).

    *window*: for a chained span, the last ``WINDOW`` raw bytes of ``loc.prev`` (verified); for a span
    whose window is stored apart (``window_at``), that window's verified bytes.
    """
    what = f"span {loc.digest.hex()[:16]} (tar {loc.tar_offset}+{loc.raw_length}) of {loc.blob}"
    if not 0 < loc.raw_length <= MAX_SPAN:
        raise FormatError(f"{what}: absurd raw length")
    stored = bytes(stored)
    if loc.compression == SPAN_NONE:
        raw = stored
    elif loc.compression == SPAN_GZIP:
        if loc.prev is not None:
            if window is None or len(window) != WINDOW:
                raise FormatError(f"{what}: a chained span needs the {WINDOW} bytes before it")
        elif loc.window_at is not None:
            if window is None or len(window) != loc.window_at.raw_length:
                raise FormatError(f"{what}: its stored window was not given")
        else:
            window = _window(loc.window, what) if loc.window else b""
        raw = inflate_from(stored, loc.bits, window, loc.skip, loc.raw_length, what)
    elif loc.compression == SPAN_ZSTD:
        raw = _zstd_range(stored, loc.skip, loc.raw_length, what)
    else:
        raise FormatError(f"{what}: unknown span codec {loc.compression}")
    got = blake3.blake3(raw).digest()
    if got != loc.digest or len(raw) != loc.raw_length:
        raise IntegrityError(what, loc.digest.hex(), got.hex(), source)
    return raw


def span_tail(loc: ChunkLocation, raw: bytes | bytearray) -> bytes | None:
    """The window a chained span after *loc* needs: the last ``WINDOW`` of a gzip span's verified raw bytes
    (None for anything else, or a span too short to give one)."""
    if isinstance(loc, SpanLocation) and loc.compression == SPAN_GZIP and len(raw) == loc.raw_length >= WINDOW:
        return bytes(raw[-WINDOW:])
    return None


def decode_location(loc: ChunkLocation, stored: bytes | memoryview, source: str = "",
                    window: bytes | None = None) -> bytes:
    """A chunk's or a span's verified raw bytes: what the fetch layer calls for every location."""
    if isinstance(loc, SpanLocation):
        return decode_span(loc, stored, source, window)
    return decode_chunk(loc.digest, stored, loc.compression, loc.raw_length, source)


def _window(stored: bytes, what: str) -> bytes:
    size = declared_size(stored, f"{what}: window")
    if size > WINDOW:
        raise FormatError(f"{what}: a window of {size} bytes (at most {WINDOW})")
    return decompress_declared(stored, size, f"{what}: window")


def _zstd_range(stored: bytes, skip: int, length: int, what: str) -> bytes:
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(stored), read_across_frames=True)
        left = skip
        for _ in range(skip // READ_PIECE + 2):
            if not left:
                break
            got = reader.read(min(left, READ_PIECE))
            if not got:
                break
            left -= len(got)
        raw = reader.read(length) if not left else b""
        while left == 0 and len(raw) < length:  # read() may return less than asked at frame ends
            more = reader.read(length - len(raw))
            if not more:
                break
            raw += more
    except (zstandard.ZstdError, ValueError) as exc:
        raise IntegrityError(what, "a zstd stream", f"one that does not decode ({exc})") from None
    if left or len(raw) != length:
        raise IntegrityError(what, f"{skip + length} uncompressed bytes", "fewer")
    return raw


# ---------------------------------------------------------------- building


@dataclass(slots=True)
class _Cut:
    tar_offset: int
    length: int
    digest: bytes
    checkpoint: int  # index into the checkpoints


class _SpanCutter:
    """Hashes the uncompressed stream into spans: cut at checkpoints, and every *max_span* bytes between them."""

    def __init__(self, max_span: int) -> None:
        self.max_span = max_span
        self.cuts: list[_Cut] = []
        self.pos = 0
        self.start = 0
        self.hasher = blake3.blake3()
        self.checkpoint = 0

    def add(self, piece: bytes) -> None:
        view = memoryview(piece)
        while view:
            room = self.max_span - (self.pos - self.start)
            take = view[:room]
            self.hasher.update(take)
            self.pos += len(take)
            view = view[len(take):]
            if self.pos - self.start >= self.max_span:
                self.close(self.checkpoint)

    def close(self, next_checkpoint: int) -> None:
        if self.pos > self.start:
            self.cuts.append(_Cut(self.start, self.pos - self.start, self.hasher.digest(), self.checkpoint))
            self.start = self.pos
            self.hasher = blake3.blake3()
        self.checkpoint = next_checkpoint


@dataclass(frozen=True, slots=True)
class BuiltSpans:
    """What ``build_spans`` found; ``span_map`` adds the mapped extents."""

    codec: str
    access: str
    source_size: int
    tar_size: int
    spans: tuple[SpanLocation, ...]
    windows: int  # how many distinct windows the spans need
    prevs: tuple[int, ...] = ()  # per span, the index of its prev (chained spans) or -1

    def span_map(self, source_digest: str, mapped: tuple[MappedExtent, ...], block_size: int = 4096) -> SpanMap:
        spans: list[SpanLocation] = []
        prevs = self.prevs or (-1,) * len(self.spans)
        for s, p in zip(self.spans, prevs):
            spans.append(SpanLocation(s.digest, source_digest, s.offset, s.compressed_length, s.raw_length,
                                      s.compression, s.tar_offset, s.skip, s.bits, s.window,
                                      spans[p] if p >= 0 else None))
        return SpanMap(source_digest, self.source_size, self.codec, self.access, self.tar_size, block_size,
                       tuple(spans), mapped)


def build_spans(blob, codec: str, source_size: int, sink: Callable[[bytes], None], *,
                span_size: int = SPAN_SIZE, limit: int = 1 << 40, window_spacing: int = WINDOW_SPACING) -> BuiltSpans:
    """Read the layer blob *blob* (a binary file) once: spans, and the tar stream handed to *sink*.

    gzip: a checkpoint every *span_size* bytes, its window stored every *window_spacing*
    bytes; the spans in between are chained. FormatError if the blob does not decode, or
    decodes to more than *limit* bytes.
    """
    if codec not in CODECS:
        raise FormatError(f"layer compression {codec!r} cannot be indexed (gzip, zstd or none)")
    # zstd spans are cut at frame starts only, and split inside a frame only past MAX_SPAN: a span
    # inside a frame is decoded from the frame's start, so fewer, larger ones cost less to read.
    max_span = {"none": span_size, "gzip": min(MAX_SPAN, 4 * span_size), "zstd": MAX_SPAN}[codec]
    cutter = _SpanCutter(max_span)
    checkpoints: list[Checkpoint] = []
    packer = _WindowPacker(blob)

    def emit(piece: bytes) -> None:
        if cutter.pos + len(piece) > limit:
            raise FormatError(f"the layer decompresses to more than {limit} bytes")
        cutter.add(piece)
        sink(piece)

    if codec == "none":
        checkpoints.append(Checkpoint(0, 0, 0, b""))
        for _ in range(source_size // READ_PIECE + 2):
            piece = blob.read(READ_PIECE)
            if not piece:
                break
            emit(piece)
    elif codec == "gzip":
        scanner = GzipScanner(span_size)
        for _ in range(source_size // READ_PIECE + 2):
            data = blob.read(READ_PIECE)
            if not data:
                break
            for piece in scanner.feed(data):
                _sync(cutter, scanner.checkpoints, checkpoints)
                emit(piece)
                packer.pack(checkpoints, scanner.out, scanner.consumed)
        _sync(cutter, scanner.checkpoints, checkpoints)
        scanner.finish()
        packer.pack(checkpoints, scanner.out, scanner.consumed, final=True)
    else:
        _zstd_frames(blob, source_size, span_size, cutter, checkpoints, emit)
    cutter.close(len(checkpoints))
    if not cutter.cuts:
        raise FormatError("the layer is empty")
    stored: set[bytes] = set()
    spans: list[SpanLocation] = []
    prevs: list[int] = []
    anchor_out = 0  # tar offset of the last checkpoint that needs no window from before it
    chain, depth = -1, 0  # the current checkpoint's prev span (-1: none), and how many chained in a row
    for n, cut in enumerate(cutter.cuts):
        cp = checkpoints[cut.checkpoint]
        if codec == "none":
            start, end = cut.tar_offset, cut.tar_offset + cut.length
        else:
            start = cp.start
            nxt = checkpoints[cut.checkpoint + 1] if cut.checkpoint + 1 < len(checkpoints) else None
            end = (nxt.start + (1 if nxt.bits else 0)) if nxt is not None else source_size
        if n == 0 or cutter.cuts[n - 1].checkpoint != cut.checkpoint:  # the checkpoint's first span
            before = spans[-1] if spans else None
            chain = -1
            if codec == "gzip" and packer.whole[cut.checkpoint] and cp.out - anchor_out < window_spacing \
                    and depth < MAX_CHAIN and before is not None and before.raw_length >= WINDOW \
                    and before.tar_offset + before.raw_length == cp.out:
                chain, depth = n - 1, depth + 1
            else:
                anchor_out, depth = cp.out, 0
        window = packer.packed[cut.checkpoint] if codec == "gzip" and chain < 0 else b""
        if window:
            stored.add(window)
        spans.append(SpanLocation(cut.digest, "", start, end - start, cut.length, CODECS[codec], cut.tar_offset,
                                  0 if codec == "none" else cut.tar_offset - cp.out, cp.bits, window))
        prevs.append(chain)
    access = ACCESS[codec] if not (codec == "zstd" and len(checkpoints) == 1) else ZSTD_WHOLE
    return BuiltSpans(codec, access, source_size, cutter.pos, tuple(spans), len(stored), tuple(prevs))


def _sync(cutter: _SpanCutter, found: list[Checkpoint], kept: list[Checkpoint]) -> None:
    """Close the current span at every checkpoint the scanner found since the last call (taken out of *found*)."""
    for cp in found:
        assert cp.out == cutter.pos, "a checkpoint is taken right after the output it follows"
        cutter.close(len(kept))
        kept.append(cp)
    found.clear()


class _WindowPacker:
    """Each gzip checkpoint's window, made sparse (``sparse_window``) and packed as a zstd frame as soon as
    the scan has inflated the ``WINDOW`` bytes after it; the checkpoint then drops its window, so a scan
    holds packed windows only (a few KiB per checkpoint, not 32)."""

    def __init__(self, blob) -> None:
        self.blob = blob
        self.packed: list[bytes] = []  # per checkpoint: its packed sparse window, b"" when it has none
        self.whole: list[bool] = []  # per checkpoint: its window was a whole WINDOW (a chain may replace it)
        self._compressor = zstandard.ZstdCompressor(level=WINDOW_LEVEL)

    def pack(self, checkpoints: list[Checkpoint], out: int, consumed: int, final: bool = False) -> None:
        """Pack the windows of *checkpoints* that *out* inflated bytes (all, if *final*) let be found; the
        compressed bytes up to *consumed* inflate to *out*."""
        for i in range(len(self.packed), len(checkpoints)):
            cp = checkpoints[i]
            if not final and cp.out + WINDOW > out:
                return
            packed = b""
            if cp.window:
                here = self.blob.tell()
                self.blob.seek(cp.start)
                compressed = self.blob.read(consumed - cp.start)
                self.blob.seek(here)
                sparse = sparse_window(compressed, cp.bits, cp.window, out - cp.out, f"checkpoint at {cp.out}")
                packed = self._compressor.compress(sparse) if sparse else b""
            self.packed.append(packed)
            self.whole.append(len(cp.window) == WINDOW)
            checkpoints[i] = Checkpoint(cp.out, cp.start, cp.bits, b"")


def _zstd_frames(blob, source_size: int, span_size: int, cutter: _SpanCutter, checkpoints: list[Checkpoint],
                 emit: Callable[[bytes], None]) -> None:
    """Walk the zstd frames of *blob*: a checkpoint at the first frame start after every *span_size* bytes."""
    consumed = 0  # compressed bytes handed to finished frames
    dobj = zstandard.ZstdDecompressor().decompressobj()
    frame_start = 0
    frames = 0
    checkpoints.append(Checkpoint(0, 0, 0, b""))
    pending = b""
    for _ in range(source_size // 8 + 16):  # a read or a frame per pass; a frame takes at least 9 bytes
        if not pending:
            pending = blob.read(16384)
            if not pending:
                break
        data, pending = pending, b""
        try:
            out = dobj.decompress(data)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd frame at compressed byte {frame_start} does not decode: {exc}") from None
        if out:
            emit(out)
        if dobj.eof:
            rest = dobj.unused_data
            frame_end = consumed + len(data) - len(rest)
            frames += 1
            consumed = frame_end
            frame_start = frame_end
            if rest or frame_end < source_size:
                if cutter.pos - checkpoints[-1].out >= span_size:
                    cutter.close(len(checkpoints))
                    checkpoints.append(Checkpoint(cutter.pos, frame_start, 0, b""))
            dobj = zstandard.ZstdDecompressor().decompressobj()
            pending = rest
        else:
            consumed += len(data)
    inside = consumed > frame_start  # bytes given to a frame that never ended
    if frames == 0 or inside or consumed != source_size or pending:
        raise FormatError(f"zstd stream ends inside a frame (at byte {consumed} of {source_size})")


# ---------------------------------------------------------------- the span map document


@dataclass(frozen=True, slots=True)
class SpanMapBlob:
    """A span map as stored (version 3): its stored windows, then the document (the last *doc_length* bytes)."""

    data: bytes
    doc_length: int

    @property
    def doc(self) -> bytes:
        return self.data[len(self.data) - self.doc_length:]


def encode_span_map(m: SpanMap) -> SpanMapBlob:
    """The span map blob: each distinct stored window as a zstd frame, then one zstd frame (content size
    declared) of the msgpack document, which says where each window is and names it by its blake3. A
    mount reads the document only; a span's window is read when the span is (docs/index.md §3)."""
    frames: list[bytes] = []
    windows: dict[bytes, int] = {}
    rows, table = [], []
    offset = 0
    for s in m.spans:
        if s.prev is not None:
            w = CHAINED
        elif s.window:
            w = windows.get(s.window, -1)
            if w < 0:
                raw = _window(s.window, "window")
                w = windows[s.window] = len(table)
                table.append([offset, len(s.window), blake3.blake3(raw).digest(), len(raw)])
                frames.append(s.window)
                offset += len(s.window)
        else:
            w = -1
        rows.append([s.tar_offset, s.raw_length, s.digest, s.offset, s.compressed_length, s.skip, s.bits, w])
    doc = {
        "version": SPAN_VERSION,
        "source": m.source_digest,
        "source_size": m.source_size,
        "codec": m.codec,
        "access": m.access,
        "tar_size": m.tar_size,
        "block_size": m.block_size,
        "spans": rows,
        "windows": table,
        "mapped": [[e.start, e.count, e.tar_offset, e.length] for e in m.mapped],
    }
    packed = zstandard.ZstdCompressor(level=10, write_content_size=True).compress(msgpack.packb(doc, use_bin_type=True))
    return SpanMapBlob(b"".join(frames) + packed, len(packed))


def _ints(row: object, n: int, what: str) -> list[int]:
    if not isinstance(row, list) or len(row) != n or not all(type(x) is int for x in row):
        raise FormatError(f"{what} is not an array of {n} integers")
    return row


def decode_span_map(stored: bytes, what: str = "span map", max_size: int = MAX_DOC, *,
                    blob: str = "", windows_end: int = 0) -> SpanMap:
    """Parse and check a span map document (every rule of docs/index.md §3); FormatError naming the field.

    *max_size*: the most decompressed bytes accepted (checked on the frame header, before decompressing).
    Version 3 stores its windows in the blob *blob* before the document, which starts at *windows_end*.
    """
    size = declared_size(stored, what)
    if size > min(max_size, MAX_DOC):
        raise FormatError(f"{what}: {size} bytes decompressed (at most {min(max_size, MAX_DOC)})")
    raw = decompress_declared(stored, size, what)
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=MAX_WINDOW_STORED,
                              max_str_len=128, max_array_len=MAX_ENTRIES, max_map_len=32)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as exc:
        raise FormatError(f"{what} does not decode: {exc or type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a map")
    version = doc.get("version")
    if version not in (1, 2, SPAN_VERSION):
        raise FormatError(f"{what}: version {version!r} (this lazyfs reads 1 to {SPAN_VERSION})")
    codec, access = doc.get("codec"), doc.get("access")
    if codec not in CODECS or access not in (ACCESS[codec], ZSTD_WHOLE if codec == "zstd" else None):
        raise FormatError(f"{what}: codec {codec!r} with access {access!r}")
    source = doc.get("source")
    if not isinstance(source, str) or not source.startswith("sha256:") or len(source) != 71:
        raise FormatError(f"{what}: source {source!r} is not a sha256 digest")
    source_size, tar_size, bs = doc.get("source_size"), doc.get("tar_size"), doc.get("block_size")
    if type(source_size) is not int or type(tar_size) is not int or not 0 < source_size < 1 << 50 \
            or not 0 < tar_size < 1 << 50:
        raise FormatError(f"{what}: source_size or tar_size out of range")
    if bs != 4096:
        raise FormatError(f"{what}: block_size {bs!r} (4096)")
    windows = _windows(doc.get("windows"), version, what, blob, windows_end)
    rows, mapped_rows = doc.get("spans"), doc.get("mapped")
    if not isinstance(rows, list) or not rows or not isinstance(mapped_rows, list):
        raise FormatError(f"{what}: spans or mapped missing")
    spans: list[SpanLocation] = []
    ending: dict[int, int] = {}  # tar offset -> the span ending there (chained spans find their prev)
    depth: list[int] = []
    pos = 0
    code = CODECS[codec]
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 8 or not isinstance(row[2], bytes) or len(row[2]) != 32:
            raise FormatError(f"{what}: spans[{i}] is not [tar_offset, length, digest, offset, compressed_length, "
                              f"skip, bits, window]")
        tar_offset, length, digest, offset, clen, skip, bits, w = row
        _ints([tar_offset, length, offset, clen, skip, bits, w], 7, f"{what}: spans[{i}]")
        if tar_offset != pos or not 0 < length <= MAX_SPAN:
            raise FormatError(f"{what}: spans[{i}] does not follow the previous span or has length {length}")
        if offset < 0 or clen <= 0 or offset + clen > source_size or skip < 0 or skip > tar_size:
            raise FormatError(f"{what}: spans[{i}] reads outside the source blob")
        lowest = CHAINED if version >= 2 and codec == "gzip" else -1
        if not 0 <= bits <= (7 if codec == "gzip" else 0) or not lowest <= w < len(windows) or \
                (w >= 0 and codec != "gzip"):
            raise FormatError(f"{what}: spans[{i}] has bits {bits} or window {w} out of range")
        if codec == "none" and (offset != tar_offset or clen != length or skip):
            raise FormatError(f"{what}: spans[{i}] of a plain tar must read its own bytes")
        prev = None
        depth.append(0)
        if w == CHAINED:
            p = ending.get(tar_offset - skip, -1)
            if p < 0 or spans[p].raw_length < WINDOW or depth[p] >= MAX_CHAIN:
                raise FormatError(f"{what}: spans[{i}] is chained, but no span of {WINDOW} bytes or more ends at its "
                                  f"checkpoint (or the chain is longer than {MAX_CHAIN})")
            prev, depth[i] = spans[p], depth[p] + 1
        window = windows[w] if w >= 0 else b""  # inline (versions 1, 2) or where it is in the blob (3)
        spans.append(SpanLocation(digest, source, offset, clen, length, code, tar_offset, skip, bits,
                                  window if isinstance(window, bytes) else b"", prev,
                                  window if isinstance(window, ChunkLocation) else None))
        pos += length
        ending[pos] = i
    if pos != tar_size:
        raise FormatError(f"{what}: the spans cover {pos} bytes, the tar has {tar_size}")
    mapped = []
    end = 0
    for i, row in enumerate(mapped_rows):
        start, count, tar_offset, length = _ints(row, 4, f"{what}: mapped[{i}]")
        if start < end or count <= 0 or not (count - 1) * bs < length <= count * bs or tar_offset < 0 \
                or tar_offset + length > tar_size:
            raise FormatError(f"{what}: mapped[{i}] overlaps the previous extent or reads outside the tar")
        mapped.append(MappedExtent(start, count, tar_offset, length))
        end = start + count
    return SpanMap(source, source_size, codec, access, tar_size, bs, tuple(spans), tuple(mapped),
                   blob if version >= 3 else "")


def _windows(table: object, version: int, what: str, blob: str, windows_end: int) -> list:
    """The stored windows: inline zstd frames (versions 1 and 2), or where they are in the blob (version 3)."""
    if version < 3:
        if not isinstance(table, list) or not all(isinstance(w, bytes) and w for w in table):
            raise FormatError(f"{what}: windows is not an array of binaries")
        return table
    if not isinstance(table, list) or not blob:
        raise FormatError(f"{what}: windows is not an array (or the blob holding them is not known)")
    out = []
    for i, row in enumerate(table):
        if not isinstance(row, list) or len(row) != 4 or not isinstance(row[2], bytes) or len(row[2]) != 32:
            raise FormatError(f"{what}: windows[{i}] is not [offset, length, digest, raw_length]")
        offset, length, digest, raw_length = row
        _ints([offset, length, raw_length], 3, f"{what}: windows[{i}]")
        if offset < 0 or not 0 < length <= MAX_WINDOW_STORED or offset + length > windows_end \
                or not 0 < raw_length <= WINDOW:
            raise FormatError(f"{what}: windows[{i}] lies outside the windows before the document or is too large")
        out.append(ChunkLocation(digest, blob, offset, length, raw_length, COMPRESSION_ZSTD))
    return out


def iter_mapped_blocks(m: SpanMap) -> Iterator[tuple[int, int]]:
    """``(start, end)`` block ranges of the mapped extents."""
    for e in m.mapped:
        yield e.start, e.end
