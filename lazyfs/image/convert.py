"""`lazyfs convert`: ordinary OCI / Docker images -> lazyfs images, one block layer per tar layer.

For each source layer, in order: download it, scan it (every name checked and
the diff ID verified before anything is written), grow the working ext4 if
the layer needs room, mount it read-write, apply the tar (``tarapply``),
unmount, normalize, and store the blocks that changed as a lazyfs layer
(deduplicated against the layers below). See docs/convert.md for why.

A layer is identified by the chain ID of its source layer (the layer over
exactly the layers below it) *and* the lazyfs layer it is a diff over, so
reusing it is sound when that claim is true. Reuse comes from the local
conversion cache (``<cache_root>/convert``) and from the target: the image
already under the target tag and the lazyfs twins listed for the source
manifest under the referrers fallback tag. A layer from the target is reused
only from an image the trust policy accepts (``lazyfs.image.trust``: converted
on this host, or signed by a trusted key): annotations alone are anyone's
claim. Only the layers after the first one not found are converted; the state
below them is materialized from the reused layers. Every image convert writes
is recorded in the host's conversion ledger.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from lazyfs.config import Config
from lazyfs.durable import write_atomically
from lazyfs.errors import ConfigError, FormatError, LazyfsError, NotFoundError, TrustError
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.direct import DirectChunkSource
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.registry import RegistryBackend, RegistryClient
from lazyfs.format.digest import chain_ids, sha256_digest
from lazyfs.format.layer import DEFAULT_CHUNK_SIZE, MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_V1, LayerMeta, MetadataBudget
from lazyfs.format.oci import (
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    parse_json,
    parse_manifest,
)
from lazyfs.format.ociimage import (
    ANN_SOURCE_MANIFEST,
    MAX_SOURCE_CONFIG,
    ConvertedLayer,
    SourceManifest,
    build_converted_config,
    build_converted_manifest,
    follow_index,
    host_platform,
    parse_converted_layers,
    parse_source_config,
    parse_source_manifest,
)
from lazyfs.format.reference import Reference, parse_reference
from lazyfs.image.build import known_chunks, write_layer
from lazyfs.image.image import ImageLimits, load_layer
from lazyfs.image.layout import OciLayout
from lazyfs.image.ref import LocalRef, parse_local_ref
from lazyfs.image.referrers import (
    add_referrer_local,
    add_referrer_remote,
    find_referrers_local,
    find_referrers_remote,
    referrers_subject,
)
from lazyfs.image.remote import FallbackBackend, ImageOpener
from lazyfs.image.tarapply import DEFAULT_MAX_LAYER_BYTES, LayerApplier, check_diff_id, open_layer, scan_layer
from lazyfs.image.trust import (
    ArtifactSource,
    HostLedger,
    LayoutSource,
    RegistrySource,
    TrustDecision,
    TrustPolicy,
    describe,
    load_trust_store,
)
from lazyfs.image.workfs import WorkFs
from lazyfs.nursery import open_nursery

TWIN_ARTIFACT_TYPE = MEDIA_TYPE_CONFIG  # a referrer's type is its config's media type when it has no artifactType
DOWNLOAD_CONCURRENCY = 3
MAX_REFERRER_TAGS = 64  # referrers fallback tags read when looking for reusable layers in the target
MAX_TWINS_CHECKED = 16  # twins of one image whose trust --prefer-lazyfs checks, newest first
POLL_SECONDS = 0.1


# ---------------------------------------------------------------- progress


class ConvertProgress:
    """Where conversion reports progress (bytes) of its phases: "download", "convert", "push".

    The default does nothing; ``lazyfs.image.progress.RichProgress`` draws bars.
    Methods may be called from worker threads.
    """

    def add_total(self, phase: str, n: int) -> None:
        pass

    def advance(self, phase: str, n: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass


# ---------------------------------------------------------------- the source image


@dataclass(slots=True)
class SourceImage:
    """The image to convert: one platform's manifest, its config, and how to get its layers."""

    text: str
    platform: str
    manifest: SourceManifest
    config: dict
    diff_ids: list[str]
    chains: list[str]
    layout: OciLayout | None = None
    client: RegistryClient | None = None
    ref: Reference | None = None

    async def fetch_layer(self, i: int, directory: str) -> str:
        """A local file holding layer *i* (verified against its digest when it is downloaded)."""
        layer = self.manifest.layers[i]
        if self.layout is not None:
            path = self.layout.blob_path(layer.digest)
            if not os.path.exists(path):
                raise NotFoundError(f"layer {layer.digest} of {self.text} is not in {self.layout.path}")
            return path  # its diff ID is verified when it is scanned
        assert self.client is not None and self.ref is not None
        dest = os.path.join(directory, f"layer-{i}-{layer.digest.split(':')[1][:16]}")
        await self.client.get_blob_to_file(self.ref.repo(), layer.digest, dest)
        return dest


