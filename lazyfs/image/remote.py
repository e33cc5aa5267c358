"""Opening images wherever they are (layout, pulled layout, registry); push and pull."""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio


from lazyfs.config import Config
from lazyfs.durable import write_atomically
from lazyfs.errors import FetchError, LazyfsError, NotFoundError
from lazyfs.fetch.backend import Backend, SourcedBytes
from lazyfs.fetch.credentials import Credentials
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.registry import ProxySettings, RegistryBackend, RegistryClient, RegistryConfig, RetryPolicy
from lazyfs.fetch.registry.certsd import load_hosts_dir
from lazyfs.fetch.registry.hosts import HostsEntry
from lazyfs.format.oci import MANIFEST_MEDIA_TYPES, MEDIA_TYPE_MANIFEST, ImageManifest, parse_json, parse_manifest
from lazyfs.format.reference import Reference, parse_reference
from lazyfs.image.image import Image, ImageLimits, load_image
from lazyfs.image.layout import OciLayout
from lazyfs.image.ref import LocalRef, parse_local_ref

MAX_CONFIG_SIZE = 4 << 20  # an image config is small JSON; more is an attack or a bug
ANN_SOURCE = "dev.lazyfs.source"  # on a pulled layout's index entry: where its blobs live
META_DIR = "lazyfs-meta"  # in a pulled layout: layer metadata tails, one file per blob


@dataclass(frozen=True, slots=True)
class OpenedImage:
    """An image and where its chunks come from."""

    name: str  # the reference as given
    image: Image
    backend: Backend
    local: LocalRef | None = None
    remote: Reference | None = None
    via: str = ""  # how an ordinary image was opened ("index <digest> (why it is trusted)"); "" for lazyfs images

    @property
    def backends(self) -> list[Backend]:
        """Where chunks come from: the one backend, which picks among its sources (mirrors, the
        registry) itself. The scheduler reads again with a source excluded when its bytes fail
        verification."""
        return [self.backend]

    @property
    def blobs(self) -> set[str]:
        """Every blob any chunk of the image can come from (an index's span map blobs among them: stored
        windows are read from there)."""
        mapped = [m for m in self.image.mapped if m is not None]
        return {loc.blob for meta, digest in self.image.layers for loc in meta.locations(digest)} | {
            digest for _, digest in self.image.layers} | {m.source_digest for m in mapped} | {
            m.windows_blob for m in mapped if m.windows_blob}


