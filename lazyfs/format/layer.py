"""Layer blob format v1 (see docs/format.md): values, metadata codec, footer.

A blob is ``frames | metadata | footer``. Everything here is sans-IO: bytes in,
values out (or the reverse), with every length checked before it is trusted.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import msgpack
import zstandard

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.chunk import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    MAX_CHUNK_SIZE,
    chunk_digest,
)

FORMAT_VERSION = 1
MAGIC = b"LZFSLAYR"
FOOTER = struct.Struct("<8sHHIQQ32s")
FOOTER_SIZE = FOOTER.size  # 64
BLOCK_SIZE = 4096
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_VIRTUAL_SIZE = 1 << 50  # 1 PiB
MAX_METADATA_SIZE = 512 << 20  # decompressed
ZEROED = -1  # extent.chunk value: this range reads as zeros, hiding lower layers
SELF_BLOB = ""  # blobs[0]: the blob that holds this metadata
_BLOB_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MEDIA_TYPE_LAYER = "application/vnd.lazyfs.layer.v1"


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
    """Metadata section bytes (zstd-compressed msgpack)."""
    doc = {
        "version": FORMAT_VERSION,
        "virtual_size": meta.virtual_size,
        "block_size": meta.block_size,
        "chunk_size": meta.chunk_size,
        "blobs": list(meta.blobs),
        "chunks": [[c.digest, c.blob, c.offset, c.compressed_length, c.raw_length, c.compression] for c in meta.chunks],
        "extents": [[e.start, e.count, e.chunk, e.chunk_offset] for e in meta.extents],
    }
    return zstandard.ZstdCompressor(level=3).compress(msgpack.packb(doc, use_bin_type=True))


def encode_footer(meta_offset: int, metadata: bytes) -> bytes:
    return FOOTER.pack(MAGIC, FORMAT_VERSION, 0, 0, meta_offset, len(metadata), chunk_digest(metadata))


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


def parse_tail(tail: bytes, blob_size: int | None = None) -> tuple[Footer, LayerMeta]:
    """Decode ``blob[meta_offset:]`` (metadata + footer): the one ranged read a mount needs."""
    footer = parse_footer(tail, blob_size)
    if len(tail) != footer.meta_length + FOOTER_SIZE:
        raise FormatError(f"layer tail is {len(tail)} bytes, footer says {footer.meta_length + FOOTER_SIZE}")
    return footer, parse_metadata(tail[: footer.meta_length], footer)


def parse_blob(blob: bytes) -> tuple[Footer, LayerMeta]:
    """Decode a whole blob held in memory."""
    footer = parse_footer(blob, len(blob))
    return footer, parse_metadata(blob[footer.meta_offset : footer.meta_offset + footer.meta_length], footer)


def parse_metadata(data: bytes, footer: Footer) -> LayerMeta:
    """Verify, decompress and validate the metadata section."""
    if len(data) != footer.meta_length:
        raise FormatError(f"metadata is {len(data)} bytes, footer says {footer.meta_length}")
    got = chunk_digest(data)
    if got != footer.meta_digest:
        raise IntegrityError("layer metadata", footer.meta_digest.hex(), got.hex())
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_METADATA_SIZE)
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except (zstandard.ZstdError, ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as exc:
        raise FormatError(f"layer metadata does not decode: {exc}") from None
    return validate_metadata(doc, footer.meta_offset)


def _int(doc: dict, key: str, lo: int, hi: int) -> int:
    value = doc.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"layer metadata: {key}={value!r} not an integer in [{lo}, {hi}]")
    return value


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def validate_metadata(doc: object, frames_end: int) -> LayerMeta:
    """Turn a decoded metadata document into a LayerMeta, or raise FormatError saying where."""
    if not isinstance(doc, dict):
        raise FormatError("layer metadata: not a map")
    if doc.get("version") != FORMAT_VERSION:
        raise FormatError(f"layer metadata: version {doc.get('version')!r}, expected {FORMAT_VERSION}")
    block_size = _int(doc, "block_size", 512, 65536)
    if not _power_of_two(block_size):
        raise FormatError(f"layer metadata: block_size {block_size} is not a power of two")
    virtual_size = _int(doc, "virtual_size", block_size, MAX_VIRTUAL_SIZE)
    if virtual_size % block_size:
        raise FormatError(f"layer metadata: virtual_size {virtual_size} not a multiple of block_size {block_size}")
    chunk_size = _int(doc, "chunk_size", block_size, MAX_CHUNK_SIZE)
    if not _power_of_two(chunk_size):
        raise FormatError(f"layer metadata: chunk_size {chunk_size} is not a power of two")
    blobs = doc.get("blobs")
    if not isinstance(blobs, list) or not blobs or blobs[0] != SELF_BLOB or len(blobs) > 4096:
        raise FormatError("layer metadata: blobs must be a list starting with the self entry ''")
    for i, name in enumerate(blobs[1:], 1):
        if not isinstance(name, str) or not _BLOB_DIGEST.match(name):
            raise FormatError(f"layer metadata: blobs[{i}]={name!r} is not a sha256 digest")
    nblocks = virtual_size // block_size
    raw_chunks, raw_extents = doc.get("chunks"), doc.get("extents")
    if not isinstance(raw_chunks, list) or not isinstance(raw_extents, list):
        raise FormatError("layer metadata: chunks and extents must be lists")
    if len(raw_extents) > nblocks or len(raw_chunks) > nblocks:
        raise FormatError("layer metadata: more chunks or extents than blocks")
    chunks = []
    for i, c in enumerate(raw_chunks):
        if not (isinstance(c, list) and len(c) == 6 and isinstance(c[0], bytes) and len(c[0]) == 32
                and all(type(x) is int for x in c[1:])):
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
        if ref.offset < 0 or (ref.blob == 0 and ref.offset + ref.compressed_length > frames_end):
            raise FormatError(f"layer metadata: chunks[{i}] frame at {ref.offset}+{ref.compressed_length} past the frames")
        chunks.append(ref)
    extents = []
    prev_end = 0
    for i, e in enumerate(raw_extents):
        if not (isinstance(e, list) and len(e) == 4 and all(type(x) is int for x in e)):
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