async def open_source(client_of: Callable[[], RegistryClient], text: str, platform: str | None = None) -> SourceImage:
    """Resolve *text* (``oci:DIR[:TAG]`` or a registry reference) to one image manifest and its config."""
    platform = platform or host_platform()
    local = parse_local_ref(text)
    if local is not None:
        layout = OciLayout(local.path)
        data, desc = layout.read_manifest(local.tag)

        async def load_local(d: Descriptor) -> bytes:
            return layout.read_blob(d.digest)

        data, media_type, digest = await follow_index(data, desc.media_type, desc.digest, platform, text, load_local)
        manifest = parse_source_manifest(data, digest, media_type)
        config_bytes = layout.read_blob(manifest.config.digest, MAX_SOURCE_CONFIG)
        source = SourceImage(text, platform, manifest, {}, [], [], layout=layout)
    else:
        client = client_of()
        ref = parse_reference(text)
        data, media_type, digest = await client.get_manifest(ref, accept=MANIFEST_MEDIA_TYPES)

        async def load_remote(d: Descriptor) -> bytes:
            return (await client.get_manifest(ref.with_digest(d.digest), accept=MANIFEST_MEDIA_TYPES))[0]

        data, media_type, digest = await follow_index(data, media_type, digest, platform, text, load_remote)
        manifest = parse_source_manifest(data, digest, media_type)
        config_bytes = await client.get_blob(ref.repo(), manifest.config.digest, max_size=MAX_SOURCE_CONFIG)
        source = SourceImage(text, platform, manifest, {}, [], [], client=client, ref=ref.with_digest(digest))
    source.config, source.diff_ids = parse_source_config(config_bytes, f"config of {text}")
    if len(source.diff_ids) != len(manifest.layers):
        raise FormatError(f"{text}: {len(manifest.layers)} layers but {len(source.diff_ids)} diff IDs in its config")
    if not manifest.layers:
        raise FormatError(f"{text} has no layers: nothing to convert")
    source.chains = chain_ids(source.diff_ids)
    return source


# ---------------------------------------------------------------- the target


@dataclass(slots=True)
class Target:
    """Where the converted image goes: a layout directory and tag, or a registry repository and tag."""

    text: str
    layout: OciLayout | None = None
    tag: str = "latest"
    client: RegistryClient | None = None
    ref: Reference | None = None

    @property
    def backend(self) -> Backend:
        if self.layout is not None:
            return DirectoryBackend(self.layout.path)
        assert self.client is not None and self.ref is not None
        return RegistryBackend(self.client, self.ref.repo())

    @property
    def artifacts(self) -> ArtifactSource:
        """The target as the trust policy reads it."""
        if self.layout is not None:
            return LayoutSource(self.layout)
        assert self.client is not None and self.ref is not None
        return RegistrySource(self.client, self.ref.repo())

    async def current(self) -> bytes | None:
        """The manifest now under the target tag (None if there is none)."""
        try:
            if self.layout is not None:
                if not self.layout.exists():
                    return None
                return self.layout.read_manifest(self.tag)[0]
            assert self.client is not None and self.ref is not None
            return (await self.client.get_manifest(self.ref, accept=(MEDIA_TYPE_MANIFEST,)))[0]
        except NotFoundError:
            return None

    async def all_twins(self, limit: int = MAX_REFERRER_TAGS) -> list[bytes]:
        """Every converted image listed under any referrers fallback tag here (at most *limit* tags)."""
        if self.layout is not None:
            if not self.layout.exists():
                return []
            tags = [t for t in self.layout.tags() if referrers_subject(t)]
        else:
            assert self.client is not None and self.ref is not None
            try:
                tags = [t for t in await self.client.list_tags(self.ref.repo()) if referrers_subject(t)]
            except NotFoundError:
                return []
        out: dict[str, bytes] = {}
        for tag in sorted(tags)[:limit]:
            for data in await self.twins(referrers_subject(tag)):
                out.setdefault(sha256_digest(data), data)
        return list(out.values())

    async def twins(self, subject_digest: str) -> list[bytes]:
        """Converted images of *subject_digest* listed under its referrers fallback tag here."""
        out = []
        if self.layout is not None:
            if not self.layout.exists():
                return []
            for entry in find_referrers_local(self.layout, subject_digest, TWIN_ARTIFACT_TYPE):
                try:
                    out.append(self.layout.read_blob(entry["digest"]))
                except (NotFoundError, FormatError):
                    continue
            return out
        assert self.client is not None and self.ref is not None
        for entry in await find_referrers_remote(self.client, self.ref.repo(), subject_digest, TWIN_ARTIFACT_TYPE):
            try:
                out.append((await self.client.get_manifest(self.ref.with_digest(entry["digest"]),
                                                           accept=(MEDIA_TYPE_MANIFEST,)))[0])
            except (NotFoundError, FormatError):
                continue
        return out


