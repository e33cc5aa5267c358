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
like a twin it converted (``lazyfs.image.trust``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import trio

from lazyfs.errors import ConfigError, FormatError, IntegrityError, LazyfsError, NotFoundError, TrustError
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.registry import RegistryBackend
from lazyfs.format.digest import check_sha256
from lazyfs.format.layer import BLOCK_SIZE, DEFAULT_CHUNK_SIZE, MEDIA_TYPE_LAYER, LayerMeta
from lazyfs.format.oci import (
    ANN_META_DIGEST,
    ANN_META_LENGTH,
    ANN_META_OFFSET,
    ANN_VIRTUAL_SIZE,
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    ImageManifest,
    LayerDescriptor,
    canonical_json,
    parse_descriptor,
    parse_json,
    parse_layer_descriptor,
    sha256_digest,
)
from lazyfs.format.numbers import decimal
from lazyfs.format.ociimage import host_platform, is_index, media_type_of, parse_platforms, parse_source_manifest
from lazyfs.format.reference import parse_reference
from lazyfs.format.spanindex import (
    MEDIA_TYPE_SPANS,
    SPAN_SIZE,
    MappedExtent,
    SpanMap,
    build_spans,
    decode_span_map,
    encode_span_map,
)
from lazyfs.image.blockmap import data_segments, fiemap, file_extents, verified_extents, without_mapped
from lazyfs.image.build import known_chunks, write_layer
from lazyfs.image.convert import DOWNLOAD_CONCURRENCY, ConvertProgress, SourceImage, _choose, open_source
from lazyfs.image.image import Image, ImageLimits, load_image
from lazyfs.image.layout import OciLayout
from lazyfs.image.ref import parse_local_ref
from lazyfs.image.referrers import add_referrer_local, add_referrer_remote, find_referrers_local, find_referrers_remote
from lazyfs.image.remote import ImageOpener, OpenedImage
from lazyfs.image.tarapply import LayerApplier, check_diff_id, scan_layer
from lazyfs.image.trust import (
    ArtifactSource,
    LayoutSource,
    RegistrySource,
    TrustPolicy,
    conversion_ledger,
    describe,
)
from lazyfs.image.workfs import WorkFs
from lazyfs.nursery import open_nursery

INDEX_ARTIFACT_TYPE = "application/vnd.lazyfs.index.v1"
MEDIA_TYPE_INDEX_CONFIG = "application/vnd.lazyfs.index.config.v1+json"
MEDIA_TYPE_MAPPED_LAYER = "application/vnd.lazyfs.mapped-layer.v1"
ANN_SOURCE_MANIFEST = "dev.lazyfs.index.source-manifest"
ANN_SOURCE_LAYER = "dev.lazyfs.index.source-layer"
ANN_SPANS = "dev.lazyfs.index.spans"
# on a span map: its document is the blob's last N bytes, with this sha256; the windows before it are read
# lazily (version 3). Without them the whole blob is the document (versions 1 and 2).
ANN_SPANS_DOC_LENGTH = "dev.lazyfs.index.spans-doc-length"
ANN_SPANS_DOC_DIGEST = "dev.lazyfs.index.spans-doc-digest"
INDEX_VERSION = "1"


# ---------------------------------------------------------------- the manifest


@dataclass(frozen=True, slots=True)
class IndexLayer:
    """One source layer's part of an index: its metadata layer, its span map blob, and the source layer."""

    meta: LayerDescriptor
    spans: Descriptor
    source_digest: str
    doc_length: int = 0  # the span map document: the last doc_length bytes of the blob (0: all of it)
    doc_digest: str = ""  # its sha256 (the manifest anchors it; the document anchors the windows before it)


@dataclass(frozen=True, slots=True)
class IndexManifest:
    digest: str
    subject: str
    virtual_size: int
    layers: tuple[IndexLayer, ...]
    config: Descriptor


def build_index_manifest(config: Descriptor, layers: list[IndexLayer], virtual_size: int,
                         subject: Descriptor) -> bytes:
    """The index artifact's manifest: names the source manifest (subject) and every source layer."""
    rows = []
    for layer in layers:
        meta = layer.meta
        rows.append({"mediaType": MEDIA_TYPE_MAPPED_LAYER, "digest": meta.digest, "size": meta.size,
                     "annotations": {ANN_META_OFFSET: str(meta.meta_offset), ANN_META_LENGTH: str(meta.meta_length),
                                     ANN_META_DIGEST: meta.meta_digest, ANN_SOURCE_LAYER: layer.source_digest,
                                     ANN_SPANS: layer.spans.digest}})
        doc = {ANN_SPANS_DOC_LENGTH: str(layer.doc_length), ANN_SPANS_DOC_DIGEST: layer.doc_digest} \
            if layer.doc_length else {}
        rows.append({**layer.spans.to_json(), "annotations": {ANN_SOURCE_LAYER: layer.source_digest, **doc}})
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "artifactType": INDEX_ARTIFACT_TYPE,
        "config": config.to_json(),
        "layers": rows,
        "subject": subject.to_json(),
        "annotations": {ANN_SOURCE_MANIFEST: subject.digest, ANN_VIRTUAL_SIZE: str(virtual_size),
                        "dev.lazyfs.index.version": INDEX_VERSION},
    })


