"""Commit a writable layer of an opened image into a new image, local or in a registry."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
import shutil
import tempfile

import trio

from lazyfs.errors import NotFoundError

from lazyfs.device.writable import WritableLayer
from lazyfs.format.layer import DEFAULT_CHUNK_SIZE
from lazyfs.format.oci import MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST, build_config, build_manifest, parse_json
from lazyfs.format.reference import parse_reference
from lazyfs.image.build import layer_from_writable
from lazyfs.image.layout import OciLayout
from lazyfs.image.local import copy_blobs
from lazyfs.image.ref import parse_local_ref
from lazyfs.image.remote import ANN_SOURCE, MAX_CONFIG_SIZE, ImageOpener, OpenedImage


async def _base_config(opener: ImageOpener, opened: OpenedImage) -> dict:
    digest = opened.image.manifest.config.digest

    def local() -> bytes | None:
        if opened.local is not None and OciLayout(opened.local.path).has_blob(digest):
            return OciLayout(opened.local.path).read_blob(digest)
        return None

    data = await trio.to_thread.run_sync(local)
    if data is None:
        data = await opener.client.get_blob(opened.remote.repo(), digest, max_size=MAX_CONFIG_SIZE)
    return parse_json(data, f"config of {opened.name}", MAX_CONFIG_SIZE)


async def commit_writable(opener: ImageOpener, opened: OpenedImage, layer: WritableLayer, out: str,
                          chunk_size: int = DEFAULT_CHUNK_SIZE, *,
                          hold: Callable[[], AbstractAsyncContextManager] | None = None) -> dict:
    """The image *opened* plus *layer* as one more read-only layer, stored as *out*.

    *hold* (e.g. ``MergedDevice.writes_held``) keeps writes away from *layer* while the new
    layer is read out of it, and only then: not while the registry is asked for the base's
    config, nor while the result is pushed (the built layer is a copy by then). Without
    *hold*, the caller keeps writes away for the whole call.
    """
    config = await _base_config(opener, opened)
    local_out = parse_local_ref(out)
    staging = None
    if local_out is not None:
        layout = await trio.to_thread.run_sync(OciLayout(local_out.path).ensure)
    else:
        staging = await trio.to_thread.run_sync(
            lambda: tempfile.mkdtemp(prefix="lazyfs-commit-", dir=os.path.dirname(layer.root)))
        layout = await trio.to_thread.run_sync(OciLayout(staging).ensure)
    try:
        async with hold() if hold is not None else contextlib.nullcontext():
            built = await trio.to_thread.run_sync(layer_from_writable, layout, layer, opened.image.layers, chunk_size)
        layers = list(opened.image.manifest.layers) + [built.descriptor]
        summary = {"layer": built.descriptor.digest, "layer_size": built.descriptor.size,
                   "chunks_stored": built.stats.chunks_stored, "chunks_deduplicated": built.stats.chunks_deduplicated,
                   "raw_bytes": built.stats.raw_bytes}
        base_blobs = sorted(opened.blobs)
        if local_out is not None:
            def store_local() -> str:  # copies and fsyncs: in a worker thread
                annotations = None
                if opened.local is not None and all(OciLayout(opened.local.path).has_blob(b) for b in base_blobs):
                    copy_blobs(OciLayout(opened.local.path), layout, base_blobs)
                else:  # the base lives in a registry: the new image points at it for the lower layers
                    annotations = {ANN_SOURCE: str(opened.remote)}
                cfg = layout.put_bytes(build_config([l.digest for l in layers], config), MEDIA_TYPE_CONFIG)
                manifest = build_manifest(cfg, layers, opened.image.virtual_size)
                return layout.put_manifest(manifest, local_out.tag, annotations=annotations).digest

            digest = await trio.to_thread.run_sync(store_local)
            return {"image": str(local_out), "manifest": digest, **summary}
        target = parse_reference(out)
        client, repo = await opener.ensure_client(), target.repo()
        for blob in base_blobs:
            await _ensure_blob(opener, opened, repo, blob, staging or layout.path)
        await client.push_blob(repo, layout.blob_path(built.descriptor.digest), built.descriptor.digest)
        cfg_bytes = build_config([l.digest for l in layers], config)
        cfg = await trio.to_thread.run_sync(layout.put_bytes, cfg_bytes, MEDIA_TYPE_CONFIG)
        await client.push_blob(repo, cfg_bytes, cfg.digest)
        manifest = build_manifest(cfg, layers, opened.image.virtual_size)
        digest = await client.put_manifest(target if target.tag or target.digest else target.with_tag("latest"),
                                           manifest, MEDIA_TYPE_MANIFEST)
        return {"image": str(target), "manifest": digest, **summary}
    finally:
        if staging is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))


async def _ensure_blob(opener: ImageOpener, opened: OpenedImage, repo, blob: str, scratch: str) -> None:
    """Make a lower layer's blob exist in *repo*: from the local layout, or copied within the registry."""
    client = opener.client
    if opened.local is not None and await trio.to_thread.run_sync(OciLayout(opened.local.path).has_blob, blob):
        await client.push_blob(repo, OciLayout(opened.local.path).blob_path(blob), blob)
        return
    with contextlib.suppress(NotFoundError):
        await client.blob_size(repo, blob)
        return  # already there (same repository, or pushed before)
    same_registry = opened.remote is not None and opened.remote.registry == repo.registry
    path = os.path.join(scratch, "lower-" + blob.split(":")[1])
    await client.get_blob_to_file(opened.remote.repo(), blob, path)  # the fallback if a mount is refused
    try:
        await client.push_blob(repo, path, blob, mount_from=opened.remote.repository if same_registry else None)
    finally:
        os.unlink(path)
