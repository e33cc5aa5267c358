"""`lazyfs verify REF`: fetch every byte of a registry image and check it against the chain of digests.

The chain (docs/format.md, "Trust"): the reference's digest (or, for a tag,
the digest the registry gives: trust on first use) -> the manifest -> the
config's sha256 and each layer's meta-digest -> the layer's chunk table ->
each chunk's blake3. Each layer blob is also read whole and checked against
its own sha256, so nothing the manifest names is left unchecked. The first
object that fails is the error raised; the summary says what was checked.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import trio

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.registry import RegistryBackend
from lazyfs.format.chunk import decode_chunk
from lazyfs.format.layer import ChunkLocation, LayerMeta
from lazyfs.format.oci import MEDIA_TYPE_MANIFEST, parse_json, parse_manifest
from lazyfs.format.reference import parse_reference
from lazyfs.image.convert import ConvertProgress
from lazyfs.image.image import layer_name, load_image
from lazyfs.image.remote import MAX_CONFIG_SIZE, ImageOpener

WINDOW = 8 << 20  # bytes of a blob read at once


@dataclass(slots=True)
class _Checked:
    blobs: int = 0
    bytes: int = 0
    chunks: int = 0
    raw_bytes: int = 0
    seen: set[bytes] = field(default_factory=set)


async def verify_remote(opener: ImageOpener, text: str, progress: ConvertProgress | None = None) -> dict:
    """Check the registry image *text* end to end; raise the error of the first bad object."""
    started = time.monotonic()
    progress = progress or ConvertProgress()
    client = opener.client
    ref = parse_reference(text)
    data, _, digest = await client.get_manifest(ref, accept=(MEDIA_TYPE_MANIFEST,))
    anchor = "the reference's digest" if ref.digest else "the digest the registry gave for the tag (trust on first use)"
    manifest = parse_manifest(data, opener.limits.max_virtual_size)
    repo = ref.repo()
    config = await client.get_blob(repo, manifest.config.digest, max_size=MAX_CONFIG_SIZE)  # sha256 checked
    doc = parse_json(config, f"config {manifest.config.digest[:19]} of {text}", MAX_CONFIG_SIZE)
    if len(config) != manifest.config.size:
        raise FormatError(f"config {manifest.config.digest} of {text}: {len(config)} bytes, the manifest says "
                          f"{manifest.config.size}")
    diff_ids = (doc.get("rootfs") or {}).get("diff_ids") if isinstance(doc.get("rootfs"), dict) else None
    if diff_ids != [layer.digest for layer in manifest.layers]:
        raise FormatError(f"config {manifest.config.digest} of {text}: rootfs.diff_ids do not name the "
                          f"manifest's layers")
    backend = RegistryBackend(client, repo)
    image = await load_image(manifest, [backend], name=text, limits=opener.limits)
    progress.add_total("verify", sum(layer.size for layer in manifest.layers))
    checked = _Checked(blobs=2)  # manifest and config
    for i, ((meta, blob), layer) in enumerate(zip(image.layers, manifest.layers, strict=True)):
        await _verify_layer_blob(backend, layer_name(i, layer, text), blob, layer.size, meta, checked, progress)
    # Chunks a layer takes from a blob outside the image (a chunk dictionary): each read where it lives.
    for meta, blob in image.layers:
        for loc in meta.locations(blob):
            if loc.digest not in checked.seen:
                stored = await backend.read_range(loc.blob, loc.offset, loc.compressed_length)
                await _decode(loc, stored, f"{loc.blob}@{loc.offset}", checked)
    return {"image": text, "manifest": digest, "anchor": anchor, "config": manifest.config.digest,
            "layers": len(manifest.layers), "blobs_checked": checked.blobs, "bytes_checked": checked.bytes,
            "chunks_checked": checked.chunks, "raw_bytes_checked": checked.raw_bytes,
            "seconds": round(time.monotonic() - started, 3)}


async def _decode(loc: ChunkLocation, stored: bytes | memoryview, source: str, checked: _Checked) -> None:
    await trio.to_thread.run_sync(decode_chunk, loc.digest, stored, loc.compression, loc.raw_length, source)
    checked.seen.add(loc.digest)
    checked.chunks += 1
    checked.raw_bytes += loc.raw_length


async def _verify_layer_blob(backend: Backend, what: str, blob: str, size: int, meta: LayerMeta, checked: _Checked,
                             progress: ConvertProgress) -> None:
    """Read *blob* whole in windows: its sha256, and every chunk frame it holds (blake3)."""
    frames = sorted((loc for loc in meta.locations(blob) if loc.blob == blob), key=lambda loc: loc.offset)
    sha = hashlib.sha256()
    buffer, base, offset, next_frame = bytearray(), 0, 0, 0
    while offset < size:
        length = min(WINDOW, size - offset)
        window = await backend.read_range(blob, offset, length)
        sha.update(window)
        buffer += window
        offset += length
        progress.advance("verify", length)
        while next_frame < len(frames) and frames[next_frame].end <= offset:
            loc = frames[next_frame]
            next_frame += 1
            if loc.digest not in checked.seen:
                view = memoryview(buffer)[loc.offset - base : loc.end - base]
                try:
                    await _decode(loc, view, f"{what} at {loc.offset}", checked)
                finally:
                    view.release()
        keep_from = frames[next_frame].offset if next_frame < len(frames) else offset
        del buffer[: max(0, min(keep_from, offset) - base)]
        base = min(keep_from, offset)
    got = "sha256:" + sha.hexdigest()
    if got != blob:
        raise IntegrityError(f"blob of {what}", blob, got)
    checked.blobs += 1
    checked.bytes += size