def open_target(client_of: Callable[[], RegistryClient], text: str) -> Target:
    local = parse_local_ref(text)
    if local is not None:
        return Target(text, layout=OciLayout(local.path), tag=local.tag)
    ref = parse_reference(text)
    if ref.digest is not None:
        raise ConfigError(f"target {text!r} names a digest; give a tag (the digest is known only after converting)")
    ref = ref if ref.tag else ref.with_tag("latest")
    return Target(text, tag=ref.tag, client=client_of(), ref=ref)


# ---------------------------------------------------------------- the local cache


class ConvertCache:
    """Converted layers on this host: blobs in an OCI layout, one record per (chain ID, parent)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.layout = OciLayout(root).ensure()
        self.records = os.path.join(root, "chains")
        os.makedirs(self.records, exist_ok=True)

    def _record_path(self, chain_id: str, parent: str) -> str:
        below = parent.split(":")[-1][:16] if parent else "base"
        return os.path.join(self.records, f"{chain_id.split(':')[-1]}-{below}.json")

    def lookup(self, chain_id: str, parent: str, chunk_size: int) -> ConvertedLayer | None:
        try:
            with open(self._record_path(chain_id, parent), "rb") as f:
                layer = ConvertedLayer.from_json(json.loads(f.read()), "conversion cache record")
        except (OSError, ValueError, FormatError):
            return None
        if (layer.chain_id, layer.parent, layer.chunk_size) != (chain_id, parent, chunk_size):
            return None
        try:
            if os.path.getsize(self.layout.blob_path(layer.digest)) != layer.size:
                return None
        except OSError:
            return None
        return layer

    def store(self, layer: ConvertedLayer) -> None:
        path = self._record_path(layer.chain_id, layer.parent)
        write_atomically(path, json.dumps(layer.to_json(), sort_keys=True).encode())


# ---------------------------------------------------------------- converting


@dataclass(slots=True)
class LayerOutcome:
    layer: ConvertedLayer
    origin: str  # converted | cache | target
    seconds: float = 0.0
    tar_bytes: int = 0
    changed_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: scan, mkfs, apply (incl. normalize), write


async def _layer_meta(i: int, backend: Backend, layer: ConvertedLayer, limits: ImageLimits,
                      budget: MetadataBudget) -> LayerMeta:
    """One ranged read: a layer's metadata, checked against its meta-digest like any reader checks it."""
    return await load_layer(i, layer.descriptor, [backend], image="the reused layers", budget=budget,
                            max_virtual_size=limits.max_virtual_size)


def _candidates(manifests: list[bytes], chunk_size: int) -> dict[tuple[str, str], ConvertedLayer]:
    found: dict[tuple[str, str], ConvertedLayer] = {}
    for data in manifests:
        try:
            layers = parse_converted_layers(data)
        except FormatError:
            continue  # not something convert wrote
        for layer in layers:
            if layer.chunk_size == chunk_size:
                found.setdefault((layer.chain_id, layer.parent), layer)
    return found


def _offers(data: bytes, chains: set[str], chunk_size: int) -> bool:
    """Whether a manifest has a converted layer this conversion could reuse (only those are worth a trust check)."""
    try:
        layers = parse_converted_layers(data)
    except FormatError:
        return False
    return any(layer.chain_id in chains and layer.chunk_size == chunk_size for layer in layers)


