"""Layer blob format 2 (see docs/format.md): values, metadata codec, footer, tail anchoring.

A blob is ``frames | metadata | footer``; the *tail* is ``metadata | footer``.
Everything here is sans-IO: bytes in, values out (or the reverse), with every
length and count checked before it is trusted and before anything is
allocated for it. A tail is parsed only after its sha256 matched the
``meta-digest`` its manifest gives (``parse_anchored_tail``).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import msgpack
import zstandard

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.chunk import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    MAX_CHUNK_SIZE,
    chunk_digest,
    decompress_declared,
    declared_size,
)
from lazyfs.format.counted import Table, decode_counted_map
from lazyfs.format.digest import check_sha256, is_chunk_digest, sha256_digest

FORMAT_VERSION = 2
MAGIC = b"LZFSLAYR"
FOOTER = struct.Struct("<8sHHIQQ32s")
FOOTER_SIZE = FOOTER.size  # 64
BLOCK_SIZE = 4096
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_VIRTUAL_SIZE = 1 << 50  # 1 PiB: what the format can describe
DEFAULT_MAX_VIRTUAL_SIZE = 1 << 40  # 1 TiB: what a host accepts unless configured (Config.max_virtual_size)
MAX_METADATA_SIZE = 512 << 20  # compressed or decompressed, per layer
DEFAULT_METADATA_BUDGET = 128 << 20  # memory one image's metadata may take (Config.metadata_budget)
MAX_BLOBS = 4096
MAX_METADATA_KEYS = 32
ZEROED = -1  # extent.chunk value: this range reads as zeros, hiding lower layers
SELF_BLOB = ""  # blobs[0]: the blob that holds this metadata
MEDIA_TYPE_LAYER = "application/vnd.lazyfs.layer.v2"
MEDIA_TYPE_LAYER_V1 = "application/vnd.lazyfs.layer.v1"  # refused: its metadata is not anchored

# Memory a decoded table entry costs at most (its row while decoding plus its value afterwards:
# object headers, the digest bytes, non-cached ints), measured with tracemalloc by
# tests/format/test_bounds.py. Charged to the budget before the entries are read.
CHUNK_COST = 480
EXTENT_COST = 320
BLOB_NAME_COST = 192
# The fewest bytes one entry takes in msgpack: a chunk is fixarray + bin8(32) + 5 fixints, an extent 1 + 4.
_CHUNK_MIN_BYTES = 40
_EXTENT_MIN_BYTES = 5


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where a chunk's stored bytes live and how to turn them into raw bytes."""

    digest: bytes  # blake3-256 of the raw bytes
    blob: int  # index into LayerMeta.blobs
    offset: int  # of the stored frame inside that blob
    compressed_length: int
    raw_length: int
    compression: int


@dataclass(frozen=True, slots=True)
class Extent:
    """Virtual blocks ``[start, start+count)`` -> a chunk (from block ``chunk_offset``) or ZEROED."""

    start: int
    count: int
    chunk: int
    chunk_offset: int = 0

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """A chunk, named by digest, and the one place its stored frame can be read."""

    digest: bytes  # blake3-256 of the raw bytes
    blob: str  # "sha256:<hex>" of the blob holding the frame
    offset: int
    compressed_length: int
    raw_length: int
    compression: int

    @property
    def end(self) -> int:
        return self.offset + self.compressed_length


class MetadataBudget:
    """The memory one image's layer metadata may take, charged before it is allocated.

    Shared by the concurrent parses of an image's layers (thread-safe). What a
    parse holds only while it runs (the tail, the decompressed bytes) is
    refunded when it ends; the decoded tables stay charged.

    The decompressed bytes of all the image's tails are also counted as they
    add up, never refunded (``inflate``), so how much an image may make the
    host decompress does not depend on how many parses happened to overlap.
    A real tail decodes to far more memory than its bytes (a chunk row is at
    most ~60 bytes and costs ``CHUNK_COST``), so this refuses no image the
    tables' charges would let through.
    """

    def __init__(self, limit: int = DEFAULT_METADATA_BUDGET, what: str = "image") -> None:
        if limit <= 0:
            raise FormatError(f"metadata budget must be positive, not {limit}")
        self.limit, self.what = limit, what
        self.used = self.peak = self.inflated = 0
        self._lock = threading.Lock()

    def charge(self, n: int, what: str) -> None:
        """Take *n* bytes, or raise FormatError naming *what* if that would pass the limit."""
        with self._lock:
            if n < 0 or self.used + n > self.limit:
                raise FormatError(
                    f"{what}: needs {n} bytes of memory, over the metadata budget of {self.what} "
                    f"({self.used} of {self.limit} bytes in use; the config's metadata_budget sets it)")
            self.used += n
            self.peak = max(self.peak, self.used)

    def inflate(self, n: int, what: str) -> None:
        """Count *n* more decompressed bytes, or raise FormatError naming *what* if all the
        image's tails together would pass the limit."""
        with self._lock:
            if n < 0 or self.inflated + n > self.limit:
                raise FormatError(
                    f"{what}: decompresses to {n} bytes, and with the {self.inflated} bytes of the tails "
                    f"before it that is over the metadata budget of {self.what} ({self.limit} bytes; "
                    "the config's metadata_budget sets it)")
            self.inflated += n

    def refund(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)