def parse_index_manifest(data: bytes, subject: str, source_layers: list[str]) -> IndexManifest:
    """Parse an index manifest and check it is an index of exactly *subject* with *source_layers* (FormatError)."""
    digest = sha256_digest(data)
    where = f"index {digest[:19]}"
    doc = parse_json(data, where)
    if doc.get("artifactType") != INDEX_ARTIFACT_TYPE or doc.get("schemaVersion") != 2:
        raise FormatError(f"{where}: not a lazyfs index (artifactType {doc.get('artifactType')!r})")
    named = parse_descriptor(doc.get("subject"), f"{where} subject").digest if "subject" in doc else None
    ann = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else {}
    if named != subject or ann.get(ANN_SOURCE_MANIFEST) != subject:
        raise FormatError(f"{where} is an index of {named or ann.get(ANN_SOURCE_MANIFEST)}, not of {subject}")
    size = decimal(str(ann.get(ANN_VIRTUAL_SIZE, "")), f"{where}: virtual size", 1)
    if size % BLOCK_SIZE or size > 1 << 50:
        raise FormatError(f"{where}: virtual size {size}")
    rows = doc.get("layers")
    if not isinstance(rows, list) or len(rows) != 2 * len(source_layers):
        raise FormatError(f"{where}: {len(rows) if isinstance(rows, list) else 'no'} layers for "
                          f"{len(source_layers)} source layers (two each)")
    layers = []
    for i, source in enumerate(source_layers):
        m = parse_descriptor(rows[2 * i], f"{where} layers[{2 * i}]")
        s = parse_descriptor(rows[2 * i + 1], f"{where} layers[{2 * i + 1}]")
        if m.media_type != MEDIA_TYPE_MAPPED_LAYER or s.media_type != MEDIA_TYPE_SPANS:
            raise FormatError(f"{where}: layers[{2 * i}] and [{2 * i + 1}] are not a mapped layer and its span map")
        if m.annotations.get(ANN_SOURCE_LAYER) != source or s.annotations.get(ANN_SOURCE_LAYER) != source \
                or m.annotations.get(ANN_SPANS) != s.digest:
            raise FormatError(f"{where}: layer {i} is not indexed from source layer {source}")
        # the metadata layer is a lazyfs layer in all but its media type (so no reader mounts it alone)
        as_layer = Descriptor(MEDIA_TYPE_LAYER, m.digest, m.size, m.annotations)
        doc_length, doc_digest = _span_doc(s, f"{where} layers[{2 * i + 1}]")
        layers.append(IndexLayer(parse_layer_descriptor(as_layer, f"{where} layers[{2 * i}]"), s, source,
                                 doc_length, doc_digest))
    config = parse_descriptor(doc.get("config"), f"{where} config")
    return IndexManifest(digest, subject, size, tuple(layers), config)


