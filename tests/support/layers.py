"""Building layer stacks in memory, for tests of the device and format."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from lazyfs.errors import FetchError, NotFoundError
from lazyfs.fetch.backend import Backend
from lazyfs.format.builder import BlobBuilder, split_window
from lazyfs.format.chunk import encode_chunk
from lazyfs.format.digest import sha256_digest
from lazyfs.format.layer import BLOCK_SIZE, ChunkLocation, LayerMeta, parse_blob


class MemoryBackend(Backend):
    """Blobs held in a dict; counts reads."""

    name = "memory"

    def __init__(self, blobs: Mapping[str, bytes] | None = None) -> None:
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self.reads: list[tuple[str, int, int]] = []

    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        if blob not in self.blobs:
            raise NotFoundError(f"no blob {blob}")
        self.reads.append((blob, offset, length))
        data = self.blobs[blob][offset : offset + length]
        if len(data) != length:
            raise FetchError(f"short read of {blob}: {len(data)} of {length}")
        return data

    async def blob_size(self, blob: str) -> int:
        if blob not in self.blobs:
            raise NotFoundError(f"no blob {blob}")
        return len(self.blobs[blob])


def build_blob(
    virtual_size: int,
    writes: Iterable[tuple[int, bytes]] = (),
    zeroed: Iterable[tuple[int, int]] = (),
    chunk_size: int = 64 * 1024,
    known: Mapping[bytes, ChunkLocation] | None = None,
) -> tuple[bytes, str, LayerMeta]:
    """A layer blob with data at block offsets (*writes*: (block, bytes)) and zeroed ranges.

    Data is cut at chunk windows exactly as real layers are. Returns (blob, digest, meta).
    """
    items: list[tuple[int, bytes | None, int]] = []
    per = chunk_size // BLOCK_SIZE
    for block, data in writes:
        pos = 0
        while pos < len(data):
            cur = block + pos // BLOCK_SIZE
            n = min(len(data) - pos, ((cur // per + 1) * per - cur) * BLOCK_SIZE)
            items.extend((s, raw, len(raw) // BLOCK_SIZE) for s, raw in split_window(cur, data[pos : pos + n]))
            pos += n
    items.extend((start, None, count) for start, count in zeroed)
    items.sort(key=lambda item: item[0])
    builder = BlobBuilder(virtual_size, chunk_size, known)
    out = bytearray()
    for start, raw, count in items:
        if raw is None:
            builder.add_zeroed(start, count)
        else:
            digest, stored, compression = encode_chunk(raw)
            out += builder.add_chunk(start, digest, stored, compression, len(raw))
    out += builder.finish()
    blob = bytes(out)
    _, meta = parse_blob(blob)
    return blob, sha256_digest(blob), meta


def write_frames_blob(root, raws: Iterable[bytes], trailer: bytes = b"") -> tuple[str, list[ChunkLocation]]:
    """An OCI-layout blob file (``root/blobs/sha256/…``) of concatenated chunk frames plus *trailer*.

    Returns the blob's digest and the location of every frame, in order.
    """
    from pathlib import Path

    frames, metas, offset = [], [], 0
    for raw in raws:
        digest, stored, compression = encode_chunk(raw)
        metas.append((digest, offset, len(stored), len(raw), compression))
        frames.append(stored)
        offset += len(stored)
    data = b"".join(frames) + trailer
    name = sha256_digest(data)
    path = Path(root) / "blobs" / "sha256" / name[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return name, [ChunkLocation(d, name, o, c, r, comp) for d, o, c, r, comp in metas]


STACK_SIZE = 96 * BLOCK_SIZE


def make_stack(seed: int, nlayers: int = 3, chunk_size: int = 16 * 1024):
    """A random stack of layers and the bytearray it must read as."""
    rng = random.Random(seed)
    model = bytearray(STACK_SIZE)
    backend, layers = MemoryBackend(), []
    for li in range(nlayers):
        writes, zeroed, used = [], [], set()
        for _ in range(rng.randint(1, 6)):
            start, count = rng.randrange(96), rng.randint(1, 12)
            span = set(range(start, min(96, start + count)))
            if span & used:
                continue
            used |= span
            if rng.random() < 0.75:
                data = rng.choice([rng.randbytes, lambda n: bytes([li + 1]) * n])(len(span) * BLOCK_SIZE)
                writes.append((start, data))
                model[start * BLOCK_SIZE : (start + len(span)) * BLOCK_SIZE] = data
            else:
                zeroed.append((start, len(span)))
                model[start * BLOCK_SIZE : (start + len(span)) * BLOCK_SIZE] = bytes(len(span) * BLOCK_SIZE)
        blob, digest, meta = build_blob(STACK_SIZE, writes, zeroed, chunk_size=chunk_size)
        backend.blobs[digest] = blob
        layers.append((meta, digest))
    return layers, backend, model