@dataclass(frozen=True, slots=True)
class Footer:
    version: int
    meta_offset: int
    meta_length: int
    meta_digest: bytes


@dataclass(frozen=True, slots=True)
class LayerMeta:
    """Everything a reader needs to serve a layer, decoded and validated."""

    virtual_size: int
    block_size: int
    chunk_size: int
    blobs: tuple[str, ...]
    chunks: tuple[ChunkRef, ...]
    extents: tuple[Extent, ...]

    @property
    def blocks(self) -> int:
        return self.virtual_size // self.block_size

    def blob_of(self, ref: ChunkRef, self_digest: str) -> str:
        """The absolute blob digest holding *ref* (resolving SELF_BLOB)."""
        name = self.blobs[ref.blob]
        return self_digest if name == SELF_BLOB else name

    def locations(self, self_digest: str) -> list[ChunkLocation]:
        """Every chunk of the table as an absolute ChunkLocation, by chunk index."""
        return [
            ChunkLocation(c.digest, self.blob_of(c, self_digest), c.offset, c.compressed_length, c.raw_length, c.compression)
            for c in self.chunks
        ]


# ---------------------------------------------------------------- encoding


def encode_metadata(meta: LayerMeta) -> bytes:
    """Metadata section bytes (zstd-compressed msgpack, content size declared)."""
    doc = {
        "version": FORMAT_VERSION,
        "virtual_size": meta.virtual_size,
        "block_size": meta.block_size,
        "chunk_size": meta.chunk_size,
        "blobs": list(meta.blobs),
        "chunks": [[c.digest, c.blob, c.offset, c.compressed_length, c.raw_length, c.compression] for c in meta.chunks],
        "extents": [[e.start, e.count, e.chunk, e.chunk_offset] for e in meta.extents],
    }
    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(msgpack.packb(doc, use_bin_type=True))


def encode_footer(meta_offset: int, metadata: bytes) -> bytes:
    return FOOTER.pack(MAGIC, FORMAT_VERSION, 0, 0, meta_offset, len(metadata), chunk_digest(metadata))


def tail_digest(tail: bytes | memoryview) -> str:
    """The ``meta-digest`` of a tail: ``sha256:<hex>`` of its exact bytes."""
    return sha256_digest(tail)


# ---------------------------------------------------------------- decoding


def parse_footer(data: bytes, blob_size: int | None = None) -> Footer:
    """Decode the last FOOTER_SIZE bytes of a blob."""
    if len(data) < FOOTER_SIZE:
        raise FormatError(f"layer footer truncated: {len(data)} of {FOOTER_SIZE} bytes")
    magic, version, flags, reserved, meta_offset, meta_length, digest = FOOTER.unpack(data[-FOOTER_SIZE:])
    if magic != MAGIC:
        raise FormatError(f"not a lazyfs layer blob: bad magic {magic!r} at footer")
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported layer format version {version} (this lazyfs reads {FORMAT_VERSION})")
    if flags or reserved:
        raise FormatError(f"layer footer: reserved fields are not zero (flags={flags}, reserved={reserved})")
    if meta_length == 0 or meta_length > MAX_METADATA_SIZE:
        raise FormatError(f"layer footer: metadata length {meta_length} out of range")
    if blob_size is not None and meta_offset + meta_length + FOOTER_SIZE != blob_size:
        raise FormatError(
            f"layer footer: metadata at {meta_offset}+{meta_length} plus footer does not end the blob of {blob_size} bytes"
        )
    return Footer(version, meta_offset, meta_length, digest)


def parse_anchored_tail(tail: bytes, meta_digest: str, blob_size: int, *, budget: MetadataBudget | None = None,
                        max_virtual_size: int = MAX_VIRTUAL_SIZE, what: str = "layer",
                        source: str = "") -> tuple[Footer, LayerMeta]:
    """Check *tail* against the manifest's *meta_digest* (IntegrityError), then decode it.

    Nothing of the tail is looked at before its digest matched.
    """
    check_sha256(meta_digest, f"{what}: meta-digest")
    got = tail_digest(tail)
    if got != meta_digest:
        raise IntegrityError(f"metadata of {what}", meta_digest, got, source)
    return parse_tail(tail, blob_size, budget=budget, max_virtual_size=max_virtual_size)


