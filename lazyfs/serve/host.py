"""The host runtime: one cache, one fetch scheduler and one registry client for every attached image.

Used by the daemon (which exports each attachment over FUSE) and directly by
tests and tools that want a lazily fetched device in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable

import trio

from lazyfs.config import Config
from lazyfs.device.chunks import ChunkLocation, ChunkSource, Priority
from lazyfs.device.merged import MergedDevice
from lazyfs.device.writable import create_writable, open_writable
from lazyfs.errors import BusyError, ConfigError, LazyfsError, NotFoundError, describe
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.flatfile import FlatCache, LayerFlats
from lazyfs.fetch.scheduler import FetchScheduler
from lazyfs.fetch.trace import TraceRecorder, replay
from lazyfs.image.metacache import MetadataCache
from lazyfs.image.remote import ImageOpener, OpenedImage, registry_hosts, reload_registries
from lazyfs.image.traces import RemoteTraces, load_trace, save_trace
from lazyfs.serve.diskbudget import DiskBudget
from lazyfs.serve.hydrate import HeldByBlockCache, HydratePolicy, Hydrator
from lazyfs.serve.state import FrontEnd, attachment_name, is_attachment_name
from lazyfs.nursery import open_nursery

log = logging.getLogger(__name__)


class _Unrouted(Backend):
    """The scheduler's default backend: every blob must be routed by an attachment first."""

    name = "unrouted"

    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        raise NotFoundError(f"blob {blob} belongs to no attached image")

    async def blob_size(self, blob: str) -> int:
        raise NotFoundError(f"blob {blob} belongs to no attached image")


class AttachmentReader(ChunkSource):
    """One attachment's view of the shared scheduler: counts its reads, records its trace, reads ahead."""

    def __init__(self, scheduler: FetchScheduler, index, readahead: int) -> None:
        self.scheduler, self.index, self.readahead = scheduler, index, readahead
        self.recorder: TraceRecorder | None = None
        # the chunks of the startup trace being replayed: a read of one is on the script, and what
        # follows it is in the trace too (or was not read at startup), so it triggers no readahead
        self.traced: frozenset[bytes] = frozenset()
        self.readahead_paused = False  # while the startup trace is looked for
        self.reads = self.misses = self.bytes_served = self.bytes_missed = 0
        self.last_error: str | None = None  # why the last failed demand read failed

    async def get(self, loc: ChunkLocation, priority: Priority = Priority.DEMAND) -> bytes:
        if priority == Priority.DEMAND:
            self.reads += 1
            if not self.scheduler.is_cached(loc.digest):
                self.misses += 1
                self.bytes_missed += loc.compressed_length
                if self.readahead and not self.readahead_paused and loc.digest not in self.traced:
                    self._read_ahead(loc)
        try:
            raw = await self.scheduler.get(loc, priority)
        except LazyfsError as exc:
            if priority == Priority.DEMAND:
                self.last_error = describe(exc)
            raise
        self.bytes_served += len(raw)
        return raw

    def _read_ahead(self, loc: ChunkLocation) -> None:
        """Queue the chunks that follow *loc*'s first use in virtual order."""
        # Spans are read ahead as far as chunks. With chained spans 4 per miss fetched 47 MB against 39 MB
        # with 2, for no faster start; with sparse windows (no chains) 4 fetch 35.7 MB against 28.3 MB and
        # the start through the index is within 1.12-1.24x of the converted image's, against 1.04-1.34x
        # (the Debian image, BENCHMARKS.md).
        following = self.index.following(loc, self.readahead)
        if following:
            self.scheduler.prefetch(following, Priority.READAHEAD)

    def statistics(self) -> dict:
        return {"chunk_reads": self.reads, "demand_misses": self.misses, "bytes_served": self.bytes_served,
                "bytes_missed": self.bytes_missed, "last_error": self.last_error}


