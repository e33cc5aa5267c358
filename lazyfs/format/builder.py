"""Sans-IO layer blob builder and the chunking rule.

Feed pieces in ascending virtual order; append every byte string the builder
returns to the blob, then append ``finish()``. Pure: no files, no threads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from lazyfs.errors import FormatError
from lazyfs.format.chunk import MAX_CHUNK_SIZE
from lazyfs.format.layer import (
    BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    MAX_VIRTUAL_SIZE,
    SELF_BLOB,
    ZEROED,
    ChunkLocation,
    ChunkRef,
    Extent,
    LayerMeta,
    encode_footer,
    encode_metadata,
)

_ZERO_BLOCK = bytes(BLOCK_SIZE)


def split_window(start_block: int, data: bytes, block_size: int = BLOCK_SIZE) -> Iterator[tuple[int, bytes]]:
    """Cut *data* (virtual blocks from *start_block*) into chunks: maximal runs of non-zero blocks.

    Callers pass at most one chunk-size-aligned window at a time, so every
    chunk stays within ``chunk_size`` and chunk boundaries stay aligned (which
    keeps identical data in identical places deduplicated across images).
    """
    zero = _ZERO_BLOCK if block_size == BLOCK_SIZE else bytes(block_size)
    n = len(data) // block_size
    run_start = None
    for i in range(n):
        is_zero = data[i * block_size : (i + 1) * block_size] == zero
        if is_zero:
            if run_start is not None:
                yield start_block + run_start, data[run_start * block_size : i * block_size]
                run_start = None
        elif run_start is None:
            run_start = i
    if run_start is not None:
        yield start_block + run_start, data[run_start * block_size : n * block_size]


@dataclass(slots=True)
class BuildStats:
    chunks_stored: int = 0
    chunks_deduplicated: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    zeroed_blocks: int = 0


class BlobBuilder:
    """Assemble one layer blob: frames, then metadata and footer.

    *known* maps chunk digests already stored elsewhere (lower layers, a chunk
    dictionary) to their location; such chunks are referenced, never stored again.
    """

    def __init__(
        self,
        virtual_size: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        known: Mapping[bytes, ChunkLocation] | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if virtual_size <= 0 or virtual_size % block_size or virtual_size > MAX_VIRTUAL_SIZE:
            raise FormatError(f"virtual size {virtual_size} must be a positive multiple of {block_size}")
        if chunk_size < block_size or chunk_size > MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
            raise FormatError(f"chunk size {chunk_size} must be a power of two in [{block_size}, {MAX_CHUNK_SIZE}]")
        self.virtual_size, self.chunk_size, self.block_size = virtual_size, chunk_size, block_size
        self.offset = 0  # bytes of frames emitted so far
        self.stats = BuildStats()
        self._known = known or {}
        self._blobs: list[str] = [SELF_BLOB]
        self._blob_index: dict[str, int] = {}
        self._chunks: list[ChunkRef] = []
        self._chunk_index: dict[bytes, int] = {}
        self._extents: list[Extent] = []
        self._next_block = 0
        self._finished = False

    def _place(self, start_block: int, count: int) -> None:
        if self._finished:
            raise FormatError("blob builder already finished")
        if start_block < self._next_block:
            raise FormatError(f"piece at block {start_block} out of order (next free block {self._next_block})")
        if count <= 0 or (start_block + count) * self.block_size > self.virtual_size:
            raise FormatError(f"piece at block {start_block}+{count} outside the virtual size {self.virtual_size}")
        self._next_block = start_block + count

    def add_chunk(self, start_block: int, digest: bytes, stored: bytes, compression: int, raw_length: int) -> bytes:
        """Map blocks from *start_block* to an encoded chunk; return the bytes to append (maybe none)."""
        if raw_length % self.block_size or not 0 < raw_length <= self.chunk_size:
            raise FormatError(f"chunk of {raw_length} bytes is not whole blocks within the chunk size")
        self._place(start_block, raw_length // self.block_size)
        self.stats.raw_bytes += raw_length
        out = b""
        index = self._chunk_index.get(digest)
        if index is None:
            loc = self._known.get(digest)
            if loc is not None and loc.raw_length == raw_length:
                blob = self._blob_index.get(loc.blob)
                if blob is None:
                    blob = self._blob_index[loc.blob] = len(self._blobs)
                    self._blobs.append(loc.blob)
                ref = ChunkRef(digest, blob, loc.offset, loc.compressed_length, loc.raw_length, loc.compression)
                self.stats.chunks_deduplicated += 1
            else:
                ref = ChunkRef(digest, 0, self.offset, len(stored), raw_length, compression)
                self.offset += len(stored)
                self.stats.chunks_stored += 1
                self.stats.stored_bytes += len(stored)
                out = stored
            index = self._chunk_index[digest] = len(self._chunks)
            self._chunks.append(ref)
        else:
            self.stats.chunks_deduplicated += 1
        self._extents.append(Extent(start_block, raw_length // self.block_size, index, 0))
        return out

    def add_zeroed(self, start_block: int, count: int) -> None:
        """Make blocks read as zeros over whatever lower layers hold."""
        self._place(start_block, count)
        self.stats.zeroed_blocks += count
        last = self._extents[-1] if self._extents else None
        if last is not None and last.chunk == ZEROED and last.end == start_block:
            self._extents[-1] = Extent(last.start, last.count + count, ZEROED, 0)
        else:
            self._extents.append(Extent(start_block, count, ZEROED, 0))

    def meta(self) -> LayerMeta:
        return LayerMeta(self.virtual_size, self.block_size, self.chunk_size, tuple(self._blobs),
                         tuple(self._chunks), tuple(self._extents))

    def finish(self) -> bytes:
        """Metadata and footer: the last bytes of the blob."""
        self._finished = True
        metadata = encode_metadata(self.meta())
        return metadata + encode_footer(self.offset, metadata)