def _span_doc(d: Descriptor, where: str) -> tuple[int, str]:
    """Where a span map's document is in its blob: (length, sha256), or (0, "") for a whole-blob document."""
    if ANN_SPANS_DOC_LENGTH not in d.annotations and ANN_SPANS_DOC_DIGEST not in d.annotations:
        return 0, ""
    length = decimal(str(d.annotations.get(ANN_SPANS_DOC_LENGTH, "")), f"{where}: {ANN_SPANS_DOC_LENGTH}", 1)
    if length > d.size:
        raise FormatError(f"{where}: a span map document of {length} bytes in a blob of {d.size}")
    digest = str(d.annotations.get(ANN_SPANS_DOC_DIGEST, ""))
    check_sha256(digest, f"{where}: annotation {ANN_SPANS_DOC_DIGEST}")
    return length, digest


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



# ---------------------------------------------------------------- opening an ordinary image through its index


MAX_INDEXES_CHECKED = 16  # indexes of one image whose trust is checked, newest first


async def load_indexed(index: IndexManifest, backend: Backend, *, name: str, limits: ImageLimits,
                       source_sizes: list[int]) -> Image:
    """The index's metadata layers (each tail checked against its meta-digest) and span maps (sha256-checked)."""
    declared = sum(layer.doc_length or layer.spans.size for layer in index.layers)
    if declared > limits.metadata_budget:
        raise FormatError(f"{name}: its index declares {declared} bytes of span maps, more than the metadata "
                          f"budget of {limits.metadata_budget} bytes (the config's metadata_budget)")
    manifest = ImageManifest(index.digest, index.config, tuple(layer.meta for layer in index.layers),
                             index.virtual_size, {}, None)
    maps: list[SpanMap | None] = [None] * len(index.layers)
    errors: dict[int, LazyfsError] = {}
    loaded: list[Image] = []

    async def tails() -> None:
        try:
            loaded.append(await load_image(manifest, [backend], name=f"{name} (index {index.digest[:19]})",
                                           limits=limits))
        except LazyfsError as exc:
            errors[-1] = exc

    async def one(i: int, layer: IndexLayer) -> None:
        what = f"span map of layer {i} ({layer.source_digest[:19]}) of {name}"
        try:
            # the document only (its windows are read with the spans that need them), or the whole blob
            doc_at = layer.spans.size - layer.doc_length if layer.doc_length else 0
            data = await backend.read_range(layer.spans.digest, doc_at, layer.spans.size - doc_at)
            got, want = sha256_digest(data), layer.doc_digest or layer.spans.digest
            if got != want:
                raise IntegrityError(what, want, got, backend.name)
            span_map = await trio.to_thread.run_sync(
                lambda: decode_span_map(data, what, limits.metadata_budget, blob=layer.spans.digest,
                                        windows_end=doc_at))
            if span_map.source_digest != layer.source_digest or span_map.source_size != source_sizes[i]:
                raise FormatError(f"{what}: it maps {span_map.source_digest} of {span_map.source_size} bytes, "
                                  f"not {layer.source_digest} of {source_sizes[i]}")
            maps[i] = span_map
        except LazyfsError as exc:  # reported once, below, as itself (not inside an exception group)
            errors[i] = exc

    async with open_nursery() as nursery:  # one round trip for all of them and the metadata tails
        nursery.start_soon(tails)
        for i, layer in enumerate(index.layers):
            nursery.start_soon(one, i, layer)
    if errors:
        raise errors[min(errors)]
    return Image(manifest, loaded[0].layers, tuple(maps))


async def open_indexed(opener: ImageOpener, text: str, data: bytes, media_type: str, digest: str, *,
                       prefix: list[str] | None = None, name: str | None = None) -> OpenedImage:
    """Open the ordinary image *text* (its manifest *data*) through a trusted lazyfs index.

    With *prefix* (the digests of its lowest layers), only those layers: the device of that
    prefix of the image, as a snapshot below the top one needs. *name* names the result
    (default *text*). NotFoundError when it has none (saying how to make one), TrustError
    when none is trusted.
    """
    return await _through_index(opener, text, data, media_type, digest, prefix=prefix, name=name, load=True)


async def trusted_index(opener: ImageOpener, text: str, data: bytes, media_type: str, digest: str) -> str:
    """Which index `open_indexed` would read *text* through (``index sha256:... (why it is trusted)``),
    without loading its layers (the referrers and the index manifest only); the same errors."""
    return await _through_index(opener, text, data, media_type, digest, prefix=None, name=None, load=False)