def _apply_pinned(root: str, blob: str, compression: str, what: str, progress: ConvertProgress):
    """Apply one layer from a worker thread pinned to one CPU (ext4's small-file allocator is per CPU)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        with open_layer(blob, compression) as stream, LayerApplier(root, what) as applier:
            counting = _Counting(stream, lambda n: progress.advance("convert", n))
            report = applier.apply_stream(counting)
            counting.drain()
            return report
    finally:
        os.sched_setaffinity(0, before)


class _Counting:
    def __init__(self, inner, advance: Callable[[int], None]) -> None:
        self.inner, self.advance = inner, advance

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n if n is not None and n >= 0 else 1 << 20)
        if data:
            self.advance(len(data))
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


async def _polled(work: Callable, counter: Callable[[], int], advance: Callable[[int], None]):
    """Run *work()* while reporting how much *counter()* grows (registry byte counters)."""
    last = counter()
    async with open_nursery() as nursery:
        async def poll() -> None:
            nonlocal last
            while True:
                await trio.sleep(POLL_SECONDS)
                now = counter()
                advance(now - last)
                last = now

        nursery.start_soon(poll)
        result = await work()
        nursery.cancel_scope.cancel()
    advance(counter() - last)
    return result


class Converter:
    """One conversion of *source* into *target*."""

    def __init__(self, source: SourceImage, target: Target, cache: ConvertCache, chunk_size: int,
                 progress: ConvertProgress, work_root: str, reuse: bool = True,
                 limits: ImageLimits = ImageLimits(), max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES,
                 policy: TrustPolicy | None = None) -> None:
        self.source, self.target, self.cache = source, target, cache
        self.limits, self.max_layer_bytes = limits, max_layer_bytes
        self.reuse = reuse
        self.policy = policy or TrustPolicy()  # default: nothing from the target is trusted
        self.decisions: dict[str, TrustDecision] = {}  # manifest digest -> the policy's answer
        self.chunk_size = chunk_size
        self.progress = progress
        self.work_root = work_root
        self.outcomes: list[LayerOutcome] = []
        self.downloaded = 0
        self.materialize_seconds = 0.0

    # ------------------------------------------------------------ reuse

    async def plan_reuse(self) -> list[LayerOutcome]:
        """The longest run of bottom layers that exists already (local cache first, then trusted images in the target)."""
        manifests = [m for m in [await self.target.current()] if m is not None]
        manifests += await self.target.twins(self.source.manifest.digest)
        manifests = await self._trusted(manifests)
        reused = self._reusable(_candidates(manifests, self.chunk_size))
        if len(reused) < len(self.source.chains):  # look wider: every converted image in the target
            wider = self._reusable(_candidates(manifests + await self._trusted(await self.target.all_twins()),
                                               self.chunk_size))
            reused = wider if len(wider) > len(reused) else reused
        return reused

    async def _trusted(self, manifests: list[bytes]) -> list[bytes]:
        """The manifests whose layers may be reused: those the trust policy accepts (each asked once)."""
        chains = set(self.source.chains)
        out = []
        for data in manifests:
            if not _offers(data, chains, self.chunk_size):
                continue
            digest = sha256_digest(data)
            if digest not in self.decisions:
                self.decisions[digest] = await self.policy.check(self.target.artifacts, digest, None, data)
            if self.decisions[digest].trusted:
                out.append(data)
        return out

    @property
    def refused(self) -> list[TrustDecision]:
        return [d for d in self.decisions.values() if not d.trusted]

    def _reusable(self, remote: dict[tuple[str, str], ConvertedLayer]) -> list[LayerOutcome]:
        reused: list[LayerOutcome] = []
        parent = ""
        for i, chain in enumerate(self.source.chains):
            layer = self.cache.lookup(chain, parent, self.chunk_size)
            origin = "cache"
            if layer is None:
                layer, origin = remote.get((chain, parent)), "target"
            if layer is None or layer.source_diff_id != self.source.diff_ids[i]:
                break
            reused.append(LayerOutcome(layer, origin))
            parent = layer.digest
        return reused

    # ------------------------------------------------------------ the run

    async def run(self) -> list[LayerOutcome]:
        self.outcomes = await self.plan_reuse() if self.reuse else []
        start = len(self.outcomes)
        if start == len(self.source.manifest.layers):
            return self.outcomes
        with tempfile.TemporaryDirectory(prefix="convert-", dir=self.work_root) as work:
            blobs: dict[int, str] = {}
            ready = {i: trio.Event() for i in range(start, len(self.source.manifest.layers))}
            async with open_nursery() as nursery:  # downloads run ahead of the conversion
                nursery.start_soon(self._download_all, work, blobs, ready)
                await self._convert_from(start, work, blobs, ready)
        return self.outcomes

    async def _download_all(self, work: str, blobs: dict[int, str], ready: dict[int, trio.Event]) -> None:
        limiter = trio.CapacityLimiter(DOWNLOAD_CONCURRENCY)
        source = self.source
        if source.client is not None:
            self.progress.add_total("download", sum(source.manifest.layers[i].size for i in ready))

        async def one(i: int) -> None:
            layer = source.manifest.layers[i]
            what = f"layer {i} ({layer.digest[:19]}) of {source.text}"
            if layer.size > self.max_layer_bytes:
                raise FormatError(f"{what}: {layer.size} bytes, more than the {self.max_layer_bytes}-byte limit "
                                  f"(the config's convert_max_layer_bytes)")
            async with limiter:
                path = await source.fetch_layer(i, work)
                size = await trio.to_thread.run_sync(os.path.getsize, path)
                if size != layer.size:
                    raise FormatError(f"{what}: the blob is {size} bytes, its descriptor says {layer.size}")
                blobs[i] = path
                ready[i].set()

        async def all_of() -> None:
            async with open_nursery() as nursery:
                for i in sorted(ready):
                    nursery.start_soon(one, i)

        if source.client is not None:
            before = source.client.statistics().bytes_received
            await _polled(all_of, lambda: source.client.statistics().bytes_received,
                          lambda n: self.progress.advance("download", n))
            self.downloaded = source.client.statistics().bytes_received - before
        else:
            await all_of()

    async def _convert_from(self, start: int, work: str, blobs: dict[int, str], ready: dict[int, trio.Event]) -> None:
        fs = WorkFs(os.path.join(work, "fs"))
        os.makedirs(fs.directory, exist_ok=True)
        lower: list[tuple[LayerMeta, str]] = []
        if start > 0:
            lower = await self._materialize(fs)
        for i in range(start, len(self.source.manifest.layers)):
            await ready[i].wait()
            lower.append(await self._convert_layer(i, fs, blobs[i], lower))

    async def _materialize(self, fs: WorkFs) -> list[tuple[LayerMeta, str]]:
        """The working ext4 as the reused layers leave it, and their metadata."""
        backend = FallbackBackend([DirectoryBackend(self.cache.layout.path), self.target.backend])
        metas = []
        budget = MetadataBudget(self.limits.metadata_budget, "the reused layers")
        for i, outcome in enumerate(self.outcomes):
            meta = await _layer_meta(i, backend, outcome.layer, self.limits, budget)
            metas.append((meta, outcome.layer.digest))
        top = self.outcomes[-1].layer
        self.progress.note(f"materializing {len(metas)} reused layer(s) to convert the rest")
        started = time.monotonic()
        await fs.load(metas, DirectChunkSource(backend), top.virtual_size)
        self.materialize_seconds = round(time.monotonic() - started, 3)
        return metas

    async def _convert_layer(self, i: int, fs: WorkFs, blob: str,
                             lower: list[tuple[LayerMeta, str]]) -> tuple[LayerMeta, str]:
        started = time.monotonic()
        source_layer = self.source.manifest.layers[i]
        what = f"layer {i} ({source_layer.digest[:19]}) of {self.source.text}"
        compression = source_layer.compression
        progress = self.progress
        phases: dict[str, float] = {}

        def lap(name: str) -> None:
            phases[name] = max(0.0, round(time.monotonic() - started - sum(phases.values()), 3))

        if compression != "none":  # decompress once: the scan keeps the tar for the apply
            spool = os.path.join(fs.directory, "layer.tar")
            try:
                scanned = await trio.to_thread.run_sync(scan_layer, blob, compression, what, None, spool,
                                                        self.max_layer_bytes)
            except LazyfsError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spool)  # what a refused layer left is no use to anyone
                raise
            blob, compression = spool, "none"
        else:
            scanned = await trio.to_thread.run_sync(scan_layer, blob, compression, what, None, None,
                                                    self.max_layer_bytes)
        check_diff_id(scanned, self.source.diff_ids[i], what)
        progress.add_total("convert", scanned.stats.tar_bytes)
        lap("scan")
        await fs.make_room(scanned.stats, self.source.chains[0])
        lap("mkfs")
        async with fs.mounted() as root:
            report = await trio.to_thread.run_sync(_apply_pinned, root, blob, compression, what, progress)
        lap("apply")
        if blob.startswith(fs.directory):
            os.unlink(blob)
        parent = lower[-1][1] if lower else ""
        layout = self.cache.layout
        built = await trio.to_thread.run_sync(
            lambda: write_layer(layout, fs.changed_pieces(self.chunk_size), fs.size, self.chunk_size,
                                known_chunks(lower), mask_zeros=True))
        d = built.descriptor
        layer = ConvertedLayer(d, fs.size, self.chunk_size,
                               self.source.chains[i], source_layer.digest, self.source.diff_ids[i], parent)
        self.cache.store(layer)
        lap("write")
        self.outcomes.append(LayerOutcome(layer, "converted", round(time.monotonic() - started, 3),
                                          scanned.stats.tar_bytes, built.stats.raw_bytes, report.warnings, phases))
        return built.meta, d.digest


# ---------------------------------------------------------------- output


async def _write_layout(target: Target, cache: ConvertCache, outcomes: list[LayerOutcome],
                        config: bytes, manifest: bytes, subject: str) -> dict:
    layout = target.layout
    assert layout is not None
    layout.ensure()
    copied = copied_bytes = copied_layers = 0
    for outcome in outcomes:
        digest = outcome.layer.digest
        if layout.has_blob(digest):
            continue
        src = cache.layout.blob_path(digest)
        try:
            os.link(src, layout.blob_path(digest))
        except OSError:
            shutil.copyfile(src, layout.blob_path(digest))
        copied += 1
        copied_layers += 1
        copied_bytes += outcome.layer.size
    if not layout.has_blob(sha256_digest(config)):
        layout.put_bytes(config, MEDIA_TYPE_CONFIG)
        copied += 1
        copied_bytes += len(config)
    desc = layout.put_manifest(manifest, target.tag)
    add_referrer_local(layout, manifest, TWIN_ARTIFACT_TYPE, subject, {ANN_SOURCE_MANIFEST: subject})
    return {"manifest": desc.digest, "blobs_pushed": copied, "layers_pushed": copied_layers,
            "bytes_pushed": copied_bytes}


async def _push_registry(target: Target, cache: ConvertCache, outcomes: list[LayerOutcome], config: bytes,
                         manifest: bytes, subject: str, progress: ConvertProgress) -> dict:
    client, ref = target.client, target.ref
    assert client is not None and ref is not None
    repo = ref.repo()
    uploads = [o for o in outcomes if o.origin != "target"]
    progress.add_total("push", sum(o.layer.size for o in uploads) + len(config))
    pushed = {"blobs": 0, "bytes": 0, "layers": 0}

    async def push_all() -> None:
        for o in uploads:
            path = cache.layout.blob_path(o.layer.digest)
            result = await client.push_blob(repo, path, o.layer.digest,
                                            chunk_size=(16 << 20) if o.layer.size > (64 << 20) else None)
            if result.outcome == "uploaded":
                pushed["blobs"] += 1
                pushed["layers"] += 1
                pushed["bytes"] += o.layer.size
        result = await client.push_blob(repo, config, sha256_digest(config))
        if result.outcome == "uploaded":
            pushed["blobs"] += 1
            pushed["bytes"] += len(config)

    await _polled(push_all, lambda: client.statistics().bytes_sent, lambda n: progress.advance("push", n))
    digest = await client.put_manifest(ref, manifest, MEDIA_TYPE_MANIFEST)
    await add_referrer_remote(client, repo, manifest, TWIN_ARTIFACT_TYPE, subject, {ANN_SOURCE_MANIFEST: subject})
    return {"manifest": digest, "blobs_pushed": pushed["blobs"], "layers_pushed": pushed["layers"],
            "bytes_pushed": pushed["bytes"]}


def default_cache_dir(config: Config) -> str:
    return os.path.join(config.cache_root, "convert")


async def convert_image(opener: ImageOpener, source_text: str, target_text: str, *, platform: str | None = None,
                        chunk_size: int = DEFAULT_CHUNK_SIZE, use_cache: bool = True, cache_dir: str | None = None,
                        progress: ConvertProgress | None = None) -> dict:
    """Convert *source_text* into a lazyfs image at *target_text*; a summary of what happened."""
    started = time.monotonic()
    progress = progress or ConvertProgress()
    if chunk_size <= 0 or chunk_size & (chunk_size - 1) or chunk_size < 4096:
        raise ConfigError(f"--chunk-size {chunk_size} must be a power of two of at least 4096")
    if os.geteuid() != 0:
        raise ConfigError("lazyfs convert needs root: layers are applied by the kernel's ext4 on a loop device")
    source = await open_source(lambda: opener.client, source_text, platform)
    target = open_target(lambda: opener.client, target_text)
    cache_root = cache_dir or default_cache_dir(opener.config)
    for private in ((opener.config.cache_root,) if cache_dir is None else ()) + (cache_root,):
        os.makedirs(private, mode=0o700, exist_ok=True)  # converted layers of private images: root's alone
        os.chmod(private, 0o700)
    ledger = HostLedger(os.path.join(cache_root, "converted"))
    policy = TrustPolicy((ledger,), load_trust_store(opener.config.trust))
    # Without the cache, converted blobs still need a home: a scratch layout, removed afterwards.
    scratch = None if use_cache else tempfile.mkdtemp(prefix="scratch-", dir=cache_root)
    try:
        cache = ConvertCache(scratch or cache_root)
        converter = Converter(source, target, cache, chunk_size, progress, cache_root, reuse=use_cache,
                              limits=opener.limits, max_layer_bytes=opener.config.convert_max_layer_bytes,
                              policy=policy)
        outcomes = await converter.run()
        layers = [o.layer for o in outcomes]
        config = build_converted_config(source.config, layers)
        config_desc = Descriptor(MEDIA_TYPE_CONFIG, sha256_digest(config), len(config))
        manifest = build_converted_manifest(config_desc, layers, source.manifest.descriptor)
        parse_manifest(manifest, opener.limits.max_virtual_size)  # what mount will read: check it now
        subject = source.manifest.digest
        if target.layout is not None:
            written = await _write_layout(target, cache, outcomes, config, manifest, subject)
        else:
            written = await _push_registry(target, cache, outcomes, config, manifest, subject, progress)
        # this host wrote the manifest, from layers it converted or accepted: it trusts it from now on
        await trio.to_thread.run_sync(ledger.record, written["manifest"], {
            "source": source_text, "source_manifest": subject, "target": target_text, "recorded": int(time.time())})
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {
        "source": source_text,
        "source_manifest": source.manifest.digest,
        "platform": source.platform,
        "target": target_text,
        "manifest": written["manifest"],
        "config": config_desc.digest,
        "virtual_size": layers[-1].virtual_size,
        "layers": [{"source_digest": o.layer.source_digest, "chain_id": o.layer.chain_id,
                    "digest": o.layer.digest, "size": o.layer.size, "virtual_size": o.layer.virtual_size,
                    "origin": o.origin, "seconds": o.seconds, "tar_bytes": o.tar_bytes,
                    "changed_bytes": o.changed_bytes, **({"phases": o.phases} if o.phases else {}),
                    **({"warnings": o.warnings} if o.warnings else {})}
                   for o in outcomes],
        "layers_converted": sum(o.origin == "converted" for o in outcomes),
        "layers_reused": sum(o.origin != "converted" for o in outcomes),
        "untrusted_images": [d.to_json() for d in converter.refused],
        "source_bytes": sum(layer.size for layer in source.manifest.layers),
        "image_bytes": sum(layer.size for layer in layers) + len(config) + len(manifest),
        "bytes_downloaded": converter.downloaded,
        "materialize_seconds": converter.materialize_seconds,
        "blobs_pushed": written["blobs_pushed"],
        "layers_pushed": written["layers_pushed"],
        "bytes_pushed": written["bytes_pushed"],
        "seconds": round(time.monotonic() - started, 3),
    }


# ---------------------------------------------------------------- finding a twin


@dataclass(frozen=True, slots=True)
class TwinChoice:
    """What ``--prefer-lazyfs`` mounts for a reference, and why."""

    ref: str  # the image to mount
    named: str  # the reference the user gave
    source_manifest: str | None = None  # the ordinary image's manifest digest; None: *named* is a lazyfs image
    decision: TrustDecision | None = None  # why the twin is trusted
    refused: tuple[TrustDecision, ...] = ()  # newer twins the policy refused

    @property
    def replaced(self) -> bool:
        return self.source_manifest is not None

    def note(self) -> str:
        """The line that tells the user what was mounted instead of what they named."""
        if not self.replaced:
            return ""
        pinned = "@sha256:" in self.named
        what = f"{self.named} is {'pinned to' if pinned else 'the ordinary image'} {self.source_manifest}"
        because = self.decision.reason if self.decision else ""
        skipped = f"; {len(self.refused)} newer twin(s) refused" if self.refused else ""
        return f"{what}; mounted its lazyfs twin {self.ref} instead ({because}{skipped})"

    def to_json(self) -> dict:
        return {"named": self.named, "mounted": self.ref, "source_manifest": self.source_manifest,
                "trust": self.decision.to_json() if self.decision else None,
                "refused": [d.to_json() for d in self.refused]}


async def _first_trusted(policy: TrustPolicy, source: ArtifactSource, twins: list[str], subject: str,
                         text: str) -> tuple[str, TrustDecision, tuple[TrustDecision, ...]]:
    """The newest twin the policy trusts for *subject* (TrustError listing why each was refused)."""
    refused = []
    for twin in reversed(twins[-MAX_TWINS_CHECKED:]):
        decision = await policy.check(source, twin, subject)
        if decision.trusted:
            return twin, decision, tuple(refused)
        refused.append(decision)
    raise TrustError(f"no trusted lazyfs twin of {text} ({subject}): {describe(refused)}. Convert it on this host, "
                     f"or sign the twin and list the signer's root in trust.trust_store (docs/trust.md)")


async def find_lazyfs_twin(opener: ImageOpener, text: str, platform: str | None = None,
                           policy: TrustPolicy | None = None) -> TwinChoice:
    """The lazyfs image converted from *text* that this host trusts (or *text* itself if it is lazyfs already).

    Twins are listed under the referrers fallback tag of *text*'s manifest by anyone who
    can push there; only one the trust policy accepts is used, the newest such.
    """
    platform = platform or host_platform()
    local = parse_local_ref(text)
    if local is not None:
        layout = OciLayout(local.path)
        data, desc = layout.read_manifest(local.tag)
        if _is_lazyfs(data):
            return TwinChoice(text, text)

        async def load_local(d: Descriptor) -> bytes:
            return layout.read_blob(d.digest)

        _, _, digest = await follow_index(data, desc.media_type, desc.digest, platform, text, load_local)
        tags = {d.digest: tag for tag, d in layout.tags().items()}
        twins = [e["digest"] for e in find_referrers_local(layout, digest, TWIN_ARTIFACT_TYPE)
                 if (e.get("annotations") or {}).get(ANN_SOURCE_MANIFEST) == digest and e["digest"] in tags]
        if not twins:
            raise NotFoundError(f"no lazyfs image converted from {text} ({digest}) in {layout.path}; "
                                f"run lazyfs convert first")
        policy = policy or TrustPolicy.from_config(opener.config)
        twin, decision, refused = await _first_trusted(policy, LayoutSource(layout), twins, digest, text)
        return TwinChoice(str(LocalRef(layout.path, tags[twin])), text, digest, decision, refused)
    client = opener.client
    ref = parse_reference(text)
    data, media_type, digest = await client.get_manifest(ref, accept=MANIFEST_MEDIA_TYPES)
    if _is_lazyfs(data):
        return TwinChoice(text, text)

    async def load_remote(d: Descriptor) -> bytes:
        return (await client.get_manifest(ref.with_digest(d.digest), accept=MANIFEST_MEDIA_TYPES))[0]

    _, _, digest = await follow_index(data, media_type, digest, platform, text, load_remote)
    twins = [e["digest"] for e in await find_referrers_remote(client, ref.repo(), digest, TWIN_ARTIFACT_TYPE)
             if (e.get("annotations") or {}).get(ANN_SOURCE_MANIFEST) == digest]
    if not twins:
        raise NotFoundError(f"no lazyfs image converted from {text} ({digest}) in {ref.name}; run lazyfs convert first")
    policy = policy or TrustPolicy.from_config(opener.config)
    twin, decision, refused = await _first_trusted(policy, RegistrySource(client, ref.repo()), twins, digest, text)
    return TwinChoice(str(ref.repo().with_digest(twin)), text, digest, decision, refused)


def _is_lazyfs(data: bytes) -> bool:
    """Whether *data* is a lazyfs manifest (of any format version: opening it says what is wrong with it)."""
    try:
        layers = parse_json(data, "manifest").get("layers")
    except LazyfsError:
        return False
    return isinstance(layers, list) and any(isinstance(layer, dict) and layer.get("mediaType") in
                                            (MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_V1) for layer in layers)


def resolve_twin_blocking(config: Config, text: str) -> TwinChoice:
    """``find_lazyfs_twin`` for synchronous callers (the mount command)."""

    async def run() -> TwinChoice:
        async with ImageOpener(config) as opener:
            return await find_lazyfs_twin(opener, text)

    return trio.run(run)
