"""An opened lazyfs image: its manifest and the metadata of every layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import trio

from lazyfs.device.chunks import ChunkStore
from lazyfs.device.merged import MergedDevice
from lazyfs.device.writable import WritableLayer
from lazyfs.fetch.backend import Backend
from lazyfs.format.layer import FOOTER_SIZE, LayerMeta, parse_tail
from lazyfs.format.oci import ImageManifest, LayerDescriptor


@dataclass(frozen=True, slots=True)
class Image:
    manifest: ImageManifest
    layers: tuple[tuple[LayerMeta, str], ...]  # (meta, blob digest), bottom first

    @property
    def virtual_size(self) -> int:
        return self.manifest.virtual_size

    def device(self, store: ChunkStore, writable: WritableLayer | None = None) -> MergedDevice:
        return MergedDevice(self.layers, store, writable, size=self.virtual_size)


async def load_layer_meta(backend: Backend, layer: LayerDescriptor) -> LayerMeta:
    """One ranged read: the layer's metadata and footer, checked against the manifest."""
    tail = await backend.read_range(layer.digest, layer.meta_offset, layer.meta_length + FOOTER_SIZE)
    _, meta = await trio.to_thread.run_sync(parse_tail, tail, layer.size)
    return meta


async def load_image(manifest: ImageManifest, backend: Backend) -> Image:
    """Fetch every layer's metadata concurrently (one ranged read per layer)."""
    metas: list[LayerMeta | None] = [None] * len(manifest.layers)

    async def one(i: int, layer: LayerDescriptor) -> None:
        metas[i] = await load_layer_meta(backend, layer)

    async with trio.open_nursery() as nursery:
        for i, layer in enumerate(manifest.layers):
            nursery.start_soon(one, i, layer)
    return Image(manifest, tuple((meta, layer.digest) for meta, layer in zip(metas, manifest.layers)))


def layers_of(image: Image | None) -> Sequence[tuple[LayerMeta, str]]:
    return image.layers if image is not None else ()
