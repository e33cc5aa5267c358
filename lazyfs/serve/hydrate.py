"""Hydration: make an attached image fully local in the background, within a rate or by a deadline.

A hydrated image has every chunk its merged view can read on this host, so it runs with the
registry gone (docs/daemon.md, "Offline life"): in the chunk cache, or held in the device's flat
layer files (every segment of the chunk; the cold path writes a fetched chunk there and no chunk
file, and those files are never evicted while the image is attached), so what the image already
read is never fetched again. The work is the fetch scheduler's background download (BACKGROUND
priority: demand reads go first); this module only decides how much to ask for, at what rate,
and reports progress.

* ``HydratePolicy`` (a value, kept in the daemon's state file): a fixed rate, or a wall-clock
  deadline from which the rate is derived, again before every batch, as remaining stored bytes
  over remaining seconds. Past the deadline, or with neither, the configured rate applies
  (0: as fast as the fetch scheduler goes).
* ``plan_batch`` (pure): the next chunks to fetch, about ``BATCH_SECONDS`` worth at the rate.
* ``Hydrator`` (the trio shell): runs until cancelled. Once everything is local it checks again
  every ``RECHECK_SECONDS`` and fetches what the cache evicted meanwhile; failed batches back off.
  Its progress (chunks and bytes local) is a counter the ``watch`` of the chunk cache and of the
  device's block cache keep current, counted once at attach or restore: ``statistics()``
  (``lazyfs stats``, /metrics) is O(1).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from lazyfs.device.chunks import ChunkLocation
from lazyfs.errors import ConfigError, LazyfsError

log = logging.getLogger(__name__)

UNLIMITED = 1e12  # bytes/s: the token bucket needs a positive rate
MIN_DEADLINE_RATE = 64 << 10  # a deadline far away still makes progress
BATCH_SECONDS = 10.0  # the rate is recomputed this often (the bucket's burst is one max range per batch)
MAX_BATCH_CHUNKS = 4096
RECHECK_SECONDS = 60.0
BACKOFF = (1.0, 60.0)  # first and longest wait after a batch with failures


@dataclass(frozen=True, slots=True)
class HydratePolicy:
    """How fast to hydrate: *rate* bytes/s, or by *deadline_at* (Unix time); neither: the default."""

    rate: int | None = None
    deadline_at: float | None = None

    @classmethod
    def from_request(cls, value: object, now: float) -> "HydratePolicy | None":
        """The policy a control request or a state record asks for.

        ``None``/``False``: no hydration; ``True``: the default rate; a dict with ``rate``
        (bytes/s), ``deadline`` (seconds from *now*) or ``deadline_at`` (Unix time, as kept in
        the state file) — at most one of them.
        """
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, dict) or set(value) - {"rate", "deadline", "deadline_at"}:
            raise ConfigError(f"hydrate must be true, false or an object with rate or deadline, not {value!r}")
        if len(value) > 1:
            raise ConfigError("hydrate: give a rate or a deadline, not both")
        for key, number in value.items():
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ConfigError(f"hydrate {key} must be a number, not {number!r}")
        if "rate" in value:
            if value["rate"] <= 0:
                raise ConfigError(f"hydrate rate must be positive bytes per second, not {value['rate']!r}")
            return cls(rate=int(value["rate"]))
        if "deadline" in value:
            if value["deadline"] <= 0:
                raise ConfigError(f"hydrate deadline must be positive seconds, not {value['deadline']!r}")
            return cls(deadline_at=now + float(value["deadline"]))
        if "deadline_at" in value:
            return cls(deadline_at=float(value["deadline_at"]))
        return cls()

    def to_json(self) -> dict:
        """What the state file keeps (``from_request`` reads it back)."""
        if self.rate is not None:
            return {"rate": self.rate}
        if self.deadline_at is not None:
            return {"deadline_at": self.deadline_at}
        return {}

    def rate_now(self, remaining_bytes: int, now: float, default_rate: int) -> float:
        """Bytes/s to fetch at now: the fixed rate, or what meets the deadline, else *default_rate* (0: unlimited)."""
        if self.rate is not None:
            return float(self.rate)
        if self.deadline_at is not None and now < self.deadline_at:
            return max(MIN_DEADLINE_RATE, remaining_bytes / (self.deadline_at - now))
        return float(default_rate) if default_rate > 0 else UNLIMITED


def plan_batch(missing: Sequence[ChunkLocation], start: int, rate: float, max_range: int) -> int:
    """The end index of the batch ``missing[start:end]``: about BATCH_SECONDS at *rate*, at least
    eight max ranges (so the bucket's burst of one range stays a small overshoot), at least one chunk."""
    budget = max(8 * max_range, rate * BATCH_SECONDS)
    end, taken = start, 0
    while end < len(missing) and end - start < MAX_BATCH_CHUNKS and (taken < budget or end == start):
        taken += missing[end].compressed_length
        end += 1
    return end


class WatchedCache(Protocol):
    """What a Hydrator needs of the chunk cache (``ChunkCache`` is one)."""

    def __contains__(self, digest: bytes) -> bool: ...

    def watch(self, callback: Callable[[bytes, bool], None]) -> Callable[[], None]: ...


class WatchedHolder(Protocol):
    """What a Hydrator needs of the chunks a device's block cache holds (``HeldByBlockCache``)."""

    def __contains__(self, digest: bytes) -> bool: ...

    def watch(self, callback: Callable[[bytes], None]) -> Callable[[], None]: ...


class HeldByBlockCache:
    """The chunks of *device* its block cache (the flat layer files) holds at every segment of the
    chunk in the merged view, so a read of any of them is served without the chunk. The flat files
    list only blocks written from verified chunks, and every read of them is verified again."""

    def __init__(self, device) -> None:
        self._bc = getattr(device, "block_cache", None)
        self._segments: dict[bytes, list] = {}
        if self._bc is not None:
            for seg in device.index.segments:
                if seg.loc is not None:
                    self._segments.setdefault(seg.loc.digest, []).append(seg)

    def __contains__(self, digest: bytes) -> bool:
        segments = self._segments.get(digest)
        return bool(segments) and all(self._bc.holds(seg) for seg in segments)

    def watch(self, callback: Callable[[bytes], None]) -> Callable[[], None]:
        return self._bc.watch(callback) if self._bc is not None else (lambda: None)


class Hydrator:
    """Keeps one attachment's chunks local (see the module docstring); ``run`` until ``cancel``.

    *locations* are the image's distinct chunks; *cache* is the chunk cache the scheduler fills
    (its ``watch`` keeps the progress counter current until ``cancel``); *held*: the chunks the
    device's block cache holds (local as well: neither counted missing nor fetched; its ``watch``
    keeps the counter current too); *download* is the scheduler's ``background_download``;
    *clock* is wall-clock time, for the deadline.
    """

    def __init__(self, locations: Sequence[ChunkLocation], policy: HydratePolicy, *,
                 cache: WatchedCache, download, default_rate: int, max_range: int,
                 held: WatchedHolder | None = None, clock: Callable[[], float] = time.time) -> None:
        self.locations = tuple(locations)
        self.policy = policy
        self._cache, self._download, self._held = cache, download, held
        self.default_rate, self.max_range, self.clock = default_rate, max_range, clock
        self.bytes_total = sum(loc.compressed_length for loc in self.locations)
        self.raw_total = sum(loc.raw_length for loc in self.locations)
        self.rate = 0.0  # the rate of the current batch
        self.hydrated_at: float | None = None
        self.st = {"batches": 0, "chunks_fetched": 0, "bytes_fetched": 0, "chunks_failed": 0}
        self._scope = trio.CancelScope()
        self._by_digest = {loc.digest: loc for loc in self.locations}
        self._local: set[bytes] = set()
        self.chunks_local = self.bytes_local = 0
        # watching before the count: nothing slips between
        self._unwatch = cache.watch(self._cache_changed)
        self._unwatch_held = held.watch(self._held_changed) if held is not None else (lambda: None)
        for loc in self.locations:  # the only full count: at attach (or restore, after a restart)
            if self._is_local(loc.digest):
                self._count(loc.digest, True)

    def _is_local(self, digest: bytes) -> bool:
        return digest in self._cache or (self._held is not None and digest in self._held)

    def _cache_changed(self, digest: bytes, present: bool) -> None:
        if digest in self._by_digest:  # a chunk gone from the chunk cache may still be in the flat files
            self._count(digest, present or (self._held is not None and digest in self._held))

    def _held_changed(self, digest: bytes) -> None:
        if digest in self._by_digest:
            self._count(digest, self._is_local(digest))

    def _count(self, digest: bytes, present: bool) -> None:
        loc = self._by_digest.get(digest)
        if loc is None or (digest in self._local) == present:
            return
        sign = 1 if present else -1
        if present:
            self._local.add(digest)
        else:
            self._local.discard(digest)
        self.chunks_local += sign
        self.bytes_local += sign * loc.compressed_length

    def cancel(self) -> None:
        """Stop running and stop counting (idempotent)."""
        self._scope.cancel()
        self._unwatch()
        self._unwatch_held()

    @property
    def hydrated(self) -> bool:
        return self.chunks_local == len(self.locations)

    def missing(self) -> list[ChunkLocation]:
        """The chunks not local now, in virtual order (none without a scan when all are local)."""
        if self.hydrated:
            return []
        return [loc for loc in self.locations if not self._is_local(loc.digest)]

    async def run(self) -> None:
        backoff = 0.0
        with self._scope:
            while True:  # ends by cancellation (detach, shutdown)
                missing = self.missing()
                if not missing:
                    if self.hydrated_at is None:
                        self.hydrated_at = self.clock()
                        log.info("hydrated: %d chunks, %d stored bytes local", len(self.locations), self.bytes_total)
                    await trio.sleep(RECHECK_SECONDS)
                    continue
                failed = 0
                start = 0
                remaining = sum(loc.compressed_length for loc in missing)
                while start < len(missing):  # one pass over what was missing, batch by batch
                    self.rate = self.policy.rate_now(remaining, self.clock(), self.default_rate)
                    end = plan_batch(missing, start, self.rate, self.max_range)
                    try:
                        result = await self._download(missing[start:end], self.rate)
                    except LazyfsError as exc:
                        log.warning("hydration batch failed: %s", exc)
                        result = {"failed": end - start, "chunks": 0, "bytes": 0}
                    self.st["batches"] += 1
                    self.st["chunks_fetched"] += result["chunks"]
                    self.st["bytes_fetched"] += result["bytes"]
                    self.st["chunks_failed"] += result["failed"]
                    failed += result["failed"]
                    remaining -= sum(loc.compressed_length for loc in missing[start:end])
                    start = end
                if failed:  # the registry is away: try again later, not in a busy loop
                    backoff = min(BACKOFF[1], max(BACKOFF[0], 2 * backoff))
                    await trio.sleep(backoff)
                else:
                    backoff = 0.0

    def statistics(self) -> dict:
        """Progress: stored bytes local of total, and whether every chunk is local now (O(1))."""
        hydrated = self.hydrated
        return {"hydrated": hydrated, "bytes_local": self.bytes_local, "bytes_total": self.bytes_total,
                "chunks_local": self.chunks_local, "chunks_total": len(self.locations), "rate": self.rate,
                "deadline_at": self.policy.deadline_at, "hydrated_at": self.hydrated_at if hydrated else None,
                **self.st}
