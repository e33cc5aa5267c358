"""Forged and hostile layer blobs, for the trust and bounds tests.

* ``raw_zstd_frame``: a zstd frame of raw blocks, of exactly the length wanted
  (a frame declaring any content size, the 8 GiB bomb included, is a header);
* ``metadata_of_length``: a metadata section (msgpack in one zstd frame) padded
  to an exact length, so a forged tail can replace a true one byte for byte;
* ``forge_blob``: a blob the size of a true one whose tail is self-consistent
  (footer digest recomputed) and names forged chunks stored in its frames;
* ``hostile_blob`` / ``push_lazyfs_image``: blobs with any metadata bytes, in
  images whose manifests anchor them (meta-digest right), pushed to a registry.
"""

from __future__ import annotations

import struct

import msgpack

from lazyfs.format.builder import BlobBuilder, split_window
from lazyfs.format.chunk import encode_chunk
from lazyfs.format.digest import sha256_digest
from lazyfs.format.layer import BLOCK_SIZE, FOOTER_SIZE, encode_footer, tail_digest
from lazyfs.format.oci import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    LayerDescriptor,
    build_config,
    build_manifest,
)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
RAW_BLOCK = 128 << 10  # the largest zstd block


def raw_zstd_frame(content: bytes, declared: int | None = None) -> bytes:
    """*content* as one zstd frame of raw blocks, declaring *declared* (default: its length) bytes."""
    out = bytearray(ZSTD_MAGIC + bytes([0xE0]) + struct.pack("<Q", len(content) if declared is None else declared))
    pieces = [content[i : i + RAW_BLOCK] for i in range(0, len(content), RAW_BLOCK)] or [b""]
    for n, piece in enumerate(pieces):
        last = n == len(pieces) - 1
        out += (len(piece) << 3 | int(last)).to_bytes(3, "little") + piece
    return bytes(out)


def frame_length(raw_length: int) -> int:
    return 13 + 3 * max(1, -(-raw_length // RAW_BLOCK)) + raw_length


def metadata_of_length(doc: dict, length: int) -> bytes:
    """*doc* packed and framed as exactly *length* bytes (an ignored ``pad`` key takes up the rest)."""
    for blocks in range(1, length // RAW_BLOCK + 2):
        raw_length = length - 13 - 3 * blocks
        if raw_length < 0 or max(1, -(-raw_length // RAW_BLOCK)) != blocks:
            continue
        base = len(msgpack.packb(doc, use_bin_type=True))
        for header in (2, 3, 5):
            pad = raw_length - base - 4 - header  # fixstr "pad" + bin header + bytes
            if pad >= 0 and len(msgpack.packb(bytes(pad), use_bin_type=True)) == pad + header:
                raw = msgpack.packb({**doc, "pad": bytes(pad)}, use_bin_type=True)
                assert len(raw) == raw_length
                frame = raw_zstd_frame(raw)
                assert len(frame) == length
                return frame
    raise ValueError(f"cannot pad the metadata to {length} bytes")


def forge_blob(blob_size: int, meta_offset: int, virtual_size: int, chunk_size: int,
               forged_disk: bytes) -> tuple[bytes, set[bytes]]:
    """A blob of *blob_size* bytes with its tail at *meta_offset*, like the true one, describing *forged_disk*.

    Its footer carries the blake3 of its own metadata (self-consistent), its
    chunk table names the forged chunks, and their frames are in the blob: a
    reader that trusted the footer would verify every forged chunk. Returns the
    blob and the digests of the forged chunks.
    """
    builder = BlobBuilder(virtual_size, chunk_size)
    frames = bytearray()
    for window in range(0, min(len(forged_disk), virtual_size), chunk_size):
        for start, raw in split_window(window // BLOCK_SIZE, forged_disk[window : window + chunk_size]):
            digest, stored, compression = encode_chunk(raw)
            frames += builder.add_chunk(start, digest, stored, compression, len(raw))
    meta = builder.meta()
    if len(frames) > meta_offset:
        raise ValueError(f"forged frames ({len(frames)} bytes) do not fit before {meta_offset}")
    doc = {"version": 2, "virtual_size": meta.virtual_size, "block_size": meta.block_size,
           "chunk_size": meta.chunk_size, "blobs": list(meta.blobs),
           "chunks": [[c.digest, c.blob, c.offset, c.compressed_length, c.raw_length, c.compression]
                      for c in meta.chunks],
           "extents": [[e.start, e.count, e.chunk, e.chunk_offset] for e in meta.extents]}
    metadata = metadata_of_length(doc, blob_size - meta_offset - FOOTER_SIZE)
    blob = bytes(frames) + bytes(meta_offset - len(frames)) + metadata + encode_footer(meta_offset, metadata)
    assert len(blob) == blob_size
    return blob, {c.digest for c in meta.chunks}


def hostile_blob(metadata: bytes, frames: bytes = b"") -> tuple[bytes, LayerDescriptor]:
    """A blob ``frames | metadata | footer`` and a descriptor that anchors it (meta-digest right)."""
    tail = metadata + encode_footer(len(frames), metadata)
    blob = frames + tail
    return blob, LayerDescriptor(sha256_digest(blob), len(blob), len(frames), len(tail), tail_digest(tail))


def lazyfs_manifest(layers: list[LayerDescriptor], virtual_size: int) -> tuple[bytes, bytes]:
    """``(config, manifest)`` of an image made of *layers*."""
    config = build_config([layer.digest for layer in layers])
    manifest = build_manifest(Descriptor(MEDIA_TYPE_CONFIG, sha256_digest(config), len(config)), layers, virtual_size)
    return config, manifest


async def push_lazyfs_image(client, ref, blobs: list[bytes], layers: list[LayerDescriptor], virtual_size: int,
                            manifest: bytes | None = None) -> str:
    """Push *blobs*, a config and a manifest (given, or made of *layers*) to *ref*; the manifest digest."""
    config, made = lazyfs_manifest(layers, virtual_size)
    for blob in {sha256_digest(b): b for b in blobs}.values():
        await client.push_blob(ref.repo(), blob)
    await client.push_blob(ref.repo(), config)
    return await client.put_manifest(ref, manifest if manifest is not None else made, MEDIA_TYPE_MANIFEST)