async def _through_index(opener: ImageOpener, text: str, data: bytes, media_type: str, digest: str, *,
                         prefix: list[str] | None, name: str | None, load: bool):
    platform = host_platform()
    local = parse_local_ref(text)
    policy = TrustPolicy.from_config(opener.config)
    if local is not None:
        layout = OciLayout(local.path)

        async def load_local(d: Descriptor) -> bytes:
            return layout.read_blob(d.digest)

        data, media_type, digest = await _choose(data, media_type, digest, platform, text, load_local)
        entries = find_referrers_local(layout, digest, INDEX_ARTIFACT_TYPE)
        artifacts: ArtifactSource = LayoutSource(layout)
        backend: Backend = DirectoryBackend(layout.path)

        async def manifest_of(d: str) -> bytes:
            return layout.read_blob(d)
        remote = None
    else:
        client = opener.client
        ref = parse_reference(text)

        async def load_remote(d: Descriptor) -> bytes:
            return (await client.get_manifest(ref.with_digest(d.digest), accept=MANIFEST_MEDIA_TYPES))[0]

        data, media_type, digest = await _choose(data, media_type, digest, platform, text, load_remote)
        entries = await find_referrers_remote(client, ref.repo(), digest, INDEX_ARTIFACT_TYPE)
        artifacts = RegistrySource(client, ref.repo())
        backend = RegistryBackend(client, ref.repo())

        async def manifest_of(d: str) -> bytes:
            return (await client.get_manifest(ref.with_digest(d), accept=(MEDIA_TYPE_MANIFEST,)))[0]
        remote = ref.with_digest(digest)
    source = parse_source_manifest(data, digest, media_type)
    count = len(source.layers)
    if prefix is not None:
        if not prefix or [layer.digest for layer in source.layers[:len(prefix)]] != prefix:
            raise FormatError(f"{name or text}: its layers are not the lowest layers of {text} ({digest})")
        count = len(prefix)
    if not entries:
        raise NotFoundError(f"{text} is an ordinary image ({digest}) with no lazyfs index: index it "
                            f"(`lazyfs index {text}`) or convert it first (`lazyfs convert`)")
    refused = []
    for entry in reversed(entries[-MAX_INDEXES_CHECKED:]):
        try:  # fetched once: the trust check verifies it against its digest, then it is parsed
            index_bytes: bytes | None = await manifest_of(entry["digest"])
        except LazyfsError:
            index_bytes = None  # the check fetches it again and says why it cannot
        decision = await policy.check(artifacts, entry["digest"], digest, index_bytes)
        if not decision.trusted:
            refused.append(decision)
            continue
        if index_bytes is None:
            index_bytes = await manifest_of(entry["digest"])
        index = parse_index_manifest(index_bytes, digest, [layer.digest for layer in source.layers])
        index = dataclasses.replace(index, layers=index.layers[:count])  # checked whole, used up to the prefix
        via = f"index {index.digest} ({decision.reason})"
        if not load:
            return via
        image = await load_indexed(index, backend, name=name or text, limits=opener.limits,
                                   source_sizes=[layer.size for layer in source.layers[:count]])
        return OpenedImage(name or text, image, backend, local=local, remote=remote, via=via)
    raise TrustError(f"no trusted lazyfs index of {text} ({digest}): {describe(refused)}. Index it on this host "
                     f"(lazyfs index), or sign the index and list the signer's root in trust.trust_store (docs/index.md)")


async def open_registered(opener: ImageOpener, text: str, data: bytes, media_type: str, source: str) -> OpenedImage:
    """The ordinary registry image *source* (``REF@DIGEST``), or the prefix of its layers that the
    manifest *data* of the layout *text* lists, through its trusted index.

    This is how the snapshotter keeps an ordinary image it registered (``ROOT/images/<hex>``): the
    source manifest (or a prefix of it) in a layout whose entry names the source; no layer data.
    """
    ref = parse_reference(source)
    client = await opener.ensure_client()
    local = parse_source_manifest(data, sha256_digest(data), media_type)
    source_data, media_type, digest = await client.get_manifest(ref, accept=MANIFEST_MEDIA_TYPES)
    return await open_indexed(opener, source, source_data, media_type, digest,
                              prefix=[layer.digest for layer in local.layers], name=text)
