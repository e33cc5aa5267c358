"""The trio fetch executor: cache first, then single-flight, coalesced, prioritised, verified fetches.

``FetchScheduler`` is the ``ChunkSource`` read-only layers use. It runs what the
planner (``lazyfs.fetch.plan.FetchPlanner``) decides:

* ``get`` answers from the cache (memory, then disk), else joins the one
  flight for that digest, else starts one (queued in the planner);
* each planned job is one ranged read from the blob's primary backend, the
  whole job bounded by ``deadline``; a backend that retries itself (the
  registry client: ``Backend.retries``) is called once, others are retried
  here with exponential backoff and jitter, each attempt bounded by
  ``attempt_timeout`` (see docs/registry.md for the effective policy);
* the frames of one ranged read are decompressed, blake3-verified and written
  back to the disk cache in one worker-thread hop (``verify_threads`` workers,
  default one per core): once, into the flat layer files of attached images that
  use the chunk when there are any (``flat``), else as a chunk file; a chunk
  that fails verification is read again from another source of the same
  backend (the source is excluded and reported), then from the next backend
  of the blob's list, as is a read that fails outright; when all fail, waiters get the error
  (``IntegrityError`` if any backend served bad bytes). Bad bytes are never
  served nor cached;
* single flight is per digest, but location-safe: a reader that joined the
  flight of another location of its digest reads its own location once if
  that flight fails;
* a reader that is cancelled or times out stops waiting; the shared fetch goes
  on for the others (flights belong to the scheduler's nursery, not to readers).

All tasks live in the scheduler's own nursery: ``async with
FetchScheduler.open(backends, cache) as sched`` or ``await nursery.start(sched.run)``.
"""

from __future__ import annotations

import bisect
import enum
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Collection, Hashable, Iterable, Sequence
from contextlib import asynccontextmanager

import trio

from lazyfs.device.chunks import ChunkLocation, ChunkSource, Priority
from lazyfs.errors import AuthError, ConfigError, FetchError, FormatError, IntegrityError, LazyfsError, NotFoundError
from lazyfs.fetch.backend import Backend, SourcedBytes
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.flatfile import FlatCache, write_targets
from lazyfs.fetch.plan import DEFAULT_MAX_GAP, DEFAULT_MAX_RANGE, FetchJob, FetchPlanner, TokenBucket
from lazyfs.format.spanindex import MAX_CHAIN, SpanLocation, decode_location, decode_window, span_tail, window_key
from lazyfs.nursery import open_nursery

__all__ = ["FetchScheduler", "LatencyHistogram", "LATENCY_BUCKETS"]

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the request latency histogram; the last bucket is +inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf,
)  # fmt: skip


class LatencyHistogram:
    """Counts of observations per fixed bucket, with quantiles estimated from the buckets."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(bounds) or not bounds or bounds[-1] != math.inf:
            raise ConfigError("histogram bounds must be sorted and end with +inf")
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def quantile(self, q: float) -> float:
        """Estimate of the *q* quantile: linear within its bucket (0.0 when empty)."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                lower = self.bounds[i - 1] if i else 0.0
                upper = self.bounds[i]
                if upper == math.inf:
                    return lower
                return min(upper, lower + (upper - lower) * max(0.0, rank - seen) / n)
            seen += n
        return self.bounds[-2]

    def snapshot(self) -> dict:
        return {
            "buckets": [(b, c) for b, c in zip(self.bounds, self.counts)],
            "count": self.count,
            "sum": self.sum,
            "p50": self.quantile(0.50),
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
        }


class _State(enum.Enum):
    DISK = "disk"  # being read from the disk cache
    FETCH = "fetch"  # queued in the planner or part of a running job


class _Flight:
    """The one resolution in progress of a digest; every reader of it waits on ``done``."""

    __slots__ = ("loc", "priority", "state", "done", "result", "error")

    def __init__(self, loc: ChunkLocation, priority: Priority, state: _State) -> None:
        self.loc = loc
        self.priority = priority
        self.state = state
        self.done = trio.Event()
        self.result: bytes | None = None
        self.error: LazyfsError | None = None


WRITE_BACK_GRACE = 10.0  # seconds a stopping scheduler still spends writing fetched chunks to disk