@dataclass
class Attachment:
    name: str
    ref: str
    opened: OpenedImage
    device: MergedDevice
    store: AttachmentReader
    writable_dir: str | None
    opener: ImageOpener  # the registry client this image was opened with (and its traces go through)
    plain_http: tuple[str, ...] = ()  # registries the attach request asked to speak plain HTTP to
    opened_from_cache: bool = False  # its metadata came from the metadata cache (a restore)
    attached_at: float = field(default_factory=time.time)
    trace: dict = field(default_factory=dict)
    front_end: FrontEnd = FrontEnd()  # what front ends made of it (mount target, loop device, TCMU name)
    hydration: Hydrator | None = None  # progress of every image; it runs only with a hydrate policy
    hydrate: HydratePolicy | None = None
    tasks: set = field(default_factory=set)  # cancel scopes of its background tasks: a detach cancels them
    trace_lookup: trio.Event = field(default_factory=trio.Event)  # set once its startup trace was looked for
    early_traces: "EarlyTraces | None" = None  # the registry's half of its trace lookup, started at the manifest

    def describe(self) -> dict:
        return {"name": self.name, "image": self.ref, "manifest": self.opened.image.manifest.digest,
                "size": self.device.size, "writable": self.writable_dir, "layers": len(self.opened.image.layers),
                "plain_http": list(self.plain_http), "attached_at": self.attached_at, "trace": self.trace,
                "hydrate": None if self.hydrate is None else self.hydrate.to_json(),
                **({"via": self.opened.via} if self.opened.via else {}), **self.front_end.to_json()}

    def statistics(self) -> dict:
        return {**self.describe(), **self.store.statistics(), "device": self.device.statistics(),
                "hydration": self.hydration.statistics() if self.hydration is not None else {}}


