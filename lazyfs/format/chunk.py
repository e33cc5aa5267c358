"""Chunks: identity (blake3-256 of the raw bytes) and zstd framing.

Pure functions; callers run them in a worker thread for large buffers.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from lazyfs.errors import FormatError, IntegrityError

COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
ZSTD_LEVEL = 3
# A chunk never exceeds this many raw bytes, whatever the metadata says.
MAX_CHUNK_SIZE = 16 << 20

_local = threading.local()  # zstd contexts are not thread-safe; one per thread


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return _local.c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def declared_size(frame: bytes | memoryview, what: str) -> int:
    """The content size a zstd frame declares in its header (FormatError if it declares none).

    Read before decompressing: python-zstandard allocates what a frame declares
    whatever ``max_output_size`` says, so this is the number to bound.
    """
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: not a zstd frame ({exc})") from None
    if size < 0:
        raise FormatError(f"{what}: the zstd frame does not declare its content size")
    return size


def decompress_declared(frame: bytes | memoryview, size: int, what: str) -> bytes:
    """Decompress one zstd frame whose header declared *size* (checked with ``declared_size``).

    The frame must yield exactly *size* bytes and fill *frame* (no trailing bytes).
    """
    try:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        raw = dobj.decompress(frame)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: the zstd frame does not decode ({exc})") from None
    if not dobj.eof or dobj.unused_data or len(raw) != size:
        raise FormatError(f"{what}: the zstd frame is truncated, has trailing bytes or is not {size} bytes")
    return raw


def chunk_digest(raw: bytes) -> bytes:
    """The 32-byte blake3 digest naming a chunk."""
    return blake3.blake3(raw).digest()


def encode_chunk(raw: bytes) -> tuple[bytes, bytes, int]:
    """Return ``(digest, stored_bytes, compression)`` for a raw chunk."""
    digest = chunk_digest(raw)
    packed = _compressor().compress(raw)
    if len(packed) < len(raw):
        return digest, packed, COMPRESSION_ZSTD
    return digest, bytes(raw), COMPRESSION_NONE


def decode_chunk(digest: bytes, stored: bytes, compression: int, raw_length: int, source: str = "") -> bytes:
    """Decompress and verify one chunk; raise IntegrityError/FormatError, never return bad bytes."""
    if raw_length <= 0 or raw_length > MAX_CHUNK_SIZE:
        raise FormatError(f"chunk {digest.hex()[:16]}: absurd raw length {raw_length}")
    if compression == COMPRESSION_ZSTD:
        raw = _decompress_exact(stored, raw_length)
        if raw is None:
            raise IntegrityError(f"chunk {digest.hex()}", digest.hex(), "an undecodable zstd frame", source)
    elif compression == COMPRESSION_NONE:
        raw = bytes(stored)
    else:
        raise FormatError(f"chunk {digest.hex()[:16]}: unknown compression {compression}")
    got = chunk_digest(raw)
    if got != digest or len(raw) != raw_length:
        raise IntegrityError(f"chunk {digest.hex()}", digest.hex(), got.hex(), source)
    return raw


def _decompress_exact(stored: bytes, raw_length: int) -> bytes | None:
    """Decompress one zstd frame that must declare and yield *raw_length* bytes and fill *stored*."""
    try:
        if zstandard.frame_content_size(stored) != raw_length:
            return None
        # One shot into an output of the declared size, with this thread's context (a fresh
        # context and a streaming object per chunk cost ~25 % more in the cold fetch's workers);
        # a truncated frame, a second frame or trailing bytes are refused by zstd itself.
        raw = _decompressor().decompress(stored, max_output_size=raw_length, allow_extra_data=False)
    except (zstandard.ZstdError, MemoryError, ValueError):
        return None
    if len(raw) != raw_length:
        return None
    return raw
