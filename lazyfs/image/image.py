"""An opened lazyfs image: its manifest and the metadata of every layer, each anchored by the manifest."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from lazyfs.config import Config
from lazyfs.device.chunks import ChunkSource
from lazyfs.device.merged import MergedDevice
from lazyfs.device.writable import WritableLayer
from lazyfs.errors import FetchError, FormatError, IntegrityError, LazyfsError
from lazyfs.fetch.backend import Backend
from lazyfs.format.layer import (
    DEFAULT_MAX_VIRTUAL_SIZE,
    DEFAULT_METADATA_BUDGET,
    LayerMeta,
    MetadataBudget,
    parse_anchored_tail,
)
from lazyfs.format.oci import ImageManifest, LayerDescriptor
from lazyfs.format.spanindex import SpanMap
from lazyfs.nursery import open_nursery

log = logging.getLogger(__name__)
TAIL_CONCURRENCY = 16  # layer tails fetched and parsed at once


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What one image may make this host hold: its virtual size, and its metadata's memory."""

    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
    metadata_budget: int = DEFAULT_METADATA_BUDGET

    @classmethod
    def from_config(cls, config: Config) -> "ImageLimits":
        return cls(config.max_virtual_size, config.metadata_budget)


@dataclass(frozen=True, slots=True)
class Image:
    manifest: ImageManifest
    layers: tuple[tuple[LayerMeta, str], ...]  # (meta, blob digest), bottom first
    mapped: tuple[SpanMap | None, ...] = ()  # an ordinary image opened through its index: each layer's span map

    @property
    def virtual_size(self) -> int:
        return self.manifest.virtual_size

    def device(self, store: ChunkSource, writable: WritableLayer | None = None) -> MergedDevice:
        return MergedDevice(self.layers, store, writable, size=self.virtual_size, mapped=self.mapped or None)


def layer_name(i: int, layer: LayerDescriptor, image: str) -> str:
    return f"layer {i} ({layer.digest[:19]}) of {image}"


TailSink = Callable[[LayerDescriptor, bytes], None]


async def load_layer(i: int, layer: LayerDescriptor, backends: Sequence[Backend], *, image: str = "image",
                     budget: MetadataBudget | None = None, max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
                     saved: bytes | None = None, on_tail: TailSink | None = None) -> LayerMeta:
    """The metadata of one layer, from the first source whose tail matches the layer's meta-digest.

    Sources are tried in order, as the scheduler tries them for chunks: bytes
    that fail the digest are read again from another source of the same
    backend (that source excluded and reported to the backend), then from the
    next backend, as is a read that fails outright. A
    tail that matches its digest but does not parse is the image's fault and
    fails at once. *saved* (a tail kept from an earlier pull) is tried first.
    *on_tail* is given the bytes of the tail that passed (in a worker thread).
    """
    what = layer_name(i, layer, image)
    budget = budget if budget is not None else MetadataBudget(what=image)
    budget.charge(layer.meta_length, what)  # the tail itself, while it is parsed
    try:
        if saved is not None:
            try:
                return await _parse(saved, layer, what, budget, max_virtual_size, "the saved metadata", on_tail)
            except IntegrityError as exc:
                log.warning("%s; fetching it again", exc)
        bad: list[IntegrityError] = []
        failed: list[LazyfsError] = []
        for backend in backends:
            excluded: set[str] = set()
            # Each pass reads from a source of this backend not yet caught serving bad bytes:
            # bounded by its sources.
            while not excluded.issuperset(backend.sources):
                try:
                    got = await backend.read_range_from(layer.digest, layer.meta_offset, layer.meta_length,
                                                        exclude=excluded)
                    if len(got.data) != layer.meta_length:
                        raise FetchError(f"{got.source}: short read of {layer.digest}: {len(got.data)} of "
                                         f"{layer.meta_length} bytes")
                except LazyfsError as exc:
                    failed.append(exc)
                    log.info("metadata of %s from %s: %s", what, backend.name, exc)
                    break
                try:
                    meta = await _parse(got.data, layer, what, budget, max_virtual_size, got.source, on_tail)
                except IntegrityError as exc:
                    bad.append(exc)
                    log.info("%s", exc)
                    backend.source_failed_verification(got.source)
                    if got.source in excluded:  # a backend that ignored the exclusion: do not loop
                        break
                    excluded.add(got.source)
                    continue
                if bad or failed:  # the failover worked: say which sources did not
                    log.warning("metadata of %s came from %s; %s", what, got.source,
                                "; ".join(str(e) for e in [*bad, *failed]))
                return meta
        if bad:
            sources = ", ".join(e.source for e in bad)
            raise IntegrityError(f"metadata of {what}", layer.meta_digest, bad[-1].got,
                                 sources if not failed else f"{sources} (other sources failed: {failed[-1]})")
        if failed:
            raise failed[-1]
        raise FetchError(f"{what}: no source to read its metadata from")
    finally:
        budget.refund(layer.meta_length)


