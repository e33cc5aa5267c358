"""Hydration: make an attached image fully local in the background, within a rate or by a deadline.

A hydrated image has every chunk its merged view can read in the host's chunk cache, so it runs
with the registry gone (docs/daemon.md, "Offline life"). The work is the fetch scheduler's
background download (BACKGROUND priority: demand reads go first); this module only decides how
much to ask for, at what rate, and reports progress.

* ``HydratePolicy`` (a value, kept in the daemon's state file): a fixed rate, or a wall-clock
  deadline from which the rate is derived, again before every batch, as remaining stored bytes
  over remaining seconds. Past the deadline, or with neither, the configured rate applies
  (0: as fast as the fetch scheduler goes).
* ``plan_batch`` (pure): the next chunks to fetch, about ``BATCH_SECONDS`` worth at the rate.
* ``Hydrator`` (the trio shell): runs until cancelled. Once everything is local it checks again
  every ``RECHECK_SECONDS`` and fetches what the cache evicted meanwhile; failed batches back off.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


class Hydrator:
    """Keeps one attachment's chunks local (see the module docstring); ``run`` until ``cancel``.

    *locations* are the image's distinct chunks; *is_cached* and *download* are the scheduler's
    ``is_cached`` and ``background_download``; *clock* is wall-clock time, for the deadline.
    """

    def __init__(self, locations: Sequence[ChunkLocation], policy: HydratePolicy, *,
                 is_cached: Callable[[bytes], bool], download, default_rate: int, max_range: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.locations = tuple(locations)
        self.policy = policy
        self._is_cached, self._download = is_cached, download
        self.default_rate, self.max_range, self.clock = default_rate, max_range, clock
        self.bytes_total = sum(loc.compressed_length for loc in self.locations)
        self.raw_total = sum(loc.raw_length for loc in self.locations)
        self.rate = 0.0  # the rate of the current batch
        self.hydrated_at: float | None = None
        self.st = {"batches": 0, "chunks_fetched": 0, "bytes_fetched": 0, "chunks_failed": 0}
        self._scope = trio.CancelScope()

    def cancel(self) -> None:
        self._scope.cancel()

    def missing(self) -> list[ChunkLocation]:
        return [loc for loc in self.locations if not self._is_cached(loc.digest)]

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
                while start < len(missing):  # one pass over what was missing, batch by batch
                    remaining = sum(loc.compressed_length for loc in missing[start:])
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
                    start = end
                if failed:  # the registry is away: try again later, not in a busy loop
                    backoff = min(BACKOFF[1], max(BACKOFF[0], 2 * backoff))
                    await trio.sleep(backoff)
                else:
                    backoff = 0.0

    def statistics(self) -> dict:
        """Progress: stored bytes local of total, and whether every chunk is local now."""
        local_chunks = local_bytes = 0
        for loc in self.locations:
            if self._is_cached(loc.digest):
                local_chunks += 1
                local_bytes += loc.compressed_length
        hydrated = local_chunks == len(self.locations)
        return {"hydrated": hydrated, "bytes_local": local_bytes, "bytes_total": self.bytes_total,
                "chunks_local": local_chunks, "chunks_total": len(self.locations), "rate": self.rate,
                "deadline_at": self.policy.deadline_at, "hydrated_at": self.hydrated_at if hydrated else None,
                **self.st}