def parse_tail(tail: bytes, blob_size: int | None = None, *, budget: MetadataBudget | None = None,
               max_virtual_size: int = MAX_VIRTUAL_SIZE) -> tuple[Footer, LayerMeta]:
    """Decode ``blob[meta_offset:]`` (metadata + footer): the one ranged read a mount needs.

    Readers call it through ``parse_anchored_tail``; writers call it on what they wrote.
    """
    footer = parse_footer(tail, blob_size)
    if len(tail) != footer.meta_length + FOOTER_SIZE:
        raise FormatError(f"layer tail is {len(tail)} bytes, footer says {footer.meta_length + FOOTER_SIZE}")
    return footer, parse_metadata(memoryview(tail)[: footer.meta_length], footer, budget=budget,
                                  max_virtual_size=max_virtual_size)


def parse_blob(blob: bytes) -> tuple[Footer, LayerMeta]:
    """Decode a whole blob held in memory (writers' self-checks and tests; not anchored)."""
    footer = parse_footer(blob, len(blob))
    return footer, parse_metadata(blob[footer.meta_offset : footer.meta_offset + footer.meta_length], footer)


def parse_metadata(data: bytes | memoryview, footer: Footer, *, budget: MetadataBudget | None = None,
                   max_virtual_size: int = MAX_VIRTUAL_SIZE, what: str = "layer metadata") -> LayerMeta:
    """Verify, decompress, decode and validate the metadata section, within *budget*."""
    if len(data) != footer.meta_length:
        raise FormatError(f"metadata is {len(data)} bytes, footer says {footer.meta_length}")
    got = chunk_digest(data)
    if got != footer.meta_digest:
        raise IntegrityError("layer metadata (footer digest)", footer.meta_digest.hex(), got.hex())
    budget = budget if budget is not None else MetadataBudget()
    size = declared_size(data, what)
    if size > MAX_METADATA_SIZE:
        raise FormatError(f"{what}: declares {size} bytes decompressed, more than the {MAX_METADATA_SIZE}-byte limit")
    budget.inflate(size, what)
    # The decompressed bytes, and the decoder's own copy of them, while the parse runs.
    budget.charge(2 * size, what)
    try:
        raw = decompress_declared(data, size, what)
        doc = decode_metadata(raw, budget, what)
        del raw
    finally:
        budget.refund(2 * size)
    return validate_metadata(doc, footer.meta_offset, max_virtual_size)


_METADATA_SCALARS = ("version", "virtual_size", "block_size", "chunk_size")
_METADATA_TABLES = {
    "blobs": Table(max_rows=MAX_BLOBS, cost=BLOB_NAME_COST),
    "chunks": Table(width=6, min_bytes=_CHUNK_MIN_BYTES, cost=CHUNK_COST),
    "extents": Table(width=4, min_bytes=_EXTENT_MIN_BYTES, cost=EXTENT_COST),
}


def decode_metadata(raw: bytes, budget: MetadataBudget | None = None, what: str = "layer metadata") -> dict:
    """The metadata map of decompressed bytes, decoded entry by entry within *budget*.

    Tables come back as lists of tuples. Only the shape is checked here (a
    map of at most MAX_METADATA_KEYS keys; ``blobs`` an array of strings;
    ``chunks`` and ``extents`` arrays of 6 and 4 scalars); the values are
    ``validate_metadata``'s. Keys it does not know are skipped unread.
    """
    budget = budget if budget is not None else MetadataBudget()
    return decode_counted_map(raw, what, max_keys=MAX_METADATA_KEYS, scalars=_METADATA_SCALARS,
                              tables=_METADATA_TABLES, max_str_len=128, max_bin_len=32, charge=budget.charge)


def _int(doc: dict, key: str, lo: int, hi: int) -> int:
    value = doc.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"layer metadata: {key}={value!r} not an integer in [{lo}, {hi}]")
    return value


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _row(entry: object, width: int) -> bool:
    return isinstance(entry, (list, tuple)) and len(entry) == width


