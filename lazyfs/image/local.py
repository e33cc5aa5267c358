"""Image operations on OCI layout directories: create, commit, info, verify, flatten."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict

import trio

from lazyfs.device.index import MergedIndex
from lazyfs.device.writable import create_writable, open_writable, writable_base
from lazyfs.durable import pwrite_all, replace_durably
from lazyfs.errors import ConfigError, IntegrityError, LazyfsError, NotFoundError
from lazyfs.fetch.direct import DirectChunkSource
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.format.chunk import decode_chunk
from lazyfs.format.layer import BLOCK_SIZE, DEFAULT_CHUNK_SIZE, SELF_BLOB, ZEROED
from lazyfs.format.oci import MEDIA_TYPE_CONFIG, LayerDescriptor, build_config, build_manifest, parse_manifest
from lazyfs.image.build import BuiltLayer, layer_from_file, layer_from_writable
from lazyfs.image.image import Image, ImageLimits, load_image
from lazyfs.image.layout import OciLayout
from lazyfs.image.ref import LocalRef

MKFS_OPTIONS = ["-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
COPY_WINDOW = 4 << 20


async def open_local(ref: LocalRef, limits: ImageLimits = ImageLimits()) -> tuple[Image, OciLayout]:
    """An image of a layout whose blobs are all there, every layer checked against its meta-digest."""
    layout = OciLayout(ref.path)
    data, _ = layout.read_manifest(ref.tag)
    manifest = parse_manifest(data, limits.max_virtual_size)
    return await load_image(manifest, [DirectoryBackend(layout.path)], name=str(ref), limits=limits), layout


def write_image(layout: OciLayout, tag: str, layers: list[LayerDescriptor], virtual_size: int,
                base_config: dict | None = None) -> str:
    """Store config + manifest for *layers* (blobs already in *layout*) under *tag*; return its digest."""
    config = layout.put_bytes(build_config([layer.digest for layer in layers], base_config), MEDIA_TYPE_CONFIG)
    return layout.put_manifest(build_manifest(config, layers, virtual_size), tag).digest


def copy_blobs(src: OciLayout, dst: OciLayout, digests: list[str]) -> None:
    for digest in digests:
        if src.path == dst.path or dst.has_blob(digest):
            continue
        try:
            os.link(src.blob_path(digest), dst.blob_path(digest))
        except OSError:
            shutil.copyfile(src.blob_path(digest), dst.blob_path(digest))


def _tree_size(root: str) -> int:
    """A generous ext4 size for the tree under *root*."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += 4096 * (1 + len(dirnames))
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += max(st.st_blocks * 512, st.st_size if st.st_blocks else 0) + 512
    size = int(total * 1.3) + (64 << 20)
    return -(-size // (1 << 20)) * (1 << 20)


def mkfs_from_dir(directory: str, out: str, size: int | None = None) -> int:
    """Make an ext4 image of *directory* (owners, modes, links, xattrs kept) at *out*."""
    if not os.path.isdir(directory):
        raise NotFoundError(f"{directory} is not a directory")
    size = size or _tree_size(directory)
    with open(out, "wb") as f:
        f.truncate(size)
    proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", *MKFS_OPTIONS, "-d", directory, out],
                          capture_output=True, text=True)
    if proc.returncode:
        raise LazyfsError(f"mkfs.ext4 -d {directory} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return size


def _summary(built: BuiltLayer, manifest_digest: str) -> dict:
    return {"manifest": manifest_digest, "layer": built.descriptor.digest, "layer_size": built.descriptor.size,
            "virtual_size": built.meta.virtual_size, **asdict(built.stats)}


async def create_image(out: LocalRef, *, size: int | None = None, from_file: str | None = None,
                       from_dir: str | None = None, base: LocalRef | None = None,
                       chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict:
    """A new image in *out*: empty of *size*, or holding a raw file or a directory tree.

    With *base*, the new layer holds only the blocks where the content differs
    from *base*, stacked on top of base's layers.
    """
    if sum(x is not None for x in (from_file, from_dir)) > 1:
        raise ConfigError("give at most one of --from-file and --from-dir")
    if size is not None and (size <= 0 or size % BLOCK_SIZE):
        raise ConfigError(f"--size {size} must be a positive multiple of {BLOCK_SIZE}")
    if from_file is None and from_dir is None and size is None:
        raise ConfigError("give --size, --from-file or --from-dir")
    layout = OciLayout(out.path).ensure()
    with tempfile.TemporaryDirectory(prefix="lazyfs-create-") as tmp:
        raw = from_file
        if from_dir is not None:
            raw = os.path.join(tmp, "disk.ext4")
            await trio.to_thread.run_sync(mkfs_from_dir, from_dir, raw, size)
        elif raw is None:
            raw = os.path.join(tmp, "empty.img")
            with open(raw, "wb") as f:
                f.truncate(size)
        elif not os.path.isfile(raw):
            raise NotFoundError(f"{raw}: no such file")
        if base is None:
            built = await trio.to_thread.run_sync(layer_from_file, layout, raw, chunk_size)
            return _summary(built, write_image(layout, out.tag, [built.descriptor], built.meta.virtual_size))
        return await _diff_over_base(layout, out, raw, base, chunk_size, tmp)


async def _diff_over_base(layout: OciLayout, out: LocalRef, raw: str, base: LocalRef, chunk_size: int, tmp: str) -> dict:
    image, base_layout = await open_local(base)
    size = os.path.getsize(raw)
    if size != image.virtual_size:
        raise ConfigError(f"{raw} is {size} bytes but base image {base} is {image.virtual_size}")
    layer = create_writable(os.path.join(tmp, "diff"), "log", size)
    store = DirectChunkSource(DirectoryBackend(base_layout.path))
    device = image.device(store)
    try:
        with open(raw, "rb") as f:
            for offset in range(0, size, COPY_WINDOW):
                new = await trio.to_thread.run_sync(os.pread, f.fileno(), COPY_WINDOW, offset)
                old = await device.read(offset, COPY_WINDOW)
                if new == old:
                    continue
                for b in range(0, len(new), BLOCK_SIZE):
                    if new[b : b + BLOCK_SIZE] != old[b : b + BLOCK_SIZE]:
                        layer.write_blocks((offset + b) // BLOCK_SIZE, new[b : b + BLOCK_SIZE])
        built = await trio.to_thread.run_sync(layer_from_writable, layout, layer, image.layers, chunk_size)
    finally:
        layer.close()
    copy_blobs(base_layout, layout, [d for _, d in image.layers] + [loc.blob for loc in _referenced(built)])
    layers = list(image.manifest.layers) + [built.descriptor]
    return _summary(built, write_image(layout, out.tag, layers, size))


def _referenced(built: BuiltLayer):
    return [loc for loc in built.meta.locations(built.descriptor.digest) if loc.blob != built.descriptor.digest]


async def commit_image(base: LocalRef, writable_dir: str, out: LocalRef, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict:
    """Turn the writable layer in *writable_dir* (over *base*) into a new image *out*."""
    image, base_layout = await open_local(base)
    recorded = writable_base(writable_dir)
    if recorded is not None and recorded != image.manifest.digest:
        raise ConfigError(f"writable layer {writable_dir} was created over {recorded}, not {base} ({image.manifest.digest})")
    layer = open_writable(writable_dir)
    try:
        if layer.size != image.virtual_size:
            raise ConfigError(f"writable layer is {layer.size} bytes, image {base} is {image.virtual_size}")
        layout = OciLayout(out.path).ensure()
        built = await trio.to_thread.run_sync(layer_from_writable, layout, layer, image.layers, chunk_size)
    finally:
        layer.close()
    copy_blobs(base_layout, layout, [d for _, d in image.layers])
    layers = list(image.manifest.layers) + [built.descriptor]
    return _summary(built, write_image(layout, out.tag, layers, image.virtual_size))


async def image_info(ref: LocalRef) -> dict:
    """Layers, sizes, chunks, holes and the dedup ratio of an image."""
    image, _ = await open_local(ref)
    layers, stored_total, referenced_total = [], 0, 0
    for (meta, digest), desc in zip(image.layers, image.manifest.layers, strict=True):
        own = [c for c in meta.chunks if meta.blobs[c.blob] == SELF_BLOB]
        data_blocks = sum(e.count for e in meta.extents if e.chunk != ZEROED)
        zeroed = sum(e.count for e in meta.extents if e.chunk == ZEROED)
        stored = sum(c.compressed_length for c in own)
        stored_total += stored
        referenced_total += data_blocks * meta.block_size
        layers.append({
            "digest": digest, "blob_size": desc.size, "virtual_size": meta.virtual_size,
            "chunk_size": meta.chunk_size, "chunks": len(meta.chunks), "chunks_stored": len(own),
            "chunks_referenced_below": len(meta.chunks) - len(own), "extents": len(meta.extents),
            "data_bytes": data_blocks * meta.block_size, "stored_bytes": stored,
            "raw_bytes_stored": sum(c.raw_length for c in own),
            "zeroed_bytes": zeroed * meta.block_size,
            "hole_bytes": meta.virtual_size - (data_blocks + zeroed) * meta.block_size,
        })
    index = MergedIndex(image.layers, image.virtual_size // BLOCK_SIZE)
    merged_data = sum(s.end - s.start for s in index.segments) * BLOCK_SIZE
    return {
        "image": str(ref), "manifest": image.manifest.digest, "virtual_size": image.virtual_size,
        "layers": layers, "stored_bytes": stored_total, "data_bytes": merged_data,
        "dedup_ratio": round(referenced_total / stored_total, 3) if stored_total else None,
    }


async def verify_image(ref: LocalRef) -> list[str]:
    """Check the config's and every blob's sha256 and every chunk's blake3; return the problems found.

    Opening the image already checked each layer's metadata against its meta-digest.
    """
    image, layout = await open_local(ref)
    backend = DirectoryBackend(layout.path)
    problems: list[str] = []
    checked: set[bytes] = set()
    try:
        await trio.to_thread.run_sync(layout.verify_blob_file, image.manifest.config.digest)
    except (IntegrityError, OSError) as exc:
        problems.append(f"config blob {image.manifest.config.digest}: {exc}")
    for meta, digest in image.layers:
        try:
            await trio.to_thread.run_sync(layout.verify_blob_file, digest)
        except (IntegrityError, OSError) as exc:
            problems.append(f"layer blob {digest}: {exc}")
        for loc in meta.locations(digest):
            if loc.digest in checked:
                continue
            checked.add(loc.digest)
            try:
                stored = await backend.read_range(loc.blob, loc.offset, loc.compressed_length)
                await trio.to_thread.run_sync(decode_chunk, loc.digest, stored, loc.compression, loc.raw_length,
                                              f"{loc.blob}@{loc.offset}")
            except LazyfsError as exc:
                problems.append(f"chunk {loc.digest.hex()} in {loc.blob} at {loc.offset}: {exc}")
    return problems


async def flatten_image(ref: LocalRef, out: str) -> int:
    """Write the merged device to the raw file *out* (sparse where the image has holes)."""
    image, layout = await open_local(ref)
    device = image.device(DirectChunkSource(DirectoryBackend(layout.path)))
    tmp = f"{out}.partial"
    with open(tmp, "wb") as f:
        f.truncate(image.virtual_size)
        zero = bytes(COPY_WINDOW)
        for offset in range(0, image.virtual_size, COPY_WINDOW):
            data = await device.read(offset, COPY_WINDOW)
            if data != zero[: len(data)]:
                await trio.to_thread.run_sync(pwrite_all, f.fileno(), data, offset)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, out)
    return image.virtual_size


async def new_writable(ref: LocalRef, directory: str, kind: str = "sparse") -> str:
    """Create an empty writable layer over image *ref* in *directory*."""
    image, _ = await open_local(ref)
    create_writable(directory, kind, image.virtual_size, base=image.manifest.digest).close()
    return directory

