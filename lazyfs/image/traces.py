"""Startup traces stored next to their image, as referrer artifacts (registry or layout).

A trace is anyone's claim (whoever can push to the repository can list one), so
a host replays one only after checking every entry against the image's own
chunk tables: a trace that names a chunk the image does not have (another
digest, blob, offset, length or compression) is ignored whole and counted
(``LoadedTrace.foreign``). Hosts publish traces only when the config says so
(``trace_publish``, off by default); see docs/trust.md.

The referrers entry of a trace names its blob in an annotation (``ANN_TRACE_BLOB``), so a lookup
reads the referrers and then the blob: one request fewer before a cold start's replay than
through the trace's manifest, which a trace stored without the annotation still takes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from lazyfs.errors import FormatError, LazyfsError
from lazyfs.fetch.registry import RegistryClient
from lazyfs.fetch.trace import MAX_TRACE_BYTES, SPAN_ENTRY, decode_trace, encode_trace
from lazyfs.format.digest import check_sha256, sha256_digest
from lazyfs.format.layer import ChunkLocation
from lazyfs.format.reference import Reference
from lazyfs.format.spanindex import SpanLocation
from lazyfs.format.oci import (
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_MANIFEST,
    MEDIA_TYPE_TRACE,
    Descriptor,
    parse_descriptor,
    parse_json,
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
from lazyfs.image.image import Image
from lazyfs.image.remote import ImageOpener, OpenedImage

log = logging.getLogger(__name__)
ARTIFACT_TYPE = "application/vnd.lazyfs.trace.v1+msgpack"
MAX_TRACES_TRIED = 4  # newest first: a forged newest trace does not hide an older good one
ANN_TRACE_CHUNKS = "dev.lazyfs.trace.chunks"
ANN_TRACE_BLOB = "dev.lazyfs.trace.blob"  # the digest of the trace's blob (its manifest's one layer)


@dataclass(frozen=True, slots=True)
class LoadedTrace:
    """A stored trace checked against the image: *locations* to replay, or none if it named foreign chunks."""

    manifest: str  # the trace artifact's manifest digest
    locations: tuple[ChunkLocation, ...]
    entries: int  # entries in the stored trace
    foreign: int  # entries naming no chunk of the image (then nothing is replayed)

    def __bool__(self) -> bool:
        return bool(self.locations)

    def __len__(self) -> int:
        return len(self.locations)


def resolve_trace(trace: Sequence[ChunkLocation], image: Image) -> tuple[tuple[ChunkLocation, ...], int]:
    """*trace* as locations of *image*, and how many of its entries are none of them.

    A chunk entry must be a chunk location of the image (digest, blob, offset, lengths,
    compression); a span entry (``SPAN_ENTRY``) must be a span of one of the image's span
    maps (digest, source blob, range, length), and becomes that ``SpanLocation`` (how to
    decode it comes from the trusted index, never from the trace). Memory is bounded by the
    trace: only locations whose digest the trace names are collected.
    """
    wanted = {loc.digest for loc in trace}
    known: set[ChunkLocation] = set()
    for meta, blob in image.layers:
        for ref in meta.chunks:
            if ref.digest in wanted:
                known.add(ChunkLocation(ref.digest, meta.blob_of(ref, blob), ref.offset, ref.compressed_length,
                                        ref.raw_length, ref.compression))
    spans: dict[tuple, SpanLocation] = {}
    if any(loc.compression == SPAN_ENTRY for loc in trace):
        for span_map in image.mapped:
            for span in span_map.spans if span_map is not None else ():
                if span.digest in wanted:
                    spans.setdefault((span.digest, span.blob, span.offset, span.compressed_length, span.raw_length),
                                     span)
    out: list[ChunkLocation] = []
    foreign = 0
    for loc in trace:
        if loc.compression == SPAN_ENTRY:
            span = spans.get((loc.digest, loc.blob, loc.offset, loc.compressed_length, loc.raw_length))
            if span is None:
                foreign += 1
            else:
                out.append(span)
        elif loc in known:
            out.append(loc)
        else:
            foreign += 1
    return tuple(out), foreign


def foreign_entries(trace: Sequence[ChunkLocation], image: Image) -> int:
    """How many entries of *trace* are no chunk or span location of *image* (``resolve_trace``)."""
    return resolve_trace(trace, image)[1]


async def save_trace(opener: ImageOpener, opened: OpenedImage, locations: list[ChunkLocation]) -> str:
    """Store *locations* as the image's startup trace; return the trace manifest digest."""
    blob = encode_trace(locations)
    if len(blob) > MAX_TRACE_BYTES:
        raise FormatError(f"trace of {len(locations)} chunks: {len(blob)} bytes, more than {MAX_TRACE_BYTES}")
    desc = Descriptor(MEDIA_TYPE_TRACE, sha256_digest(blob), len(blob))
    annotations = {ANN_TRACE_CHUNKS: str(len(locations)), ANN_TRACE_BLOB: desc.digest}
    if opened.remote is not None:
        client, repo = opener.client, opened.remote.repo()
        subject = Descriptor(MEDIA_TYPE_MANIFEST, opened.image.manifest.digest,
                             (await client.head_manifest(repo.with_digest(opened.image.manifest.digest)))[2])
        await client.push_blob(repo, EMPTY_CONFIG)
        await client.push_blob(repo, blob, desc.digest)
        return await add_referrer_remote(client, repo, artifact_manifest(ARTIFACT_TYPE, desc, subject),
                                         ARTIFACT_TYPE, subject.digest, annotations)

    def store_local() -> str:  # file I/O (fsyncs): in a worker thread
        layout = OciLayout(opened.local.path)
        found = layout.resolve(opened.local.tag)
        subject = Descriptor(MEDIA_TYPE_MANIFEST, found.digest, found.size)
        layout.put_bytes(EMPTY_CONFIG)
        layout.put_bytes(blob, MEDIA_TYPE_TRACE)
        return add_referrer_local(layout, artifact_manifest(ARTIFACT_TYPE, desc, subject), ARTIFACT_TYPE,
                                  subject.digest, annotations)

    return await trio.to_thread.run_sync(store_local)