class FallbackBackend(Backend):
    """Each blob from the first backend that has it (NotFoundError moves on to the next)."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends
        self.name = "+".join(b.name for b in backends)

    @property
    def retries(self) -> bool:  # one retry layer: the scheduler must not retry the registry again
        return any(b.retries for b in self.backends)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s for b in self.backends for s in b.sources)

    async def _first(self, call):
        error: NotFoundError | None = None
        for backend in self.backends:
            try:
                return await call(backend)
            except NotFoundError as exc:
                error = exc
        raise error

    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        return await self._first(lambda b: b.read_range(blob, offset, length))

    async def read_range_from(self, blob: str, offset: int, length: int, *, exclude=()) -> SourcedBytes:
        candidates = [b for b in self.backends if not set(b.sources) <= set(exclude)]
        if not candidates:
            raise FetchError(f"{self.name}: every source is excluded")
        return await FallbackBackend(candidates)._first(
            lambda b: b.read_range_from(blob, offset, length, exclude=exclude))

    def source_failed_verification(self, source: str) -> None:
        for backend in self.backends:
            if source in backend.sources:
                backend.source_failed_verification(source)

    async def blob_size(self, blob: str) -> int:
        return await self._first(lambda b: b.blob_size(blob))


def registry_hosts(config: Config) -> tuple[list[RegistryConfig], list[HostsEntry]]:
    """The registry configuration *config* names: its ``registries``, and the containerd
    ``hosts.toml`` files under its ``hosts_dir`` (read here: blocking, small files)."""
    registries = [RegistryConfig(r.host, r.plain_http, r.ca_file, r.mirrors, r.client_cert, r.client_key,
                                 r.skip_verify) for r in config.registries]
    hosts = load_hosts_dir(config.hosts_dir) if config.hosts_dir else []
    return registries, hosts


def make_client(config: Config) -> RegistryClient:
    """The registry client for *config*: its registries and hosts.toml files, its credentials
    (re-read when they change), proxies from the environment, and one retry layer whose
    deadline is ``fetch_deadline`` (the scheduler's too)."""
    registries, hosts = registry_hosts(config)
    return RegistryClient(registries, Credentials(config.credentials_path), hosts=hosts,
                          retry=RetryPolicy(deadline=config.fetch_deadline,
                                            attempt_timeout=min(10.0, config.fetch_deadline)),
                          max_connections=max(16, 2 * config.fetch_concurrency))


async def reload_registries(client: RegistryClient, config: Config) -> None:
    """Re-read the registry configuration (mirror lists, hosts.toml, TLS files, proxies) into
    *client*; what the daemon's SIGHUP or control call runs. ConfigError changes nothing."""
    registries, hosts = await trio.to_thread.run_sync(registry_hosts, config)
    client.reconfigure(registries, hosts, ProxySettings.from_environment())


class ImageOpener:
    """Opens image references with one shared registry client; ``async with`` owns it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.limits = ImageLimits.from_config(config)
        self._client: RegistryClient | None = None

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = make_client(self.config)
        return self._client

    async def ensure_client(self) -> RegistryClient:
        """``client``, made in a worker thread the first time: making it reads files (hosts.toml,
        CA certificates), which the event loop must not wait for."""
        if self._client is None:
            client = await trio.to_thread.run_sync(make_client, self.config)
            if self._client is None:
                self._client = client
            else:  # another task made one meanwhile: keep that one
                await client.aclose()
        return self._client

    @property
    def existing_client(self) -> RegistryClient | None:
        """The registry client if one was made (reading statistics must not make one)."""
        return self._client

    async def __aenter__(self) -> "ImageOpener":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def open(self, text: str) -> OpenedImage:
        local = parse_local_ref(text)
        if local is not None:
            return await self._open_local(text, local)
        ref = parse_reference(text)
        await self.ensure_client()
        data, media_type, digest = await self.client.get_manifest(ref, accept=MANIFEST_MEDIA_TYPES)
        if ordinary_manifest(data):  # an ordinary image: through its lazyfs index, if it has a trusted one
            from lazyfs.image.indexed import open_indexed

            return await open_indexed(self, text, data, media_type, digest)
        manifest = parse_manifest(data, self.limits.max_virtual_size)
        backend = RegistryBackend(self.client, ref.repo())
        image = await _load(text, manifest, backend, None, self.limits)
        return OpenedImage(text, image, backend, remote=ref.with_digest(digest))

    async def _open_local(self, text: str, local: LocalRef) -> OpenedImage:
        layout = OciLayout(local.path)
        data, desc = await trio.to_thread.run_sync(layout.read_manifest, local.tag)  # files: not on the loop
        if ordinary_manifest(data):
            from lazyfs.image.indexed import open_indexed, open_registered

            if desc.annotations.get(ANN_SOURCE) is not None:  # registered by the snapshotter: lives in the registry
                return await open_registered(self, text, data, desc.media_type, desc.annotations[ANN_SOURCE])
            return await open_indexed(self, text, data, desc.media_type, desc.digest)
        manifest = parse_manifest(data, self.limits.max_virtual_size)
        source = desc.annotations.get(ANN_SOURCE)
        if source is not None and not await trio.to_thread.run_sync(
                lambda: all(layout.has_blob(layer.digest) for layer in manifest.layers)):
            # pulled (metadata only), maybe with local layers on top: local blobs first, then the registry
            ref = parse_reference(source)
            await self.ensure_client()
            backend: Backend = FallbackBackend([DirectoryBackend(layout.path), RegistryBackend(self.client, ref.repo())])
            image = await _load(text, manifest, backend, layout, self.limits)
            return OpenedImage(text, image, backend, local=local, remote=ref)
        backend = DirectoryBackend(layout.path)
        return OpenedImage(text, await _load(text, manifest, backend, None, self.limits), backend, local=local)


def ordinary_manifest(data: bytes) -> bool:
    """Whether a manifest is an ordinary image's (or an index of them): no layer is a lazyfs layer."""
    try:
        doc = parse_json(data, "manifest")
    except LazyfsError:
        return False
    if isinstance(doc.get("manifests"), list):
        return True
    layers = doc.get("layers")
    return isinstance(layers, list) and bool(layers) and doc.get("artifactType") is None and not any(
        isinstance(layer, dict) and str(layer.get("mediaType", "")).startswith("application/vnd.lazyfs.")
        for layer in layers)


def _saved_tail_path(layout: OciLayout, digest: str) -> str:
    return os.path.join(layout.path, META_DIR, digest.split(":")[1])


async def _load(name: str, manifest: ImageManifest, backend: Backend, layout: OciLayout | None,
                limits: ImageLimits) -> Image:
    """Layer metadata: from a pulled layout's saved tails where present, else one ranged read each
    (each from the next source when one serves a tail that fails its meta-digest)."""

    def saved(layer) -> bytes | None:
        try:
            with open(_saved_tail_path(layout, layer.digest), "rb") as f:
                return f.read(layer.meta_length + 1)
        except FileNotFoundError:
            return None

    return await load_image(manifest, [backend], name=name, limits=limits,
                            saved_tail=saved if layout is not None else None)


async def push_image(opener: ImageOpener, source: LocalRef, target: Reference) -> dict:
    """Upload a local image's blobs, config and manifest; return what was sent."""
    layout = OciLayout(source.path)
    data, _ = layout.read_manifest(source.tag)
    manifest = parse_manifest(data)
    client = opener.client
    repo = target.repo()
    outcomes: dict[str, str] = {}
    referenced = set()
    opened = await opener.open(str(source))
    referenced |= opened.blobs
    for digest in sorted(referenced | {manifest.config.digest}):
        if not layout.has_blob(digest):
            raise NotFoundError(f"blob {digest} of {source} is not in the layout; cannot push")
        size = os.path.getsize(layout.blob_path(digest))
        result = await client.push_blob(repo, layout.blob_path(digest), digest,
                                        chunk_size=(16 << 20) if size > (64 << 20) else None)
        outcomes[digest] = result.outcome
    pushed = await client.put_manifest(target if target.tag or target.digest else target.with_tag("latest"),
                                       data, MEDIA_TYPE_MANIFEST)
    return {"image": str(target), "manifest": pushed, "blobs": len(outcomes),
            "uploaded": sum(1 for o in outcomes.values() if o == "uploaded"),
            "already_there": sum(1 for o in outcomes.values() if o != "uploaded"),
            "bytes": sum(os.path.getsize(layout.blob_path(d)) for d, o in outcomes.items() if o == "uploaded")}


async def pull_image(opener: ImageOpener, source: Reference, target: LocalRef) -> dict:
    """Metadata only: manifest, config and each layer's metadata into a layout that remembers *source*."""
    client = opener.client
    data, _, digest = await client.get_manifest(source, accept=(MEDIA_TYPE_MANIFEST,))
    manifest = parse_manifest(data, opener.limits.max_virtual_size)
    layout = OciLayout(target.path).ensure()
    config = await client.get_blob(source.repo(), manifest.config.digest, max_size=MAX_CONFIG_SIZE)
    parse_json(config, f"config of {source}", MAX_CONFIG_SIZE)
    layout.put_bytes(config)
    os.makedirs(os.path.join(layout.path, META_DIR), exist_ok=True)
    backends = [RegistryBackend(client, source.repo())]

    def keep(layer, tail: bytes) -> None:  # a tail that matched its meta-digest and parsed
        try:
            write_atomically(_saved_tail_path(layout, layer.digest), tail)
        except OSError as exc:
            raise LazyfsError(f"cannot save the metadata of {layer.digest} in {layout.path}: {exc}") from None

    await load_image(manifest, backends, name=str(source), limits=opener.limits, on_tail=keep)
    fetched = sum(layer.meta_length for layer in manifest.layers)
    desc = layout.put_manifest(data, target.tag, annotations={ANN_SOURCE: str(source.with_digest(digest))})
    return {"image": str(target), "manifest": desc.digest, "layers": len(manifest.layers),
            "metadata_bytes": fetched, "virtual_size": manifest.virtual_size}