_COUNTERS = (
    "requests",  # get() calls
    "memory_hits",  # get() answered from the memory tier
    "disk_hits",  # chunks loaded (and verified) from the disk tier for a reader
    "joins",  # get() calls that waited on a flight someone else started
    "fetches",  # chunks sent to the network (misses)
    "ranged_gets",  # backend read_range calls, retries included
    "bytes_fetched",  # bytes those calls returned
    "bytes_served",  # raw bytes handed to get() callers
    "wasted_bytes",  # gap bytes read only to coalesce
    "retries",  # read attempts repeated after a FetchError
    "failovers",  # reads moved to the next backend
    "integrity_failures",  # frames that failed verification
    "fetch_errors",  # failed read attempts
    "deadline_exceeded",  # waits or jobs that ran out of time
    "errors",  # get() calls that raised
    "prefetched",  # chunks queued by prefetch()
    "background_chunks",  # chunks fetched by background_download
    "background_bytes",
    "decode_hops",  # worker-thread hops of fetch jobs (one per coalesced read, not per chunk)
    "location_retries",  # joiners whose flight (another location of the digest) failed and who read their own
    "chain_spans",  # spans fetched only because a chained span after them needed their tail as its window
    "window_reads",  # ranged reads of stored windows (span maps of version 3 keep them beside the document)
)
MAX_TAILS = 512  # the last WINDOW bytes of this many recently decoded gzip spans (16 MiB): chained spans' windows


