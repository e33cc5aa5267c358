"""An opened lazyfs image: its manifest and the metadata of every layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from lazyfs.device.chunks import ChunkStore
from lazyfs.device.merged import MergedDevice
from lazyfs.device.writable import WritableLayer
from lazyfs.fetch.backend import Backend
from lazyfs.format.layer import FOOTER_SIZE, LayerMeta, parse_tail
from lazyfs.format.oci import ImageManifest, LayerDescriptor
from lazyfs.nursery import open_nursery


@dataclass(frozen=True, slots=True)
class Image:
    manifest: ImageManifest
    layers: tuple[tuple[LayerMeta, str], ...]  # (meta, blob digest), bottom first

    @property
    def virtual_size(self) -> int:
        return self.manifest.virtual_size

    def device(self, store: ChunkStore, writable: WritableLayer | None = None) -> MergedDevice:
        return MergedDevice(self.layers, store, writable, size=self.virtual_size)


async def load_image(manifest: ImageManifest, backend: Backend,
                     saved_tail: Callable[[LayerDescriptor], bytes | None] | None = None) -> Image:
    """Every layer's metadata, fetched concurrently: one ranged read per layer.

    *saved_tail* may return a layer's metadata bytes kept from an earlier pull
    (then no read is made); they are checked exactly like fetched ones.
    """
    metas: list[LayerMeta | None] = [None] * len(manifest.layers)

    async def one(i: int, layer: LayerDescriptor) -> None:
        tail = await trio.to_thread.run_sync(saved_tail, layer) if saved_tail else None
        if tail is None:
            tail = await backend.read_range(layer.digest, layer.meta_offset, layer.meta_length + FOOTER_SIZE)
        metas[i] = (await trio.to_thread.run_sync(parse_tail, tail, layer.size))[1]

    async with open_nursery() as nursery:
        for i, layer in enumerate(manifest.layers):
            nursery.start_soon(one, i, layer)
    return Image(manifest, tuple((meta, layer.digest) for meta, layer in zip(metas, manifest.layers, strict=True)))
