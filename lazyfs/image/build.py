"""Writing layer blobs: from raw files (create) and from writable layers (commit).

The CPU work (blake3 + zstd per chunk) runs on a small thread pool while this
thread writes frames in order; both libraries release the GIL.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lazyfs.device.writable import DATA, ZERO, WritableLayer
from lazyfs.errors import FormatError
from lazyfs.format.builder import BlobBuilder, BuildStats, split_window
from lazyfs.format.chunk import encode_chunk
from lazyfs.format.layer import BLOCK_SIZE, DEFAULT_CHUNK_SIZE, ChunkLocation, LayerMeta, parse_tail, tail_digest
from lazyfs.format.oci import LayerDescriptor
from lazyfs.image.layout import OciLayout

# (start block, bytes of whole blocks inside one chunk-aligned window | None = zeroed, block count)
Piece = tuple[int, bytes | None, int]


@dataclass(frozen=True, slots=True)
class BuiltLayer:
    descriptor: LayerDescriptor
    meta: LayerMeta
    stats: BuildStats


def known_chunks(layers: Sequence[tuple[LayerMeta, str]]) -> dict[bytes, ChunkLocation]:
    """Digest -> location of every chunk stored in *layers* (for dedup in a new layer)."""
    known: dict[bytes, ChunkLocation] = {}
    for meta, digest in layers:
        for loc in meta.locations(digest):
            known.setdefault(loc.digest, loc)
    return known


def _items(pieces: Iterable[Piece], mask_zeros: bool) -> Iterator[tuple[int, bytes | None, int]]:
    """Chunks ``(start, raw, n)`` and zeroed runs ``(start, None, n)`` in ascending order."""
    for start, data, count in pieces:
        if data is None:
            yield start, None, count
            continue
        cursor = start
        for chunk_start, raw in split_window(start, data):
            if mask_zeros and chunk_start > cursor:
                yield cursor, None, chunk_start - cursor
            yield chunk_start, raw, len(raw) // BLOCK_SIZE
            cursor = chunk_start + len(raw) // BLOCK_SIZE
        if mask_zeros and cursor < start + count:
            yield cursor, None, start + count - cursor


def write_layer(
    layout: OciLayout,
    pieces: Iterable[Piece],
    virtual_size: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    known: Mapping[bytes, ChunkLocation] | None = None,
    mask_zeros: bool = False,
    workers: int = 2,
) -> BuiltLayer:
    """Write one layer blob into *layout*.

    *mask_zeros*: all-zero blocks inside data pieces become zeroed extents
    (hiding lower layers, as a commit needs) instead of plain holes.
    """
    builder = BlobBuilder(virtual_size, chunk_size, known)
    sha = hashlib.sha256()
    tmp = layout.new_blob_file()
    try:
        with tmp, ThreadPoolExecutor(workers) as pool:
            pending: collections.deque = collections.deque()

            def emit() -> None:
                start, fut, count = pending.popleft()
                if fut is None:
                    builder.add_zeroed(start, count)
                    return
                digest, stored, compression = fut.result()
                out = builder.add_chunk(start, digest, stored, compression, count * BLOCK_SIZE)
                if out:
                    tmp.write(out)
                    sha.update(out)

            for start, raw, count in _items(pieces, mask_zeros):
                pending.append((start, None if raw is None else pool.submit(encode_chunk, raw), count))
                while len(pending) > 4 * workers:
                    emit()
            while pending:
                emit()
            tail = builder.finish()
            tmp.write(tail)
            sha.update(tail)
            tmp.flush()
            os.fsync(tmp.fileno())
        digest = "sha256:" + sha.hexdigest()
        layout.adopt_blob(tmp.name, digest)
    except BaseException:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
        raise
    size = builder.offset + len(tail)
    footer, meta = parse_tail(tail, size)  # the reader's check, applied to what we wrote
    descriptor = LayerDescriptor(digest, size, footer.meta_offset, len(tail), tail_digest(tail))
    return BuiltLayer(descriptor, meta, builder.stats)


def _data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(offset, end)`` of the regions of a (maybe sparse) file that hold data."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def file_pieces(path: str, chunk_size: int) -> tuple[int, Iterator[Piece]]:
    """The virtual size (file size rounded up to blocks) and chunk-aligned windows of data."""
    size = os.path.getsize(path)
    virtual_size = -(-size // BLOCK_SIZE) * BLOCK_SIZE
    if virtual_size == 0:
        raise FormatError(f"{path} is empty")

    def gen() -> Iterator[Piece]:
        with open(path, "rb") as f:
            fd = f.fileno()
            next_window = 0
            for start, end in _data_regions(fd, size):
                window = max(start - start % chunk_size, next_window)
                while window < end:
                    length = min(chunk_size, virtual_size - window)
                    data = os.pread(fd, length, window)
                    data += bytes(length - len(data))  # pad the last partial block
                    yield window // BLOCK_SIZE, data, length // BLOCK_SIZE
                    window += length
                next_window = window

    return virtual_size, gen()


def writable_pieces(layer: WritableLayer, chunk_size: int) -> Iterator[Piece]:
    """A writable layer's DATA runs cut at chunk windows, and its ZERO runs."""
    per_window = chunk_size // layer.block_size
    for start, count, state in layer.runs():
        if state == ZERO:
            yield start, None, count
            continue
        assert state == DATA
        block, end = start, start + count
        while block < end:
            stop = min(end, (block // per_window + 1) * per_window)
            yield block, layer.read_blocks(block, stop - block), stop - block
            block = stop


def layer_from_file(layout: OciLayout, path: str, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    known: Mapping[bytes, ChunkLocation] | None = None) -> BuiltLayer:
    """A base layer holding a raw disk file (zero blocks become holes)."""
    virtual_size, pieces = file_pieces(path, chunk_size)
    return write_layer(layout, pieces, virtual_size, chunk_size, known)


def layer_from_writable(layout: OciLayout, layer: WritableLayer, lower: Sequence[tuple[LayerMeta, str]],
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> BuiltLayer:
    """Commit: a writable layer becomes a read-only layer, deduplicated against *lower*."""
    return write_layer(layout, writable_pieces(layer, chunk_size), layer.size, chunk_size,
                       known_chunks(lower), mask_zeros=True)