class FetchScheduler(ChunkSource):
    """Verified chunks from a cache over an ordered list of backends.

    ``backends`` are tried in order for every blob, unless ``set_backends``
    routes a blob elsewhere. Concurrency is bounded per primary backend
    (``max_jobs_per_backend``, of which ``reserved_for_demand`` only serve
    demand reads).
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        cache: ChunkCache,
        *,
        max_range: int = DEFAULT_MAX_RANGE,
        max_gap: int = DEFAULT_MAX_GAP,
        max_jobs_per_backend: int = 8,
        reserved_for_demand: int = 2,
        deadline: float = 30.0,
        attempt_timeout: float = 10.0,
        max_retries: int = 4,
        backoff_base: float = 0.05,
        backoff_max: float = 2.0,
        verify_threads: int | None = None,
    ) -> None:
        if not backends:
            raise ConfigError("the fetch scheduler needs at least one backend")
        if deadline <= 0 or attempt_timeout <= 0:
            raise ConfigError(f"deadline and attempt_timeout must be positive ({deadline}, {attempt_timeout})")
        if max_retries < 0 or backoff_base < 0 or backoff_max < 0:
            raise ConfigError("retry settings must not be negative")
        if verify_threads is None or verify_threads == 0:
            verify_threads = os.cpu_count() or 1  # decode + verify scale with the cores
        if verify_threads < 0:
            raise ConfigError(f"verify_threads must not be negative, got {verify_threads}")
        self._backends = tuple(backends)
        self._routes: dict[str, tuple[Backend, ...]] = {}
        self.cache = cache
        # the flat layer files (set by the host): fetched chunks that open layer files use are written
        # there, once, instead of as chunk files (docs/cache.md, "Dedup")
        self.flat: FlatCache | None = None
        self.deadline = deadline
        self.attempt_timeout = attempt_timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._planner = FetchPlanner(
            max_range=max_range, max_gap=max_gap, max_jobs=max_jobs_per_backend, reserved_for_demand=reserved_for_demand
        )
        self._verify_threads = verify_threads
        self._cpu: trio.CapacityLimiter | None = None
        self._flights: dict[bytes, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._wakeup: trio.Event | None = None
        self._stopped: trio.Event | None = None
        self._closed = False
        self._demand_waiting = 0
        self._demand_quiet: trio.Event | None = None
        self._st = dict.fromkeys(_COUNTERS, 0)
        self._latency = LatencyHistogram()
        # span digest -> its last WINDOW raw bytes (verified), oldest first: the windows of chained spans;
        # and window digest -> a stored window read from a span map blob (verified), the same way
        self._tails: dict[bytes, bytes] = {}
        self.max_tails = MAX_TAILS

    # ------------------------------------------------------------ lifecycle

    @classmethod
    @asynccontextmanager
    async def open(cls, backends: Sequence[Backend], cache: ChunkCache, **options) -> AsyncIterator["FetchScheduler"]:
        """Run a scheduler for the duration of the block; its tasks end with it."""
        sched = cls(backends, cache, **options)
        async with open_nursery() as nursery:
            await nursery.start(sched.run)
            try:
                yield sched
            finally:
                sched._stop()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``aclose()`` (or cancellation); use as ``await nursery.start(sched.run)``."""
        if self._nursery is not None or self._closed:
            raise RuntimeError("a fetch scheduler runs once")
        self._cpu = trio.CapacityLimiter(self._verify_threads)
        self._wakeup = trio.Event()
        self._stopped = trio.Event()
        self._demand_quiet = trio.Event()
        self._demand_quiet.set()
        try:
            async with open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._dispatch_forever()
        finally:
            self._closed = True
            self._nursery = None
            stopped = FetchError("fetch scheduler stopped")
            for flight in list(self._flights.values()):
                self._settle(flight, stopped)
            self._flights.clear()
            self._stopped.set()

    def _stop(self) -> None:
        self._closed = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Stop every task of the scheduler and fail whatever is still waiting.

        The backends and the cache belong to the caller and stay open.
        """
        self._stop()
        if self._stopped is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self._stopped.wait()

    # ------------------------------------------------------------ routing

    def set_backends(self, blob: str, backends: Sequence[Backend]) -> None:
        """Fetch *blob* from *backends* (in order) instead of the default list."""
        if not backends:
            raise ConfigError(f"no backends given for {blob}")
        self._routes[blob] = tuple(backends)

    def backends_for(self, blob: str) -> tuple[Backend, ...]:
        return self._routes.get(blob, self._backends)

    def clear_backends(self, blob: str) -> None:
        """Fetch *blob* from the default list again (its last image was detached)."""
        self._routes.pop(blob, None)

    def _lane(self, blob: str) -> Hashable:
        # Concurrency is bounded per primary backend; the object itself is the key.
        return self.backends_for(blob)[0]

    # ------------------------------------------------------------ reading

    async def get(self, loc: ChunkLocation, priority: Priority = Priority.DEMAND, *, deadline: float | None = None) -> bytes:
        """The verified raw bytes of the chunk at *loc*.

        Raises FetchError (also when *deadline*, default ``self.deadline``,
        passes first), IntegrityError, NotFoundError or FormatError.
        """
        started = time.perf_counter()
        self._st["requests"] += 1
        try:
            raw = self.cache.get_memory(loc.digest)
            if raw is not None:
                self._st["memory_hits"] += 1
            else:
                raw = await self._resolve_chunk(loc, priority, deadline, joining=True)
            if len(raw) != loc.raw_length:
                raise IntegrityError(f"chunk {loc.digest.hex()}", f"{loc.raw_length} bytes", f"{len(raw)} bytes", "chunk table")
        except LazyfsError:
            self._st["errors"] += 1
            raise
        self._st["bytes_served"] += len(raw)
        self._latency.observe(time.perf_counter() - started)
        return raw

    async def ensure(self, loc: ChunkLocation, priority: Priority = Priority.READAHEAD, *, deadline: float | None = None) -> None:
        """Wait until the chunk at *loc* is cached (without reading it back when it already is)."""
        if loc.digest in self.cache:
            return
        await self._resolve_chunk(loc, priority, deadline, joining=False)

    async def _resolve_chunk(self, loc: ChunkLocation, priority: Priority, deadline: float | None, *, joining: bool) -> bytes:
        """Wait for the flight of *loc*'s digest; if that flight read another location and failed, try
        *loc* itself once (the same digest may live in a blob only this reader's image can reach)."""
        flight = self._flight_for(loc, priority, joining=joining)
        try:
            return await self._wait(flight, priority, deadline)
        except LazyfsError:
            if not flight.done.is_set() or flight.error is None or _same_place(flight.loc, loc):
                raise
        self._st["location_retries"] += 1
        flight = self._flight_for(loc, priority, joining=False)
        return await self._wait(flight, priority, deadline)

    def prefetch(self, locations: Iterable[ChunkLocation], priority: Priority = Priority.READAHEAD) -> int:
        """Queue the chunks not cached yet at *priority* without waiting; return how many were new.

        Concurrency stays bounded by the planner: queued chunks start as slots
        free up, always after any waiting demand read.
        """
        queued = 0
        for loc in locations:
            if loc.digest in self.cache or (self.flat is not None and self.flat.holds(loc.digest)):
                continue
            existing = loc.digest in self._flights
            self._flight_for(loc, priority, joining=False)
            queued += not existing
        self._st["prefetched"] += queued
        return queued

    def is_cached(self, digest: bytes) -> bool:
        return digest in self.cache

    def _flight_for(self, loc: ChunkLocation, priority: Priority, *, joining: bool) -> _Flight:
        if self._closed or self._nursery is None:
            raise FetchError("fetch scheduler is not running")
        priority = Priority(priority)
        flight = self._flights.get(loc.digest)
        if flight is not None:
            if joining:
                self._st["joins"] += 1
            if priority < flight.priority:
                flight.priority = priority
                if flight.state is _State.FETCH:
                    self._planner.request(flight.loc, priority, self._lane(flight.loc.blob))
                    self._kick()
            return flight
        if self.cache.on_disk(loc.digest):
            flight = _Flight(loc, priority, _State.DISK)
            self._flights[loc.digest] = flight
            self._nursery.start_soon(self._load_from_disk, flight)
        else:
            flight = _Flight(loc, priority, _State.FETCH)
            self._flights[loc.digest] = flight
            self.cache.record_miss()
            self._enqueue(flight)
        return flight

    def _enqueue(self, flight: _Flight) -> None:
        flight.state = _State.FETCH
        self._st["fetches"] += 1
        self._planner.request(flight.loc, flight.priority, self._lane(flight.loc.blob))
        self._kick()

    async def _wait(self, flight: _Flight, priority: Priority, deadline: float | None) -> bytes:
        limit = self.deadline if deadline is None else deadline
        demand = priority == Priority.DEMAND
        if demand:
            self._demand_enter()
        try:
            with trio.move_on_after(limit):
                await flight.done.wait()
        finally:
            if demand:
                self._demand_exit()
        if not flight.done.is_set():
            self._st["deadline_exceeded"] += 1
            raise FetchError(
                f"chunk {flight.loc.digest.hex()[:16]} of {flight.loc.blob}: not fetched within the {limit}s deadline"
            )
        if flight.error is not None:
            # The same error object reaches every waiter: reset its traceback each time.
            raise flight.error.with_traceback(None)
        return flight.result

    def _demand_enter(self) -> None:
        if self._demand_waiting == 0:
            self._demand_quiet = trio.Event()
        self._demand_waiting += 1

    def _demand_exit(self) -> None:
        self._demand_waiting -= 1
        if self._demand_waiting == 0:
            self._demand_quiet.set()

    async def _load_from_disk(self, flight: _Flight) -> None:
        try:
            raw = await self.cache.get_disk(flight.loc.digest)
        except Exception:  # a cache that cannot be read is a miss, not an outage
            log.exception("chunk cache read failed for %s", flight.loc.digest.hex())
            raw = None
        if self._flights.get(flight.loc.digest) is not flight:
            return
        if raw is not None:
            self._st["disk_hits"] += 1
            del self._flights[flight.loc.digest]
            self._settle(flight, raw)
        else:
            self.cache.record_miss()
            self._enqueue(flight)

    # ------------------------------------------------------------ executing

    def _kick(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _dispatch_forever(self) -> None:
        while True:
            wakeup = self._wakeup
            await wakeup.wait()
            # Waking one scheduling round after the request lets every reader
            # that became runnable in the same round queue first, so their
            # neighbouring frames coalesce into one read.
            self._wakeup = trio.Event()
            while (job := self._planner.next_job()) is not None:
                self._nursery.start_soon(self._run_job, job)

    async def _run_job(self, job: FetchJob) -> None:
        outcome: dict[bytes, bytes | LazyfsError] = {}
        self._st["wasted_bytes"] += job.wasted
        try:
            try:
                await self._execute(job, outcome)
            finally:
                self._planner.finish(job)
                self._kick()
                self._sweep(job, outcome)
        except Exception as exc:  # a bug must fail this job's readers, not the whole scheduler
            log.exception("fetch job for %s failed unexpectedly", job.blob)
            for loc in job.locations:
                if loc.digest not in outcome:
                    self._resolve(loc.digest, FetchError(f"internal error fetching {job.blob}: {exc!r}"), outcome)
        finally:
            stopped = FetchError("fetch scheduler stopped")
            for loc in job.locations:
                if loc.digest not in outcome:
                    self._resolve(loc.digest, stopped, outcome)
            # Chunks already served are written back even while the scheduler
            # stops (bounded), so what was read survives a restart.
            with trio.CancelScope(deadline=trio.current_time() + WRITE_BACK_GRACE, shield=True):
                for digest, result in outcome.items():
                    if isinstance(result, bytes):
                        await self.cache.write_pending(digest)  # no-op for what the job's worker wrote
                await self.cache.remove_evicted()

    def _sweep(self, job: FetchJob, outcome: dict[bytes, bytes | LazyfsError]) -> None:
        """Serve flights that joined this job after it had resolved their digest.

        Such a flight was told "in flight" by the planner, so nothing else
        would ever resolve it.
        """
        if self._closed:
            return
        for loc in job.locations:
            flight = self._flights.get(loc.digest)
            if flight is None or flight.state is not _State.FETCH or self._planner.is_pending(loc.digest):
                continue
            result = outcome.get(loc.digest)
            if isinstance(result, bytes):
                del self._flights[loc.digest]
                self._settle(flight, result)
            else:
                self._planner.request(flight.loc, flight.priority, self._lane(flight.loc.blob))

    def _chain_windows(self, locs: Sequence[ChunkLocation]) -> tuple[list[SpanLocation], dict[bytes, bytes]]:
        """For the chained spans of *locs*: the spans to fetch and decode with them (their prevs whose
        tail is not remembered, back to one that is or to a stored window), and the remembered tails."""
        have = {loc.digest for loc in locs}
        extra: dict[bytes, SpanLocation] = {}
        tails: dict[bytes, bytes] = {}
        for loc in locs:
            prev = loc.prev if isinstance(loc, SpanLocation) else None
            for _ in range(MAX_CHAIN + 1):  # bounded: the span map refuses longer chains
                if prev is None or prev.digest in have or prev.digest in extra:
                    break
                tail = self._tails.get(prev.digest)
                if tail is not None:
                    tails[prev.digest] = tail
                    break
                extra[prev.digest] = prev
                prev = prev.prev
        self._st["chain_spans"] += len(extra)
        return list(extra.values()), tails

    async def _load_windows(self, locs: Sequence[ChunkLocation], tails: dict[bytes, bytes]) -> None:
        """Put the stored windows *locs* need into *tails*: remembered ones, or read and verified.

        One ranged read per span map blob and run of windows (they lie in checkpoint order), from
        that blob's own backends in order. A window that fails its blake3 marks the source that
        served it, and the run is read again from another source (bounded by the sources). A window
        still missing afterwards fails its spans in ``_decode_job`` without blaming the source of
        the span's own bytes. Never raises a LazyfsError.
        """
        wanted: dict[bytes, ChunkLocation] = {}
        for loc in locs:  # the chain's roots among them
            w = loc.window_at if isinstance(loc, SpanLocation) else None
            if w is None or w.digest in tails:
                continue
            if w.digest in self._tails:
                tails[w.digest] = self._tails[w.digest]
            else:
                wanted[w.digest] = w
        for run in _window_runs(wanted.values()):
            await self._load_window_run(run, tails)

    async def _load_window_run(self, run: list[ChunkLocation], tails: dict[bytes, bytes]) -> None:
        blob, start, end = run[0].blob, run[0].offset, max(w.end for w in run)
        for backend in self.backends_for(blob):
            bad: set[str] = set()
            for _ in range(len(backend.sources) + 1):  # bounded: each pass excludes one more source
                try:
                    got = await self._read_range(backend, blob, start, end - start, bad)
                except LazyfsError as exc:
                    log.warning("windows %s %d+%d from %s: %s", blob, start, end - start, backend.name, exc)
                    break
                self._st["window_reads"] += 1
                frames = [(w, got.data[w.offset - start : w.end - start]) for w in run]
                decoded = await trio.to_thread.run_sync(_decode_windows, frames, got.source, limiter=self._cpu)
                good = {w.digest: raw for w, raw in decoded if isinstance(raw, bytes)}
                tails.update(good)
                self._remember_tails(good)
                if len(good) == len(run):
                    return
                for _w, raw in decoded:
                    if not isinstance(raw, bytes):
                        self._st["integrity_failures"] += 1
                        log.warning("%s", raw)
                bad.add(got.source)
                backend.source_failed_verification(got.source)
                if bad.issuperset(backend.sources):
                    break

    def _remember_tails(self, tails: dict[bytes, bytes]) -> None:
        for digest, tail in tails.items():
            self._tails.pop(digest, None)
            self._tails[digest] = tail
        for digest in list(self._tails)[: max(0, len(self._tails) - self.max_tails)]:
            del self._tails[digest]

    async def _cached_tails(self, locs: Sequence[ChunkLocation]) -> None:
        """Remember the tails of the spans that chained spans of *locs* follow and that another job is
        fetching now (readahead after the demand read of the span before it: wait for that job, which
        never waits for queued work) or that are cached (after a restart, or once the tails were
        forgotten: a verified cache read), instead of fetching the chain again."""
        have = {loc.digest for loc in locs}
        for loc in locs:
            prev = loc.prev if isinstance(loc, SpanLocation) else None
            if prev is None or prev.digest in have or prev.digest in self._tails:
                continue
            flight = self._flights.get(prev.digest)
            if flight is not None and self._planner.is_running(prev.digest):
                with trio.move_on_after(self.deadline):
                    await flight.done.wait()
            if prev.digest in self._tails or prev.digest not in self.cache:
                continue
            raw = await self.cache.get(prev.digest)
            tail = span_tail(prev, raw) if raw is not None else None
            if tail is not None:
                self._remember_tails({prev.digest: tail})

    async def _execute(self, job: FetchJob, outcome: dict[bytes, bytes | LazyfsError]) -> None:
        remaining = {loc.digest: loc for loc in job.locations}
        # a chained span is decoded with the tail of the span before it: remembered, read from the cache,
        # or fetched and decoded in this read
        await self._cached_tails(job.locations)
        chain, tails = self._chain_windows(job.locations)
        for loc in chain:
            remaining.setdefault(loc.digest, loc)
        first = min([job.offset, *(loc.offset for loc in chain)])
        bad_bytes: dict[bytes, IntegrityError] = {}
        last_error: LazyfsError | None = None
        with trio.move_on_after(self.deadline) as scope:
            for i, backend in enumerate(self.backends_for(job.blob)):
                if not remaining:
                    break
                if i:
                    self._st["failovers"] += 1
                bad_sources: set[str] = set()
                # Each pass reads what is still unverified from a source not yet caught serving
                # bad bytes; bounded by the backend's sources.
                while remaining and not bad_sources.issuperset(backend.sources):
                    locs = sorted(remaining.values(), key=_read_order)
                    whole = i == 0 and not bad_sources
                    start = first if whole else locs[0].offset
                    end = job.end if whole else max(l.end for l in locs)
                    try:
                        async with open_nursery() as nursery:  # stored windows are read alongside
                            nursery.start_soon(self._load_windows, locs, tails)
                            got = await self._read_range(backend, job.blob, start, end - start, bad_sources)
                    except LazyfsError as exc:
                        last_error = exc
                        log.warning("fetch %s %d+%d from %s failed: %s", job.blob, start, end - start, backend.name, exc)
                        break
                    view = memoryview(got.data)
                    frames = [(loc, view[loc.offset - start : loc.end - start]) for loc in locs]
                    # Each verified chunk is written once: into the flat layer files of the devices
                    # that use it when there are any (demand and readahead), else as a chunk file.
                    flat = self._flat_targets(locs)
                    write_back = [loc.digest for loc in locs
                                  if loc.digest not in flat and self.cache.wants_write(loc.digest, loc.raw_length)]
                    # One thread hop for the whole coalesced read: decode, verify and the cache
                    # write-back of every chunk in it run in the same worker.
                    try:
                        decoded = await trio.to_thread.run_sync(
                            _decode_job, frames, got.source, self.cache.writer(write_back), flat, tails,
                            limiter=self._cpu)
                    finally:
                        for targets in flat.values():
                            self.flat.release_targets(targets)
                    self._st["decode_hops"] += 1
                    self._remember_tails({loc.digest: tails[loc.digest] for loc in locs if loc.digest in tails})
                    served_bad = False
                    for loc, result, written, flat_written in decoded:
                        if isinstance(result, IntegrityError):
                            self._st["integrity_failures"] += 1
                            bad_bytes[loc.digest] = result
                            served_bad = True
                            log.warning("%s", result)
                            continue
                        if isinstance(result, (FormatError, FetchError)):  # no other source of these bytes can help
                            del remaining[loc.digest]
                            self._resolve(loc.digest, result, outcome)
                            continue
                        del remaining[loc.digest]
                        self.cache.written(loc.digest, len(result), written)
                        if flat_written is not None:
                            self.flat.committed(loc.digest, flat_written)
                        self._resolve(loc.digest, result, outcome, disk=loc.digest not in flat)
                    if not served_bad or got.source in bad_sources:
                        break
                    bad_sources.add(got.source)
                    backend.source_failed_verification(got.source)
                    if remaining and not bad_sources.issuperset(backend.sources):
                        self._st["failovers"] += 1
        if not remaining:
            return
        if scope.cancelled_caught:
            self._st["deadline_exceeded"] += 1
        for digest, loc in remaining.items():
            if digest in bad_bytes:
                error: LazyfsError = bad_bytes[digest]
            elif scope.cancelled_caught:
                error = FetchError(f"chunk {digest.hex()[:16]} of {job.blob}: deadline of {self.deadline}s exceeded")
            else:
                error = last_error or FetchError(f"no backend could serve {job.blob}")
            self._resolve(digest, error, outcome)

    async def _read_range(self, backend: Backend, blob: str, offset: int, length: int,
                          exclude: Collection[str] = ()) -> SourcedBytes:
        """One ranged read from a source of *backend* not in *exclude*.

        A backend that retries and fails over itself (``backend.retries``, the registry
        client) is called once: its retry layer and deadline are the only ones. Others are
        retried here on transient errors, with exponential backoff and jitter, each attempt
        bounded by ``attempt_timeout``.
        """
        attempt = 0
        while True:
            self._st["ranged_gets"] += 1
            try:
                if backend.retries:
                    got = await backend.read_range_from(blob, offset, length, exclude=exclude)
                else:
                    with trio.fail_after(self.attempt_timeout):
                        got = await backend.read_range_from(blob, offset, length, exclude=exclude)
                if len(got.data) != length:
                    raise FetchError(f"{backend.name}: short read of {blob}: {len(got.data)} of {length} bytes at {offset}")
            except trio.TooSlowError:
                error = FetchError(f"{backend.name}: no answer for {blob} {offset}+{length} within {self.attempt_timeout}s")
            except (AuthError, NotFoundError):
                self._st["fetch_errors"] += 1
                raise  # retrying cannot help; the next backend might
            except FetchError as exc:
                error = exc
            except OSError as exc:
                error = FetchError(f"{backend.name}: {exc}")
            else:
                self._st["bytes_fetched"] += len(got.data)
                return got
            self._st["fetch_errors"] += 1
            attempt += 1
            if backend.retries or attempt > self.max_retries:
                raise error
            self._st["retries"] += 1
            cap = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
            await trio.sleep(cap * random.uniform(0.5, 1.0))

    def _flat_targets(self, locs: Sequence[ChunkLocation]) -> dict[bytes, list]:
        """Per chunk of *locs*, the flat layer files to write it into instead of a chunk file (trio thread).

        Background chunks (hydration) stay chunk files: a hydrated image is kept local by the chunk
        tier (``ChunkCache.protected``), which flat files, evicted whole when unused, do not promise."""
        if self.flat is None:
            return {}
        out = {}
        for loc in locs:
            flight = self._flights.get(loc.digest)
            if flight is not None and flight.priority == Priority.BACKGROUND:
                continue
            targets = self.flat.targets(loc.digest, loc.raw_length)
            if targets:
                out[loc.digest] = targets
        return out

    def _resolve(self, digest: bytes, result: bytes | LazyfsError, outcome: dict, *, disk: bool = True) -> None:
        outcome[digest] = result
        flight = self._flights.pop(digest, None)
        if isinstance(result, bytes):
            # Bulk background chunks go to disk only, so they do not flush the hot set.
            in_memory = flight is None or flight.priority != Priority.BACKGROUND
            self.cache.admit(digest, result, memory=in_memory, disk=disk)
        if flight is not None:
            self._settle(flight, result)

    @staticmethod
    def _settle(flight: _Flight, result: bytes | LazyfsError) -> None:
        if isinstance(result, bytes):
            flight.result = result
        else:
            flight.error = result
        flight.done.set()

    # ------------------------------------------------------------ background download

    async def background_download(
        self,
        locations: Iterable[ChunkLocation],
        rate_bytes_per_s: float,
        delay_s: float = 0.0,
        *,
        window: int = 64,
    ) -> dict:
        """After *delay_s*, fetch every chunk of *locations* not cached yet at BACKGROUND priority.

        At most *rate_bytes_per_s* (stored bytes, token bucket with a burst of
        one max range), at most *window* chunks outstanding, and no new chunk
        is started while a demand read is waiting. Failed chunks are counted
        and skipped. Returns counts: chunks, bytes, skipped (already cached or
        listed twice), failed.
        """
        if window <= 0:
            raise ConfigError(f"background window must be positive, got {window}")
        await trio.sleep(delay_s)
        bucket = TokenBucket(rate_bytes_per_s, self._planner.max_range, trio.current_time())
        outstanding = trio.Semaphore(window)
        result = {"chunks": 0, "bytes": 0, "skipped": 0, "failed": 0}
        seen: set[bytes] = set()

        async def fetch_one(loc: ChunkLocation) -> None:
            try:
                await self.ensure(loc, Priority.BACKGROUND, deadline=math.inf)
            except LazyfsError as exc:
                result["failed"] += 1
                log.warning("background download of chunk %s failed: %s", loc.digest.hex()[:16], exc)
            else:
                result["chunks"] += 1
                result["bytes"] += loc.compressed_length
                self._st["background_chunks"] += 1
                self._st["background_bytes"] += loc.compressed_length
            finally:
                outstanding.release()

        async with open_nursery() as nursery:
            for loc in locations:
                if loc.digest in seen or loc.digest in self.cache:
                    result["skipped"] += 1
                    continue
                seen.add(loc.digest)
                await outstanding.acquire()
                await self._demand_quiet.wait()  # yield to readers first
                if loc.digest in self.cache:
                    outstanding.release()
                    result["skipped"] += 1
                    continue
                delay = bucket.reserve(loc.compressed_length, trio.current_time())
                if delay > 0:
                    await trio.sleep(delay)
                nursery.start_soon(fetch_one, loc)
        return result

    # ------------------------------------------------------------ statistics

    def statistics(self) -> dict:
        return {
            **self._st,
            "in_flight": len(self._flights),
            "span_tails": len(self._tails),
            "demand_waiting": self._demand_waiting,
            "latency": self._latency.snapshot(),
            "planner": self._planner.statistics(),
            "cache": self.cache.statistics(),
        }


def _same_place(a: ChunkLocation, b: ChunkLocation) -> bool:
    """Whether two locations of one digest read the same stored bytes (chunks and spans alike)."""
    return a == b


def _read_order(loc: ChunkLocation) -> tuple[int, int]:
    """Frames are decoded in blob order; a chained span comes after its prev (an earlier tar offset)."""
    return loc.offset, loc.tar_offset if isinstance(loc, SpanLocation) else 0


def _window_runs(windows, max_gap: int = 64 << 10, max_run: int = 1 << 20) -> list[list[ChunkLocation]]:
    """Stored windows grouped into runs read with one ranged read each: the same blob, close together."""
    runs: list[list[ChunkLocation]] = []
    for w in sorted(windows, key=lambda w: (w.blob, w.offset)):
        run = runs[-1] if runs else None
        if run and run[-1].blob == w.blob and w.offset - run[-1].end <= max_gap and w.end - run[0].offset <= max_run:
            run.append(w)
        else:
            runs.append([w])
    return runs


def _decode_windows(frames, source: str) -> list:
    """Worker thread: each stored window's verified bytes, or the IntegrityError/FormatError it raised."""
    out = []
    for w, frame in frames:
        try:
            out.append((w, decode_window(w, frame, source)))
        except (IntegrityError, FormatError) as exc:
            out.append((w, exc))
    return out


def _decode_job(frames, source: str, write, flat: dict, tails: dict[bytes, bytes]) -> list:
    """Worker thread: decode and verify every frame of one read, writing verified chunks back.

    Returns ``(loc, raw | IntegrityError | FormatError | FetchError, chunk-file write result,
    flat write result)`` per frame, in order; nothing unverified is written (*write* and the flat
    files only ever see bytes that matched their digest). A chunk with *flat* targets goes there,
    not to a chunk file.
    *tails*: span digest -> last WINDOW raw bytes, the windows of chained spans, and window digest ->
    stored window; the tails of the gzip spans decoded here are added to it (only this job's worker
    touches it meanwhile).
    """
    out = []
    for loc, frame in frames:
        key = window_key(loc)
        window = tails.get(key) if key is not None else None
        try:
            if key is not None and window is None:
                if loc.prev is not None:
                    # its prev was in this read and failed verification: these bytes cannot be checked either
                    raise IntegrityError(f"span {loc.digest.hex()[:16]} of {loc.blob}", "the span before it",
                                         "bad bytes", source)
                # no source served its stored window verified (_load_windows tried them all): the
                # span's own bytes are not to blame, and no other source of them can help
                raise FetchError(f"span {loc.digest.hex()[:16]} of {loc.blob}: its stored window "
                                 f"{loc.window_at.digest.hex()[:16]} could not be read verified from any source")
            raw = decode_location(loc, frame, source, window)
        except (IntegrityError, FormatError, FetchError) as exc:
            out.append((loc, exc, None, None))
            continue
        tail = span_tail(loc, raw)
        if tail is not None:
            tails[loc.digest] = tail
        targets = flat.get(loc.digest)
        if targets:
            out.append((loc, raw, None, write_targets(targets, raw)))
        else:
            out.append((loc, raw, write(loc.digest, raw), None))
    return out
