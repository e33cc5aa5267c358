"""`lazyfs index`: lazy start of an ordinary OCI image without converting it (docs/index.md).

For every source layer, in order, the layer is applied to a working ext4 exactly
as ``lazyfs convert`` applies it (``tarapply``, ``WorkFs``); the blocks that
changed become a lazyfs layer, except the blocks that hold file data, proven
equal to bytes of the layer's uncompressed tar stream (``blockmap``): those are
*mapped* to the tar and not stored. The layer's span map (``format.spanindex``)
says how to read any tar byte from a ranged read of the original blob and
names each ~256 KiB span by its blake3.

The result, an *index*, is an OCI artifact referring to the source manifest
(its ``subject``), listed under the source's referrers: a config, and per
source layer a metadata layer (lazyfs layer format 2, anchored by
``meta-digest``) and its span map. The source image is not touched. The
manifest is recorded in the host's conversion ledger, so this host trusts it
like a twin it converted (``lazyfs.image.trust``). ``lazyfs.image.indexed`` opens
an image through its index.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import trio

from lazyfs.errors import ConfigError, FormatError, NotFoundError
from lazyfs.format.layer import DEFAULT_CHUNK_SIZE, LayerMeta
from lazyfs.format.oci import MANIFEST_MEDIA_TYPES, Descriptor, canonical_json, sha256_digest
from lazyfs.format.ociimage import is_index, media_type_of, parse_platforms
from lazyfs.format.reference import parse_reference
from lazyfs.format.spanindex import MEDIA_TYPE_SPANS, SPAN_SIZE, MappedExtent, build_spans, encode_span_map
from lazyfs.image.blockmap import data_segments, fiemap, file_extents, verified_extents, without_mapped
from lazyfs.image.build import known_chunks, write_layer
from lazyfs.image.convert import DOWNLOAD_CONCURRENCY, ConvertProgress, SourceImage, open_source
from lazyfs.image.indexed import (
    ANN_SOURCE_MANIFEST,
    INDEX_ARTIFACT_TYPE,
    MEDIA_TYPE_INDEX_CONFIG,
    IndexLayer,
    build_index_manifest,
    parse_index_manifest,
)
from lazyfs.image.layout import OciLayout
from lazyfs.image.ref import parse_local_ref
from lazyfs.image.referrers import add_referrer_local, add_referrer_remote
from lazyfs.image.remote import ImageOpener
from lazyfs.image.tarapply import LayerApplier, check_diff_id, scan_layer
from lazyfs.image.trust import conversion_ledger
from lazyfs.image.workfs import WorkFs
from lazyfs.nursery import open_nursery


# ---------------------------------------------------------------- building


@dataclass(slots=True)
class _LayerReport:
    source_digest: str
    codec: str
    access: str
    source_bytes: int
    tar_bytes: int
    spans: int
    windows: int
    mapped_blocks: int
    meta_bytes: int
    span_map_bytes: int
    span_doc_bytes: int  # of span_map_bytes, the document a mount reads (the rest: windows, read when needed)
    seconds: float


def _spool_spans(blob: str, codec: str, size: int, spool: str, span_size: int, limit: int):
    with open(blob, "rb") as f, open(spool, "wb") as out:
        return build_spans(f, codec, size, out.write, span_size=span_size, limit=limit)


def _apply_recording(root: str, spool: str, what: str) -> list[MappedExtent]:
    """Apply the tar at *spool* under *root*; the candidate mapped extents of every regular file it wrote."""
    candidates: list[MappedExtent] = []

    def on_file(fd: int, member) -> None:
        sparse = getattr(member, "sparse", None)
        segments = data_segments(member.offset_data, member.size, sparse)
        if segments:
            candidates.extend(file_extents(fiemap(fd), segments))

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})  # as convert does: ext4's small-file allocator is per CPU
    try:
        with open(spool, "rb") as stream, LayerApplier(root, what) as applier:
            applier.on_file = on_file
            applier.apply_stream(stream)
    finally:
        os.sched_setaffinity(0, before)
    return candidates


class Indexer:
    """One `lazyfs index` run over one source image."""

    def __init__(self, source: SourceImage, layout: OciLayout, work_root: str, *, chunk_size: int,
                 span_size: int, max_layer_bytes: int, progress: ConvertProgress) -> None:
        self.source, self.layout, self.work_root = source, layout, work_root
        self.chunk_size, self.span_size, self.max_layer_bytes = chunk_size, span_size, max_layer_bytes
        self.progress = progress
        self.layers: list[IndexLayer] = []
        self.reports: list[_LayerReport] = []
        self.virtual_size = 0
        self._blobs: dict[int, str] = {}  # layer -> its blob file, once downloaded
        self._ready: dict[int, trio.Event] = {}

    async def run(self) -> None:
        with tempfile.TemporaryDirectory(prefix="index-", dir=self.work_root) as work:
            fs = WorkFs(os.path.join(work, "fs"))
            os.makedirs(fs.directory, exist_ok=True)
            lower: list[tuple[LayerMeta, str]] = []
            count = len(self.source.manifest.layers)
            self._ready = {i: trio.Event() for i in range(count)}
            async with open_nursery() as nursery:  # downloads run ahead of the indexing, as in convert
                nursery.start_soon(self._download_all, work)
                for i in range(count):
                    lower.append(await self._layer(i, work, fs, lower))
            self.virtual_size = fs.size

    async def _download_all(self, work: str) -> None:
        limiter = trio.CapacityLimiter(DOWNLOAD_CONCURRENCY)

        async def one(i: int) -> None:
            layer = self.source.manifest.layers[i]
            if layer.size > self.max_layer_bytes:
                raise FormatError(f"layer {i} ({layer.digest[:19]}) of {self.source.text}: {layer.size} bytes, "
                                  f"more than the {self.max_layer_bytes}-byte limit")
            async with limiter:
                self._blobs[i] = await self.source.fetch_layer(i, work)
            self._ready[i].set()

        async with open_nursery() as nursery:
            for i in sorted(self._ready):
                nursery.start_soon(one, i)

    async def _layer(self, i: int, work: str, fs: WorkFs, lower: list[tuple[LayerMeta, str]]):
        started = time.monotonic()
        source_layer = self.source.manifest.layers[i]
        what = f"layer {i} ({source_layer.digest[:19]}) of {self.source.text}"
        if source_layer.size > self.max_layer_bytes:
            raise FormatError(f"{what}: {source_layer.size} bytes, more than the {self.max_layer_bytes}-byte limit")
        await self._ready[i].wait()
        blob = self._blobs[i]
        size = await trio.to_thread.run_sync(os.path.getsize, blob)
        if size != source_layer.size:
            raise FormatError(f"{what}: the blob is {size} bytes, its descriptor says {source_layer.size}")
        spool = os.path.join(fs.directory, "layer.tar")
        try:
            built = await trio.to_thread.run_sync(_spool_spans, blob, source_layer.compression, size, spool,
                                                  self.span_size, self.max_layer_bytes)
        except FormatError as exc:
            raise FormatError(f"{what}: {exc}") from None
        scanned = await trio.to_thread.run_sync(scan_layer, spool, "none", what, None, None, self.max_layer_bytes)
        check_diff_id(scanned, self.source.diff_ids[i], what)
        await fs.make_room(scanned.stats, self.source.chains[0])
        async with fs.mounted() as root:
            candidates = await trio.to_thread.run_sync(_apply_recording, root, spool, what)
        mapped = await trio.to_thread.run_sync(verified_extents, fs.path, spool, candidates)
        if blob.startswith(work):
            os.unlink(blob)
        os.unlink(spool)
        span_map = built.span_map(source_layer.digest, tuple(mapped))
        spans_blob = await trio.to_thread.run_sync(encode_span_map, span_map)
        spans_desc = self.layout.put_bytes(spans_blob.data, MEDIA_TYPE_SPANS)
        layout, chunk = self.layout, self.chunk_size
        written = await trio.to_thread.run_sync(
            lambda: write_layer(layout, without_mapped(fs.changed_pieces(chunk), mapped), fs.size, chunk,
                                known_chunks(lower), mask_zeros=True))
        self.layers.append(IndexLayer(written.descriptor, spans_desc, source_layer.digest, spans_blob.doc_length,
                                      sha256_digest(spans_blob.doc)))
        self.reports.append(_LayerReport(
            source_layer.digest, built.codec, built.access, size, built.tar_size, len(built.spans), built.windows,
            sum(e.count for e in mapped), written.descriptor.size, len(spans_blob.data), spans_blob.doc_length,
            round(time.monotonic() - started, 3)))
        return written.meta, written.descriptor.digest


async def _publish(source: SourceImage, layout: OciLayout, layers: list[IndexLayer], config: bytes,
                   manifest: bytes) -> None:
    """Put the index next to its source: the same layout, or the same registry repository."""
    blobs = [(layer.meta.digest, layer.meta.size) for layer in layers] + \
        [(layer.spans.digest, layer.spans.size) for layer in layers]
    subject = source.manifest.digest
    annotations = {ANN_SOURCE_MANIFEST: subject}
    if source.layout is not None:
        target = source.layout
        for digest, _ in blobs:
            if not target.has_blob(digest):
                shutil.copyfile(layout.blob_path(digest), target.blob_path(digest))
        target.put_bytes(config, MEDIA_TYPE_INDEX_CONFIG)
        add_referrer_local(target, manifest, INDEX_ARTIFACT_TYPE, subject, annotations)
        return
    client, ref = source.client, source.ref
    assert client is not None and ref is not None
    repo = ref.repo()
    for digest, size in blobs:
        await client.push_blob(repo, layout.blob_path(digest), digest,
                               chunk_size=(16 << 20) if size > (64 << 20) else None)
    await client.push_blob(repo, config, sha256_digest(config))
    await add_referrer_remote(client, repo, manifest, INDEX_ARTIFACT_TYPE, subject, annotations)


def default_index_dir(config) -> str:
    return os.path.join(config.cache_root, "index")


ALL_PLATFORMS = "all"


async def source_platforms(opener: ImageOpener, text: str) -> list[str]:
    """The platforms of the multi-arch index *text* names (``os/arch[/variant]``, in its order); ``[]``
    when it names a single image manifest."""
    local = parse_local_ref(text)
    if local is not None:
        data, desc = OciLayout(local.path).read_manifest(local.tag)
        media_type = desc.media_type
    else:
        data, media_type, _ = await opener.client.get_manifest(parse_reference(text), accept=MANIFEST_MEDIA_TYPES)
    if not is_index(media_type_of(data, media_type)):
        return []
    platforms = [str(entry) for entry in parse_platforms(data, f"index of {text}")]
    if not platforms:
        raise NotFoundError(f"{text} is an index that lists no image for any platform")
    return list(dict.fromkeys(platforms))


async def index_image(opener: ImageOpener, source_text: str, *, platform: str | None = None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, span_size: int = SPAN_SIZE,
                      progress: ConvertProgress | None = None) -> dict:
    """Index *source_text* (a registry image or ``oci:DIR[:TAG]``) and publish the index as its referrer.

    From a multi-arch index, the manifest of *platform* (default: this host's); with *platform*
    ``all``, every platform's manifest, each with an index of its own (the result lists them under
    ``platforms``, in the index's order)."""
    if platform == ALL_PLATFORMS:
        platforms = await source_platforms(opener, source_text)
        if not platforms:  # one image: it is every platform it has
            return await index_image(opener, source_text, chunk_size=chunk_size, span_size=span_size,
                                     progress=progress)
        results = []
        for one in platforms:
            results.append(await index_image(opener, source_text, platform=one, chunk_size=chunk_size,
                                             span_size=span_size, progress=progress))
        return {"source": source_text, "platforms": results}
    started = time.monotonic()
    if os.geteuid() != 0:
        raise ConfigError("lazyfs index needs root: layers are applied by the kernel's ext4 on a loop device")
    if span_size < 64 << 10 or span_size > 4 << 20:
        raise ConfigError(f"span size {span_size} must be between 64 KiB and 4 MiB")
    source = await open_source(lambda: opener.client, source_text, platform)
    root = default_index_dir(opener.config)
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    layout = OciLayout(os.path.join(root, "blobs")).ensure()
    indexer = Indexer(source, layout, root, chunk_size=chunk_size, span_size=span_size,
                      max_layer_bytes=opener.config.convert_max_layer_bytes, progress=progress or ConvertProgress())
    await indexer.run()
    config = canonical_json({"source_manifest": source.manifest.digest, "platform": source.platform,
                             "source_layers": [layer.digest for layer in source.manifest.layers],
                             "diff_ids": source.diff_ids, "virtual_size": indexer.virtual_size})
    config_desc = Descriptor(MEDIA_TYPE_INDEX_CONFIG, sha256_digest(config), len(config))
    manifest = build_index_manifest(config_desc, indexer.layers, indexer.virtual_size, source.manifest.descriptor)
    parse_index_manifest(manifest, source.manifest.digest, [layer.digest for layer in source.manifest.layers])
    built_seconds = round(time.monotonic() - started, 3)
    await _publish(source, layout, indexer.layers, config, manifest)
    digest = sha256_digest(manifest)
    ledger = conversion_ledger(opener.config)  # made here: trusted here, like a twin convert wrote
    await trio.to_thread.run_sync(ledger.record, digest, {
        "kind": "index", "source": source_text, "source_manifest": source.manifest.digest, "recorded": int(time.time())})
    source_bytes = sum(layer.size for layer in source.manifest.layers)
    index_bytes = sum(r.meta_bytes + r.span_map_bytes for r in indexer.reports) + len(config) + len(manifest)
    return {
        "source": source_text,
        "source_manifest": source.manifest.digest,
        "platform": source.platform,
        "index": digest,
        "virtual_size": indexer.virtual_size,
        "source_bytes": source_bytes,
        "index_bytes": index_bytes,
        "index_ratio": round(index_bytes / max(1, source_bytes), 4),
        "span_doc_bytes": sum(r.span_doc_bytes for r in indexer.reports),
        "build_seconds": built_seconds,
        "seconds": round(time.monotonic() - started, 3),
        "layers": [{"source_digest": r.source_digest, "codec": r.codec, "access": r.access,
                    "source_bytes": r.source_bytes, "tar_bytes": r.tar_bytes, "spans": r.spans,
                    "windows": r.windows, "mapped_blocks": r.mapped_blocks, "meta_bytes": r.meta_bytes,
                    "span_map_bytes": r.span_map_bytes, "span_doc_bytes": r.span_doc_bytes,
                    "seconds": r.seconds} for r in indexer.reports],
    }