async def _parse(tail: bytes, layer: LayerDescriptor, what: str, budget: MetadataBudget, max_virtual_size: int,
                 source: str, on_tail: TailSink | None) -> LayerMeta:
    def parse() -> LayerMeta:
        _, meta = parse_anchored_tail(tail, layer.meta_digest, layer.size, budget=budget,
                                      max_virtual_size=max_virtual_size, what=what, source=source)
        if on_tail is not None:
            on_tail(layer, tail)
        return meta

    return await trio.to_thread.run_sync(parse)


async def load_image(manifest: ImageManifest, backends: Sequence[Backend], *, name: str = "image",
                     limits: ImageLimits = ImageLimits(),
                     saved_tail: Callable[[LayerDescriptor], bytes | None] | None = None,
                     on_tail: TailSink | None = None) -> Image:
    """Every layer's metadata, fetched concurrently: one ranged read per layer (more if a source fails).

    *backends* are the sources in order (``OpenedImage.backends``). *saved_tail*
    may return a layer's tail kept from an earlier pull (then no read is made
    unless it fails its digest); *on_tail* is given each tail that passed. Each layer's tail is checked against its
    meta-digest before anything of it is parsed; all of them together stay
    within ``limits.metadata_budget``, and no layer may be larger than the
    image. The first failing layer (lowest index) is the error raised.
    """
    if not backends:
        raise FetchError(f"{name}: no source to read it from")
    budget = MetadataBudget(limits.metadata_budget, what=name)
    declared = sum(layer.meta_length for layer in manifest.layers)
    if declared > budget.limit:
        raise FormatError(f"{name}: its {len(manifest.layers)} layers declare {declared} bytes of metadata, "
                          f"more than the metadata budget of {budget.limit} bytes (the config's metadata_budget)")
    if manifest.virtual_size > limits.max_virtual_size:
        raise FormatError(f"{name}: virtual size {manifest.virtual_size} bytes is larger than the "
                          f"{limits.max_virtual_size}-byte limit (the config's max_virtual_size)")
    metas: list[LayerMeta | None] = [None] * len(manifest.layers)
    errors: dict[int, LazyfsError] = {}
    limiter = trio.CapacityLimiter(TAIL_CONCURRENCY)

    async def one(i: int, layer: LayerDescriptor, cancel: trio.CancelScope) -> None:
        try:
            async with limiter:
                saved = await trio.to_thread.run_sync(saved_tail, layer) if saved_tail else None
                metas[i] = await load_layer(i, layer, backends, image=name, budget=budget,
                                            max_virtual_size=limits.max_virtual_size, saved=saved, on_tail=on_tail)
        except LazyfsError as exc:  # reported once, below, as itself (not inside an exception group)
            errors[i] = exc
            cancel.cancel()

    async with open_nursery() as nursery:
        for i, layer in enumerate(manifest.layers):
            nursery.start_soon(one, i, layer, nursery.cancel_scope)
    if errors:
        raise errors[min(errors)]
    for i, (meta, layer) in enumerate(zip(metas, manifest.layers, strict=True)):
        if meta.virtual_size > manifest.virtual_size:
            raise FormatError(f"{layer_name(i, layer, name)}: virtual size {meta.virtual_size} is larger than "
                              f"the image's {manifest.virtual_size}")
    return Image(manifest, tuple((meta, layer.digest) for meta, layer in zip(metas, manifest.layers, strict=True)))