def validate_metadata(doc: object, frames_end: int, max_virtual_size: int = MAX_VIRTUAL_SIZE) -> LayerMeta:
    """Turn a decoded metadata document into a LayerMeta, or raise FormatError saying where."""
    if not isinstance(doc, dict):
        raise FormatError("layer metadata: not a map")
    if doc.get("version") != FORMAT_VERSION or type(doc.get("version")) is not int:
        raise FormatError(f"layer metadata: version {doc.get('version')!r}, expected {FORMAT_VERSION}")
    if type(frames_end) is not int or frames_end < 0:
        raise FormatError(f"layer metadata: frames end at {frames_end!r}")
    block_size = _int(doc, "block_size", 512, 65536)
    if not _power_of_two(block_size):
        raise FormatError(f"layer metadata: block_size {block_size} is not a power of two")
    virtual_size = _int(doc, "virtual_size", block_size, min(MAX_VIRTUAL_SIZE, max_virtual_size))
    if virtual_size % block_size:
        raise FormatError(f"layer metadata: virtual_size {virtual_size} not a multiple of block_size {block_size}")
    chunk_size = _int(doc, "chunk_size", block_size, MAX_CHUNK_SIZE)
    if not _power_of_two(chunk_size):
        raise FormatError(f"layer metadata: chunk_size {chunk_size} is not a power of two")
    blobs = doc.get("blobs")
    if not isinstance(blobs, list) or not blobs or blobs[0] != SELF_BLOB or len(blobs) > MAX_BLOBS:
        raise FormatError("layer metadata: blobs must be a list starting with the self entry ''")
    for i, name in enumerate(blobs[1:], 1):
        check_sha256(name, f"layer metadata: blobs[{i}]")
    nblocks = virtual_size // block_size
    raw_chunks, raw_extents = doc.get("chunks"), doc.get("extents")
    if not isinstance(raw_chunks, list) or not isinstance(raw_extents, list):
        raise FormatError("layer metadata: chunks and extents must be lists")
    if len(raw_extents) > nblocks or len(raw_chunks) > nblocks:
        raise FormatError("layer metadata: more chunks or extents than blocks")
    chunks = []
    for i, c in enumerate(raw_chunks):
        if not (_row(c, 6) and is_chunk_digest(c[0]) and all(type(x) is int for x in c[1:])):
            raise FormatError(f"layer metadata: chunks[{i}] malformed")
        ref = ChunkRef(*c)
        if not 0 <= ref.blob < len(blobs):
            raise FormatError(f"layer metadata: chunks[{i}] names blob {ref.blob} of {len(blobs)}")
        if ref.raw_length <= 0 or ref.raw_length > chunk_size or ref.raw_length % block_size:
            raise FormatError(f"layer metadata: chunks[{i}] raw length {ref.raw_length} invalid")
        if ref.compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD):
            raise FormatError(f"layer metadata: chunks[{i}] unknown compression {ref.compression}")
        if ref.compressed_length <= 0 or (ref.compression == COMPRESSION_NONE and ref.compressed_length != ref.raw_length) \
                or ref.compressed_length > ref.raw_length:
            raise FormatError(f"layer metadata: chunks[{i}] stored length {ref.compressed_length} invalid")
        if ref.offset < 0 or ref.offset > MAX_VIRTUAL_SIZE or \
                (ref.blob == 0 and ref.offset + ref.compressed_length > frames_end):
            raise FormatError(f"layer metadata: chunks[{i}] frame at {ref.offset}+{ref.compressed_length} past the frames")
        chunks.append(ref)
    extents = []
    prev_end = 0
    for i, e in enumerate(raw_extents):
        if not (_row(e, 4) and all(type(x) is int for x in e)):
            raise FormatError(f"layer metadata: extents[{i}] malformed")
        ext = Extent(*e)
        if ext.count <= 0 or ext.start < prev_end:
            raise FormatError(f"layer metadata: extents[{i}] at block {ext.start} overlaps or is unsorted (previous ends at {prev_end})")
        if ext.end > nblocks:
            raise FormatError(f"layer metadata: extents[{i}] ends at block {ext.end}, past the {nblocks} blocks")
        if ext.chunk == ZEROED:
            if ext.chunk_offset != 0:
                raise FormatError(f"layer metadata: extents[{i}] zeroed with a chunk offset")
        elif not 0 <= ext.chunk < len(chunks):
            raise FormatError(f"layer metadata: extents[{i}] names chunk {ext.chunk} of {len(chunks)}")
        elif ext.chunk_offset < 0 or (ext.chunk_offset + ext.count) * block_size > chunks[ext.chunk].raw_length:
            raise FormatError(f"layer metadata: extents[{i}] reads past the end of chunk {ext.chunk}")
        extents.append(ext)
        prev_end = ext.end
    return LayerMeta(virtual_size, block_size, chunk_size, tuple(blobs), tuple(chunks), tuple(extents))
