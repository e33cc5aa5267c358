"""Startup traces stored next to their image, as referrer artifacts (registry or layout)."""

from __future__ import annotations

import logging

from lazyfs.errors import FormatError, LazyfsError
from lazyfs.fetch.trace import MAX_TRACE_BYTES, decode_trace, encode_trace
from lazyfs.format.layer import ChunkLocation
from lazyfs.format.oci import (
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_MANIFEST,
    MEDIA_TYPE_TRACE,
    Descriptor,
    parse_descriptor,
    parse_json,
    sha256_digest,
)
from lazyfs.image.layout import OciLayout
from lazyfs.image.referrers import (
    EMPTY_CONFIG,
    add_referrer_local,
    add_referrer_remote,
    artifact_manifest,
    find_referrers_local,
    find_referrers_remote,
)
from lazyfs.image.remote import ImageOpener, OpenedImage

log = logging.getLogger(__name__)
ARTIFACT_TYPE = "application/vnd.lazyfs.trace.v1+msgpack"


async def save_trace(opener: ImageOpener, opened: OpenedImage, locations: list[ChunkLocation]) -> str:
    """Store *locations* as the image's startup trace; return the trace manifest digest."""
    blob = encode_trace(locations)
    desc = Descriptor(MEDIA_TYPE_TRACE, sha256_digest(blob), len(blob))
    if opened.remote is not None:
        client, repo = opener.client, opened.remote.repo()
        subject = Descriptor(MEDIA_TYPE_MANIFEST, opened.image.manifest.digest,
                             (await client.head_manifest(repo.with_digest(opened.image.manifest.digest)))[2])
        await client.push_blob(repo, EMPTY_CONFIG)
        await client.push_blob(repo, blob, desc.digest)
        return await add_referrer_remote(client, repo, artifact_manifest(ARTIFACT_TYPE, desc, subject),
                                         ARTIFACT_TYPE, subject.digest, {"dev.lazyfs.trace.chunks": str(len(locations))})
    layout = OciLayout(opened.local.path)
    found = layout.resolve(opened.local.tag)
    subject = Descriptor(MEDIA_TYPE_MANIFEST, found.digest, found.size)
    layout.put_bytes(EMPTY_CONFIG)
    layout.put_bytes(blob, MEDIA_TYPE_TRACE)
    return add_referrer_local(layout, artifact_manifest(ARTIFACT_TYPE, desc, subject), ARTIFACT_TYPE, subject.digest,
                              {"dev.lazyfs.trace.chunks": str(len(locations))})


async def load_trace(opener: ImageOpener, opened: OpenedImage) -> tuple[ChunkLocation, ...] | None:
    """The newest stored startup trace of the image, or None. Damaged traces are logged and ignored."""
    digest = opened.image.manifest.digest
    try:
        if opened.remote is not None:
            client, repo = opener.client, opened.remote.repo()
            found = await find_referrers_remote(client, repo, digest, ARTIFACT_TYPE)
            if not found:
                return None
            manifest, _, _ = await client.get_manifest(repo.with_digest(found[-1]["digest"]))
            blob = _trace_blob(manifest)
            return decode_trace(await client.get_blob(repo, blob, max_size=MAX_TRACE_BYTES))
        layout = OciLayout(opened.local.path)
        found = find_referrers_local(layout, digest, ARTIFACT_TYPE)
        if not found:
            return None
        manifest = layout.read_blob(found[-1]["digest"], MAX_MANIFEST_SIZE)
        return decode_trace(layout.read_blob(_trace_blob(manifest), MAX_TRACE_BYTES))
    except LazyfsError as exc:
        log.warning("ignoring the startup trace of %s: %s", opened.name, exc)
        return None


def _trace_blob(manifest: bytes) -> str:
    """The digest of the one blob of a trace manifest (at most MAX_TRACE_BYTES)."""
    doc = parse_json(manifest, "trace manifest")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1:
        raise FormatError("trace manifest must have exactly one layer")
    blob = parse_descriptor(layers[0], "trace manifest layers[0]")
    if blob.size > MAX_TRACE_BYTES:
        raise FormatError(f"trace manifest: a trace of {blob.size} bytes (at most {MAX_TRACE_BYTES})")
    return blob.digest