@dataclass
class EarlyTraces:
    """A trace lookup started as soon as an attach has the image's manifest digest, while the chunk
    tables are still being fetched: the replay can then start as soon as the image is open.
    ``result`` is the lookup (``RemoteTraces``), the error it met, or None (not started, or failed
    unexpectedly: the replay looks the traces up itself)."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    started: bool = False
    result: RemoteTraces | LazyfsError | None = None


class Host:
    """Attach and detach images on one host; every attachment shares cache and scheduler."""

    def __init__(self, config: Config, cache: ChunkCache, flat: FlatCache | None = None) -> None:
        self.config = config
        self.cache = cache
        self.flat = flat  # the flat per-layer disk cache under every device (None: off)
        self.opener = ImageOpener(config)
        self._openers: dict[tuple[str, ...], ImageOpener] = {(): self.opener}
        self._opener_leases: dict[tuple[str, ...], int] = {}  # uses of an extra opener besides attachments
        self.scheduler = FetchScheduler(
            [_Unrouted()], cache, max_range=config.max_range, max_jobs_per_backend=config.fetch_concurrency,
            deadline=config.fetch_deadline, verify_threads=config.decode_threads)
        self.scheduler.flat = flat  # fetched chunks that attached layers use are written there, once
        self.attachments: dict[str, Attachment] = {}
        self.budget = DiskBudget(config, cache, flat)
        self.metadata = MetadataCache(os.path.join(config.cache_root, "metadata"))  # offline restore (hydrate.py)
        self._hydrated_chunks: set[bytes] = set()  # never evicted: a hydrated image must stay local
        cache.protected = self._hydrated_chunks.__contains__
        self.traces = {"replayed": 0, "rejected": 0, "foreign_entries": 0, "published": 0}
        self.background_failures = 0  # background tasks of one image that failed unexpectedly (logged)
        self._nursery: trio.Nursery | None = None
        self._attaching: set[str] = set()  # names reserved by attaches in progress

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config) -> AsyncIterator["Host"]:
        cache = await ChunkCache.load(config.cache_root, config.cache_size, config.memory_cache_size)
        flat = None
        if config.flat_cache_size:
            flat = await FlatCache.load(os.path.join(config.cache_root, "flat"), config.flat_cache_size)
        host = cls(config, cache, flat)
        try:
            async with open_nursery() as nursery:
                host._nursery = nursery
                await nursery.start(host.scheduler.run)
                if flat is not None:
                    await nursery.start(flat.run)
                nursery.start_soon(host.budget.run, host.writable_layers)
                if config.registries:
                    nursery.start_soon(host._make_registry_client)
                try:
                    yield host
                finally:
                    with trio.CancelScope(shield=True):
                        for name in list(host.attachments):
                            await host.detach(name, save=False)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for opener in host._openers.values():
                    await opener.aclose()
                await cache.aclose()
                if flat is not None:
                    await flat.aclose()

    async def _make_registry_client(self) -> None:
        """Make the config's registry client at start (it reads hosts.toml and CA certificates: 41 ms
        of the first attach with the page cache dropped, BENCHMARKS.md). A failure here is only
        logged: the first attach makes the client again and reports the error to its caller."""
        try:
            await self.opener.ensure_client()
        except (LazyfsError, OSError) as exc:
            log.warning("registry client: %s (the first attach tries again)", describe(exc))

    def opener_for(self, plain_http: Iterable[str] = ()) -> ImageOpener:
        """The opener that also speaks plain HTTP to *plain_http* (registries the config does not
        list as plain HTTP). Each such set gets a client of its own, so one request's plain-HTTP
        registry never downgrades the TLS of the others' attachments."""
        extra = self._opener_key(plain_http)
        if extra not in self._openers:
            self._openers[extra] = ImageOpener(self.config.with_plain_http(extra))
        return self._openers[extra]

    def _opener_key(self, plain_http: Iterable[str]) -> tuple[str, ...]:
        known = set(self.config.plain_http_hosts())
        return tuple(sorted({host for host in plain_http if host not in known}))

    @asynccontextmanager
    async def registry_opener(self, plain_http: Iterable[str] = ()) -> AsyncIterator[ImageOpener]:
        """``opener_for(plain_http)``, kept open while the block runs. An extra opener (not the
        config's own) is closed, its HTTP client with it, once no attachment and no block uses it."""
        key = self._opener_key(plain_http)
        opener = self.opener_for(plain_http)
        self._opener_leases[key] = self._opener_leases.get(key, 0) + 1
        try:
            yield opener
        finally:
            await self._return_opener(key)

    async def _return_opener(self, key: tuple[str, ...]) -> None:
        self._opener_leases[key] -= 1
        if not self._opener_leases[key]:
            del self._opener_leases[key]
        await self._close_if_unused(key)

    async def _close_if_unused(self, key: tuple[str, ...]) -> None:
        opener = self._openers.get(key)
        if (opener is None or opener is self.opener or key in self._opener_leases
                or any(a.opener is opener for a in self.attachments.values())):
            return
        del self._openers[key]
        with trio.CancelScope(shield=True):
            await opener.aclose()

    def open_registry_clients(self) -> int:
        """How many registry clients (HTTP connection pools) are open now."""
        return sum(o.existing_client is not None for o in self._openers.values())

    async def attach(self, ref: str, name: str | None = None, *, writable: bool = False,
                     writable_dir: str | None = None, kind: str = "sparse", record_trace: bool | None = None,
                     front_end: FrontEnd = FrontEnd(), plain_http: Iterable[str] = (), manifest: str | None = None,
                     hydrate: HydratePolicy | bool | None = None) -> Attachment:
        """Open *ref* and make its merged device; with *writable*, a writable layer in *writable_dir*
        (an absolute path; default: a directory under the config's writable root).

        *plain_http*: registries to speak plain HTTP to for this image, besides the config's.
        *manifest*: the manifest digest to open (a restore pins what was attached): from the
        metadata cache when it is there, so no registry is needed. *hydrate*: a policy to make the
        image fully local in the background (None: the config's ``hydrate``; False: not).
        """
        name = name or attachment_name(ref)
        if not is_attachment_name(name):
            raise ConfigError(f"attachment name {name!r}: use letters, digits, '.', '_' and '-'")
        plain_http = tuple(plain_http)
        if not all(isinstance(host, str) and host for host in plain_http):
            raise ConfigError(f"plain_http must be a list of registry hosts, not {plain_http!r}")
        if writable_dir is not None and not (isinstance(writable_dir, str) and os.path.isabs(writable_dir)):
            raise ConfigError(f"writable_dir must be an absolute path, not {writable_dir!r}")
        if writable_dir is not None and not writable:
            raise ConfigError("a writable directory is for a writable attachment only")
        # No lock is held across the registry or the disk: the name is reserved instead, so
        # attaches of other images (and every read) go on while this one waits.
        if name in self.attachments:
            raise BusyError(f"an image is already attached as {name!r} ({self.attachments[name].ref})")
        if name in self._attaching:
            raise BusyError(f"an image is being attached as {name!r}")
        # a restore (only restores pin a manifest) replays no trace
        early = EarlyTraces() if self.config.trace_replay and manifest is None else None
        try:
            async with self.registry_opener(plain_http) as opener:  # the attachment keeps it once made
                att = await self._attach_reserved(name, ref, opener, plain_http, writable, writable_dir, kind,
                                                  front_end, manifest, hydrate, early)
        except BaseException:
            if early is not None:
                early.scope.cancel()
            raise
        self._spawn(att, self._keep_metadata, att, survives_detach=True)
        if att.opened_from_cache:  # a restore (only restores pin): its startup is long past, and the registry may be away
            if self.config.background_download:
                self._spawn(att, self._background, att)
            att.trace_lookup.set()
        else:
            await self._start_trace(att, record_trace)
        log.info("audit: attach %s image=%s manifest=%s writable=%s", name, ref, att.opened.image.manifest.digest,
                 att.writable_dir)
        return att

    async def _attach_reserved(self, name: str, ref: str, opener: ImageOpener, plain_http: tuple[str, ...],
                               writable: bool, writable_dir: str | None, kind: str, front_end: FrontEnd,
                               manifest: str | None, hydrate: HydratePolicy | bool | None,
                               early: EarlyTraces | None) -> Attachment:
        self._attaching.add(name)
        try:
            def look_for_traces(repo, digest: str) -> None:
                early.started = True
                self._nursery.start_soon(self._fetch_traces, early, plain_http, repo, digest)

            opened, from_cache = await self.metadata.open(
                opener, ref, manifest, on_manifest=look_for_traces if early is not None else None)
            self._route(opened)
            layer = None
            try:
                if writable:
                    writable_dir = writable_dir or os.path.join(self.config.writable_root, name)
                    # journal replay reads the disk: a worker thread; shielded, so a cancel
                    # never leaves an opened (and flock-ed) layer behind
                    with trio.CancelScope(shield=True):
                        layer = await trio.to_thread.run_sync(self._open_layer, writable_dir, kind, opened)
                store = AttachmentReader(self.scheduler, None, self.config.readahead_chunks)
                # the merged index is built from every layer's extents: CPU work, off the event loop
                device = await trio.to_thread.run_sync(opened.image.device, store, layer)
                if self.flat is not None:
                    try:
                        device.block_cache = await LayerFlats.open(self.flat, opened.image.layers)
                    except OSError as exc:  # a broken cache disk costs speed, not the image
                        log.warning("flat cache unusable for %s: %s", name, exc)
            except BaseException:
                self._unroute(opened)
                if layer is not None:
                    layer.close()
                raise
            store.index = device.index
            att = Attachment(name, ref, opened, device, store, writable_dir if writable else None, opener,
                             plain_http, front_end=front_end)
            if early is not None and early.started:  # not started for an image opened through its index
                att.early_traces = early
                att.tasks.add(early.scope)  # a detach cancels it
            try:
                self._hydration(att, hydrate)
            except BaseException:
                self._unroute(opened)
                with trio.CancelScope(shield=True):
                    await device.aclose()
                raise
            att.opened_from_cache = from_cache
            self.attachments[name] = att
            self.budget.changed()
        finally:
            self._attaching.discard(name)
        return att

    def _hydration(self, att: Attachment, hydrate: HydratePolicy | bool | None) -> None:
        """Give *att* its progress counter, and start hydrating it if asked (or the config says so)."""
        if hydrate is None:
            hydrate = self.config.hydrate
        policy = HydratePolicy() if hydrate is True else hydrate or None
        att.hydration = Hydrator(att.device.index.locations(), policy or HydratePolicy(),
                                 cache=self.cache, held=HeldByBlockCache(att.device),
                                 download=self.scheduler.background_download,
                                 default_rate=self.config.hydrate_rate, max_range=self.config.max_range)
        if policy is None:
            return
        if att.hydration.raw_total > self.cache.max_bytes:  # it could never all be local at once
            att.hydration.cancel()  # stops its progress counter: this attach fails
            raise ConfigError(f"hydrating {att.ref} needs {att.hydration.raw_total} bytes of chunk cache; "
                              f"cache_size is {self.cache.max_bytes}")
        att.hydrate = policy
        self._hydrated_chunks.update(loc.digest for loc in att.hydration.locations)
        self._spawn(att, att.hydration.run)

    async def _keep_metadata(self, att: Attachment) -> None:
        """Keep the image config with its cached metadata; prune images no longer attached."""
        async with self.registry_opener(att.plain_http) as opener:  # even if att is detached meanwhile
            await self.metadata.keep_config(opener, att.opened)
        keep = [a.opened.image.manifest.digest for a in self.attachments.values()]
        await trio.to_thread.run_sync(self.metadata.prune, keep)

    def _open_layer(self, writable_dir: str, kind: str, opened: OpenedImage):
        """Open (replaying its journal) or create the writable layer in *writable_dir*. Blocking: a thread."""
        if os.path.exists(os.path.join(writable_dir, "layer.json")):
            layer = open_writable(writable_dir)
        else:
            layer = create_writable(writable_dir, kind, opened.image.virtual_size, base=opened.image.manifest.digest)
        try:
            if layer.size != opened.image.virtual_size:
                raise ConfigError(f"writable layer {writable_dir} is {layer.size} bytes, image is {opened.image.virtual_size}")
            layer.keep_free = self.budget.reserve_for(writable_dir)  # the chunk cache's share of a shared disk
        except BaseException:
            layer.close()
            raise
        return layer

    def _route(self, opened: OpenedImage) -> None:
        """Fetch the image's blobs from its backends too (after the sources they already have)."""
        backends = opened.backends
        for blob in opened.blobs:
            # a blob is the same bytes wherever it lives: keep earlier sources, add these after them
            known = [b for b in self.scheduler.backends_for(blob) if not isinstance(b, _Unrouted)]
            self.scheduler.set_backends(blob, known + [b for b in backends if b not in known])

    def _unroute(self, opened: OpenedImage) -> None:
        """Undo _route: the routes keep only the backends of images still attached (so they stay
        bounded however often an image is attached again)."""
        mine = opened.backends
        for blob in opened.blobs:
            rest = [b for b in self.scheduler.backends_for(blob) if not isinstance(b, _Unrouted) and b not in mine]
            if rest:
                self.scheduler.set_backends(blob, rest)
            else:
                self.scheduler.clear_backends(blob)

    async def _start_trace(self, att: Attachment, record: bool | None) -> None:
        """Start recording a startup trace (when configured) and, in the background, look for a stored one
        to replay. The attach does not wait for the registry's referrers, the trace manifest and blob:
        the mount's first reads go on meanwhile, with no readahead until the lookup ends (what the
        trace holds is not known yet)."""
        if record if record is not None else self.config.trace_publish and self.config.trace_record_seconds > 0:
            att.store.recorder = TraceRecorder()
            # every chunk the startup reads, also those the flat files or the memory tier serve
            att.device.observe_read = att.store.recorder.record
            att.trace = {"recording": True}
            self._spawn(att, self._record, att)
        if self.config.trace_replay:
            att.store.readahead_paused = True
            self._spawn(att, self._load_and_replay, att)
        else:
            att.trace_lookup.set()
        if self.config.background_download:
            self._spawn(att, self._background, att)

    async def _fetch_traces(self, early: EarlyTraces, plain_http: tuple[str, ...], repo, digest: str) -> None:
        """The registry's half of a trace lookup, into *early* (a task of the host's: never raises)."""
        try:
            with early.scope:
                async with self.registry_opener(plain_http) as opener:
                    early.result = await RemoteTraces.fetch(await opener.ensure_client(), repo, digest)
        except LazyfsError as exc:
            early.result = exc
        except Exception:
            self.background_failures += 1
            log.exception("looking up the startup traces of %s failed (the image is still served)", repo)
        finally:
            early.done.set()

    async def _load_and_replay(self, att: Attachment) -> None:
        try:
            early = att.early_traces
            if early is not None:
                await early.done.wait()
                att.tasks.discard(early.scope)
            # a use of the registry client of its own: a detach meanwhile does not close it under the lookup
            async with self.registry_opener(att.plain_http) as opener:
                trace = await load_trace(opener, att.opened, early.result if early is not None else None)
            if trace is not None and trace.foreign:  # a trace naming chunks the image lacks: ignored, counted
                self.traces["rejected"] += 1
                self.traces["foreign_entries"] += trace.foreign
                att.trace = {**att.trace, "rejected": trace.manifest, "foreign_entries": trace.foreign}
            if trace:
                recorder = att.store.recorder
                if recorder is not None and not recorder.stopped:  # a trace exists: this start records none
                    recorder.stop()
                    att.device.observe_read = None
                    att.trace.pop("recording", None)
                self.traces["replayed"] += 1
                att.trace = {**att.trace, "replay": len(trace)}
                att.store.traced = frozenset(loc.digest for loc in trace.locations)
        finally:
            att.store.readahead_paused = False
            att.trace_lookup.set()
        if trace:
            await self._replay(att, trace.locations)

    def _spawn(self, att: Attachment, fn, *args, survives_detach: bool = False) -> None:
        """Run *fn(*args)*, a background task of *att*, in the host's nursery. A detach cancels it
        (unless it *survives_detach*), and an unexpected failure is logged with its traceback and
        counted: one image's background work never takes the daemon, and every other image, down."""
        self._nursery.start_soon(self._contained, att, fn, args, survives_detach)

    async def _contained(self, att: Attachment, fn, args: tuple, survives_detach: bool) -> None:
        scope = trio.CancelScope()
        if not survives_detach:
            if att.name not in self.attachments and att.name not in self._attaching:
                return  # detached before it started
            att.tasks.add(scope)
        try:
            with scope:
                await fn(*args)
        except Exception:
            self.background_failures += 1
            log.exception("background task %s of %s failed (the image is still served)",
                          getattr(fn, "__name__", fn), att.name)
        finally:
            att.tasks.discard(scope)

    async def _replay(self, att: Attachment, trace) -> None:
        att.trace.update(await replay(self.scheduler, trace, self.config.trace_concurrency))

    async def _record(self, att: Attachment) -> None:
        await trio.sleep(self.config.trace_record_seconds)
        await self.finish_trace(att)

    async def finish_trace(self, att: Attachment) -> None:
        """Stop recording and store the startup trace next to the image (once)."""
        recorder = att.store.recorder
        if recorder is None or recorder.stopped:
            return
        recorder.stop()
        att.device.observe_read = None  # warm reads may be served in FUSE worker threads again
        att.trace["recording"] = False
        if len(recorder) and not self.config.trace_publish:
            att.trace["chunks"] = len(recorder)
            att.trace["published"] = False  # the config keeps this host's traces to itself
        elif len(recorder):
            try:
                att.trace["saved"] = await save_trace(att.opener, att.opened, list(recorder.locations))
                att.trace["chunks"] = len(recorder)
                self.traces["published"] += 1
            except LazyfsError as exc:
                log.warning("could not store the startup trace of %s: %s", att.ref, exc)

    async def _background(self, att: Attachment) -> None:
        att.trace["background"] = await self.scheduler.background_download(
            att.device.index.locations(), self.config.background_rate, self.config.background_delay)

    async def detach(self, name: str, *, save: bool = True) -> None:
        att = self.attachments.get(name)
        if att is None:
            raise NotFoundError(f"no image attached as {name!r}")
        if save:
            await self.finish_trace(att)
        del self.attachments[name]
        for scope in list(att.tasks):  # its background download, trace replay and recording, hydration
            scope.cancel()
        if att.hydration is not None:
            att.hydration.cancel()
        if att.hydrate is not None:  # its chunks may be evicted again, unless another hydrated image has them
            self._hydrated_chunks.clear()
            for other in self.attachments.values():
                if other.hydrate is not None:
                    self._hydrated_chunks.update(loc.digest for loc in other.hydration.locations)
        self._unroute(att.opened)
        self.budget.changed()
        await att.device.aclose()
        await self._close_if_unused(self._opener_key(att.plain_http))  # its registry client, if it was the last
        log.info("audit: detach %s image=%s", name, att.ref)

    def writable_layers(self) -> dict:
        """The writable layer of every writable attachment, by attachment name."""
        return {n: a.device.writable for n, a in self.attachments.items() if a.device.writable is not None}

    async def reload_registries(self, config: Config) -> dict:
        """Use *config*'s registries and hosts_dir from the next request on (mirror lists, TLS,
        proxies); nothing else of it. ConfigError changes nothing. Returns the sources of every
        registry with mirrors."""
        new = dataclasses.replace(self.opener.config, registries=config.registries, hosts_dir=config.hosts_dir)
        client = self.opener.existing_client
        if client is not None:
            await reload_registries(client, new)
        else:
            await trio.to_thread.run_sync(registry_hosts, new)  # check it; the client is made at first use
        self.opener.config = new
        client = await self.opener.ensure_client()
        sources = {name: list(client.sources(name)) for name in client.mirrored_registries()}
        log.info("audit: registries reloaded: %s", sources or "no mirrors")
        return {"sources": sources}

    async def probe_registries(self, interval: float, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Every *interval* seconds, probe every endpoint of the registries that have mirrors
        (a down mirror comes back as soon as it answers; a dead one goes down before a read
        waits for it). Runs until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            client = self.opener.existing_client
            if client is None:
                continue
            for registry in client.mirrored_registries():
                states = await client.probe_sources(registry)
                log.debug("probe %s: %s", registry, states)

    def registry_statistics(self) -> dict | None:
        """The registry client's counters and per-source health and traffic (None before any
        registry was used)."""
        client = self.opener.existing_client
        if client is None:
            return None
        stats = client.statistics()
        doc = dataclasses.asdict(stats)
        doc["sources"] = [{**dataclasses.asdict(src), "latency_buckets": [
            ["+Inf" if math.isinf(bound) else bound, n] for bound, n in src.latency_buckets]}
            for src in stats.sources]
        return doc

    def statistics(self) -> dict:
        return {"attachments": {n: a.statistics() for n, a in self.attachments.items()},
                "scheduler": self.scheduler.statistics(), "disk": self.budget.statistics(),
                "registry": self.registry_statistics(), "registry_clients": self.open_registry_clients(),
                "flat_cache": self.flat.statistics() if self.flat is not None else {},
                "traces": dict(self.traces), "background_failures": self.background_failures}
