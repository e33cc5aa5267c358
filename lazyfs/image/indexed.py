"""Opening an ordinary OCI image through its lazyfs index (docs/index.md), and the index manifest's format.

An index is an OCI artifact listed under the source manifest's referrers
(``lazyfs.image.index`` builds one). Opening the source image through it finds
its index, checks that this host trusts it (``lazyfs.image.trust``), reads the
metadata layers' tails and the span maps' documents, and hands the device an
``Image`` whose mapped blocks are read from the original layer blobs. A mount
imports this module only: the builder's working ext4 and tar applier stay out
of the daemon until it indexes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import trio

from lazyfs.errors import FormatError, IntegrityError, LazyfsError, NotFoundError, TrustError
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.registry import RegistryBackend
from lazyfs.format.digest import check_sha256
from lazyfs.format.layer import BLOCK_SIZE, MEDIA_TYPE_LAYER
from lazyfs.format.numbers import decimal
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
from lazyfs.format.ociimage import follow_index, host_platform, parse_source_manifest
from lazyfs.format.reference import parse_reference
from lazyfs.format.spanindex import MEDIA_TYPE_SPANS, SpanMap, decode_span_map
from lazyfs.image.image import Image, ImageLimits, load_image
from lazyfs.image.layout import OciLayout
from lazyfs.image.ref import parse_local_ref
from lazyfs.image.referrers import find_referrers_local, find_referrers_remote
from lazyfs.image.remote import ImageOpener, OpenedImage
from lazyfs.image.trust import ArtifactSource, LayoutSource, RegistrySource, TrustPolicy, describe
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

        data, media_type, digest = await follow_index(data, media_type, digest, platform, text, load_local)
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

        data, media_type, digest = await follow_index(data, media_type, digest, platform, text, load_remote)
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