class RemoteTraces:
    """The registry's half of a trace lookup: the image's trace referrers, newest first, and the
    newest one read. It needs only the manifest digest, so an attach starts it as soon as the
    manifest is fetched, while the chunk tables are still on the way (``Host``); ``load_trace``
    checks what it read against the image afterwards, as it checks a trace it reads itself."""

    def __init__(self, repo: Reference, found: list[dict]) -> None:
        self.repo = repo
        self.found = found
        self._read: dict[str, tuple[ChunkLocation, ...] | LazyfsError] = {}

    @classmethod
    async def fetch(cls, client: RegistryClient, repo: Reference, digest: str) -> "RemoteTraces":
        """List the traces of manifest *digest* in *repo* and read the newest (an error reading it
        is kept for ``read``); an error listing them is raised."""
        traces = cls(repo, await find_referrers_remote(client, repo, digest, ARTIFACT_TYPE))
        newest = _newest_first(traces.found)
        if newest:
            manifest_digest = str(newest[0].get("digest"))
            try:
                traces._read[manifest_digest] = await traces._read_now(client, newest[0])
            except LazyfsError as exc:
                traces._read[manifest_digest] = exc
        return traces

    async def read(self, client: RegistryClient, entry: dict) -> tuple[ChunkLocation, ...]:
        """The stored entries of the trace referrers *entry* lists: as read ahead, else read now."""
        got = self._read.pop(str(entry.get("digest")), None)
        if got is None:
            return await self._read_now(client, entry)
        if isinstance(got, LazyfsError):
            raise got
        return got

    async def _read_now(self, client: RegistryClient, entry: dict) -> tuple[ChunkLocation, ...]:
        blob = _annotated_blob(entry)
        if blob is None:
            manifest, _, _ = await client.get_manifest(self.repo.with_digest(str(entry.get("digest"))))
            blob = _trace_blob(manifest)
        return decode_trace(await client.get_blob(self.repo, blob, max_size=MAX_TRACE_BYTES))


async def load_trace(opener: ImageOpener, opened: OpenedImage,
                     early: RemoteTraces | LazyfsError | None = None) -> LoadedTrace | None:
    """The newest stored startup trace of the image whose every entry is a chunk of the image, or None.

    Up to MAX_TRACES_TRIED traces are read, newest first; one naming foreign chunks is
    skipped and counted (the result's ``foreign``, or a LoadedTrace with no locations if
    none passes). Damaged traces are logged and skipped. *early*: the registry's half of the
    lookup, started before the image was opened (``RemoteTraces.fetch``), or the error it met.
    """
    digest = opened.image.manifest.digest
    if opened.remote is not None:
        client, repo = opener.client, opened.remote.repo()
        try:
            if isinstance(early, LazyfsError):
                raise early
            remote = early if early is not None else await RemoteTraces.fetch(client, repo, digest)
        except LazyfsError as exc:
            log.warning("ignoring the startup traces of %s: %s", opened.name, exc)
            return None
        found = remote.found

        async def read(entry: dict) -> tuple[ChunkLocation, ...]:
            return await remote.read(client, entry)
    else:
        layout = OciLayout(opened.local.path)
        try:
            found = await trio.to_thread.run_sync(find_referrers_local, layout, digest, ARTIFACT_TYPE)
        except LazyfsError as exc:
            log.warning("ignoring the startup traces of %s: %s", opened.name, exc)
            return None

        def read_local(entry: dict) -> tuple[ChunkLocation, ...]:
            blob = _annotated_blob(entry)
            if blob is None:
                blob = _trace_blob(layout.read_blob(str(entry.get("digest")), MAX_MANIFEST_SIZE))
            return decode_trace(layout.read_blob(blob, MAX_TRACE_BYTES))

        async def read(entry: dict) -> tuple[ChunkLocation, ...]:
            return await trio.to_thread.run_sync(read_local, entry)

    rejected: LoadedTrace | None = None
    foreign = 0
    for entry in _newest_first(found):
        manifest_digest = str(entry.get("digest"))
        try:
            stored = await read(entry)
        except LazyfsError as exc:
            log.warning("ignoring the startup trace %s of %s: %s", manifest_digest, opened.name, exc)
            continue
        locations, bad = await trio.to_thread.run_sync(resolve_trace, stored, opened.image)
        if bad:
            foreign += bad
            log.warning("ignoring the startup trace %s of %s: %d of its %d entries name chunks or spans the image "
                        "does not have", manifest_digest, opened.name, bad, len(stored))
            rejected = rejected or LoadedTrace(manifest_digest, (), len(stored), bad)
            continue
        return LoadedTrace(manifest_digest, locations, len(stored), foreign)
    if rejected is not None:
        return LoadedTrace(rejected.manifest, (), rejected.entries, foreign)
    return None


def _newest_first(found: list[dict]) -> list[dict]:
    """The traces a lookup tries, newest first (referrers list the newest last)."""
    return found[::-1][:MAX_TRACES_TRIED]


def _annotated_blob(entry: dict) -> str | None:
    """The trace blob a referrers *entry* names in its annotations, or None (a trace stored without)."""
    blob = (entry.get("annotations") or {}).get(ANN_TRACE_BLOB)
    return None if blob is None else check_sha256(blob, f"referrers index: {ANN_TRACE_BLOB}")


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
