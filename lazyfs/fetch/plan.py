"""The fetch planner: which bytes to fetch next, as a plain object (no I/O, no trio).

The trio scheduler (``lazyfs.fetch.scheduler``) only executes what this
decides, so every policy here is unit-testable without a backend:

* **single flight**: a chunk digest is planned at most once while it is
  queued or in flight; asking again joins it, asking more urgently upgrades
  its priority while it is still queued;
* **strict priority**: per lane, the most urgent queued request leads the next
  job (FIFO within a priority). A demand request never waits behind lower
  priorities: while one is queued in a lane, nothing less urgent starts there,
  and ``reserved_for_demand`` slots of a lane are never used by other work;
* **coalescing**: queued frames of the same blob and priority that are adjacent
  or separated by at most ``max_gap`` bytes join the leader's job, as one
  ranged read of at most ``max_range`` bytes (a single frame larger than
  ``max_range`` is fetched alone); bytes of the gaps are counted as wasted.
  The cut does not depend on the order requests arrived in;
* **bounded concurrency**: at most ``max_jobs`` jobs in flight per lane (a lane
  is whatever the caller keys it on: the scheduler uses the primary backend).

``TokenBucket`` (rate limiting for background download) lives here for the
same reason: it is arithmetic over a clock the caller passes in.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import itertools
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from lazyfs.device.chunks import ChunkLocation, Priority
from lazyfs.errors import ConfigError

__all__ = ["FetchJob", "FetchPlanner", "RequestStatus", "TokenBucket", "DEFAULT_MAX_RANGE", "DEFAULT_MAX_GAP"]

DEFAULT_MAX_RANGE = 4 << 20
DEFAULT_MAX_GAP = 64 << 10
_MAX_WALK = 1024  # frames a job looks back for the start of its run


class RequestStatus(enum.Enum):
    """What ``FetchPlanner.request`` did with a request."""

    QUEUED = "queued"  # new: will be part of a future job
    UPGRADED = "upgraded"  # was queued less urgently; now queued at this priority
    JOINED_QUEUED = "joined-queued"  # already queued at this priority or more urgently
    JOINED_IN_FLIGHT = "joined-in-flight"  # already part of a running job


@dataclass(frozen=True, slots=True)
class FetchJob:
    """One ranged read: ``length`` bytes of ``blob`` from ``offset``, holding ``locations``.

    ``locations`` are sorted by offset and lie inside the range; ``wasted`` is
    the number of bytes of the range that belong to no requested frame.
    """

    job_id: int
    lane: Hashable
    blob: str
    offset: int
    length: int
    locations: tuple[ChunkLocation, ...]
    priority: Priority
    wasted: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class _Request:
    loc: ChunkLocation
    priority: Priority
    seq: int
    lane: Hashable


@dataclass(slots=True)
class _Lane:
    heap: list[tuple[int, int, bytes]] = field(default_factory=list)  # (priority, seq, digest), lazily pruned
    in_flight: int = 0
    queued: int = 0


class FetchPlanner:
    """Decides the next fetch jobs from chunk requests; see the module docstring for the policy.

    Protocol: ``request()`` chunks; take jobs with ``next_job()`` until it
    returns None; call ``finish(job)`` exactly once per job when its read is
    over (whatever the outcome) — that frees its slot and its digests, which
    may then be requested again (e.g. after a failure).
    """

    def __init__(
        self,
        *,
        max_range: int = DEFAULT_MAX_RANGE,
        max_gap: int = DEFAULT_MAX_GAP,
        max_jobs: int = 8,
        reserved_for_demand: int = 2,
    ) -> None:
        if max_range <= 0:
            raise ConfigError(f"fetch max_range must be positive, got {max_range}")
        if max_gap < 0:
            raise ConfigError(f"fetch max_gap must not be negative, got {max_gap}")
        if max_jobs <= 0:
            raise ConfigError(f"fetch max_jobs must be positive, got {max_jobs}")
        if not 0 <= reserved_for_demand < max_jobs:
            raise ConfigError(f"fetch reserved_for_demand must be in [0, max_jobs), got {reserved_for_demand}")
        self.max_range = max_range
        self.max_gap = max_gap
        self.max_jobs = max_jobs
        self.reserved_for_demand = reserved_for_demand
        self._queued: dict[bytes, _Request] = {}
        self._in_flight: dict[bytes, int] = {}  # digest -> job_id
        self._jobs: dict[int, FetchJob] = {}
        # (blob, priority) -> sorted [(offset, digest)] of queued frames, for coalescing
        self._by_blob: dict[tuple[str, int], list[tuple[int, bytes]]] = {}
        self._lanes: dict[Hashable, _Lane] = {}
        self._lane_order: list[Hashable] = []
        self._next_lane = 0
        self._seq = itertools.count()
        self._job_ids = itertools.count(1)
        self._queued_by_priority = {p: 0 for p in Priority}
        self._stats = {
            "requests": 0,
            "joined": 0,
            "upgraded": 0,
            "jobs": 0,
            "chunks_planned": 0,
            "coalesced": 0,
            "bytes_planned": 0,
            "wasted_bytes": 0,
        }

    # ------------------------------------------------------------ requests

    def request(self, loc: ChunkLocation, priority: Priority = Priority.DEMAND, lane: Hashable = None) -> RequestStatus:
        """Ask for the chunk at *loc*; the lane only matters when the digest is new."""
        priority = Priority(priority)
        self._stats["requests"] += 1
        digest = loc.digest
        if digest in self._in_flight:
            self._stats["joined"] += 1
            return RequestStatus.JOINED_IN_FLIGHT
        req = self._queued.get(digest)
        if req is not None:
            if priority >= req.priority:
                self._stats["joined"] += 1
                return RequestStatus.JOINED_QUEUED
            self._unindex(req)
            req.priority = priority
            self._index(req)
            self._stats["upgraded"] += 1
            return RequestStatus.UPGRADED
        if loc.compressed_length <= 0 or loc.offset < 0:
            raise ValueError(f"chunk {digest.hex()[:16]}: bad frame at {loc.offset}+{loc.compressed_length}")
        req = _Request(loc, priority, next(self._seq), lane)
        self._queued[digest] = req
        if lane not in self._lanes:
            self._lanes[lane] = _Lane()
            self._lane_order.append(lane)
        self._lanes[lane].queued += 1
        self._index(req)
        return RequestStatus.QUEUED

    def is_running(self, digest: bytes) -> bool:
        """Whether *digest* is in a job that has started (it will end without waiting for queued work)."""
        return digest in self._in_flight

    def is_pending(self, digest: bytes) -> bool:
        """Whether *digest* is queued or in flight."""
        return digest in self._queued or digest in self._in_flight

    def queued_priority(self, digest: bytes) -> Priority | None:
        req = self._queued.get(digest)
        return None if req is None else req.priority

    def demand_waiting(self) -> bool:
        """Whether any demand request is queued (not yet started) in any lane."""
        return self._queued_by_priority[Priority.DEMAND] > 0

    def _index(self, req: _Request) -> None:
        loc = req.loc
        heapq.heappush(self._lanes[req.lane].heap, (int(req.priority), req.seq, loc.digest))
        bisect.insort(self._by_blob.setdefault((loc.blob, int(req.priority)), []), (loc.offset, loc.digest))
        self._queued_by_priority[req.priority] += 1

    def _unindex(self, req: _Request) -> None:
        # The heap entry is left behind and skipped later (lazy deletion).
        key = (req.loc.blob, int(req.priority))
        frames = self._by_blob[key]
        i = bisect.bisect_left(frames, (req.loc.offset, req.loc.digest))
        assert frames[i] == (req.loc.offset, req.loc.digest)
        del frames[i]
        if not frames:
            del self._by_blob[key]
        self._queued_by_priority[req.priority] -= 1

    def _dequeue(self, req: _Request) -> None:
        self._unindex(req)
        del self._queued[req.loc.digest]
        self._lanes[req.lane].queued -= 1

    # ------------------------------------------------------------ jobs

    def next_job(self) -> FetchJob | None:
        """The next job allowed to start now (marked in flight), or None.

        Lanes take turns so one busy backend does not starve another.
        """
        n = len(self._lane_order)
        for i in range(n):
            lane_key = self._lane_order[(self._next_lane + i) % n]
            lane = self._lanes[lane_key]
            leader = self._leader(lane)
            if leader is None or lane.in_flight >= self.max_jobs:
                continue
            if leader.priority != Priority.DEMAND and lane.in_flight >= self.max_jobs - self.reserved_for_demand:
                continue
            self._next_lane = (self._next_lane + i + 1) % n
            return self._start(lane_key, lane, leader)
        return None

    def _leader(self, lane: _Lane) -> _Request | None:
        heap = lane.heap
        while heap:
            priority, seq, digest = heap[0]
            req = self._queued.get(digest)
            if req is not None and req.seq == seq and int(req.priority) == priority:
                return req
            heapq.heappop(heap)
        return None

    def _start(self, lane_key: Hashable, lane: _Lane, leader: _Request) -> FetchJob:
        members = self._coalesce(leader)
        for req in members:
            self._dequeue(req)
        members.sort(key=lambda r: (r.loc.offset, r.loc.digest))
        start = min(r.loc.offset for r in members)
        end = max(r.loc.end for r in members)
        covered = _union_length([(r.loc.offset, r.loc.end) for r in members])
        job = FetchJob(
            job_id=next(self._job_ids),
            lane=lane_key,
            blob=leader.loc.blob,
            offset=start,
            length=end - start,
            locations=tuple(r.loc for r in members),
            priority=leader.priority,
            wasted=(end - start) - covered,
        )
        for loc in job.locations:
            self._in_flight[loc.digest] = job.job_id
        self._jobs[job.job_id] = job
        lane.in_flight += 1
        st = self._stats
        st["jobs"] += 1
        st["chunks_planned"] += len(members)
        st["coalesced"] += len(members) - 1
        st["bytes_planned"] += job.length
        st["wasted_bytes"] += job.wasted
        return job

    def _coalesce(self, leader: _Request) -> list[_Request]:
        """The leader plus queued frames of its blob and priority near it, within max_range.

        A run of queued frames (consecutive gaps <= max_gap) is cut into
        pieces greedily from its first frame, and the job is the piece that
        holds the leader. Cutting from the run's start rather than around the
        leader makes the cut independent of the order the requests arrived
        in (readers of one large read arrive in any order), and taking a piece
        out leaves the rest of the run's cut unchanged — so a run is always
        fetched in the fewest reads.
        """
        frames = self._by_blob[(leader.loc.blob, int(leader.priority))]
        queued = self._queued
        i = bisect.bisect_left(frames, (leader.loc.offset, leader.loc.digest))
        first = i
        # Bounded walk back to the run's start: keeps a job's cost O(_MAX_WALK + piece).
        while first > 0 and i - first < _MAX_WALK:
            prev = queued[frames[first - 1][1]].loc
            if frames[first][0] - prev.end > self.max_gap:
                break
            first -= 1
        k = first
        while True:
            piece = k
            start, end = frames[k][0], queued[frames[k][1]].loc.end
            k += 1
            while k < len(frames):
                loc = queued[frames[k][1]].loc
                if loc.offset - end > self.max_gap or max(end, loc.end) - start > self.max_range:
                    break
                end = max(end, loc.end)
                k += 1
            if k > i:
                return [queued[digest] for _, digest in frames[piece:k]]

    def finish(self, job: FetchJob) -> None:
        """The read of *job* is over: free its slot and forget its digests."""
        if self._jobs.pop(job.job_id, None) is None:
            raise ValueError(f"fetch job {job.job_id} is not in flight")
        for loc in job.locations:
            if self._in_flight.get(loc.digest) == job.job_id:
                del self._in_flight[loc.digest]
        self._lanes[job.lane].in_flight -= 1

    # ------------------------------------------------------------ introspection

    def in_flight_jobs(self, lane: Hashable = ...) -> int:
        """Jobs started and not finished (in *lane*, or in all lanes)."""
        if lane is ...:
            return len(self._jobs)
        entry = self._lanes.get(lane)
        return 0 if entry is None else entry.in_flight

    def queued(self) -> int:
        return len(self._queued)

    def statistics(self) -> dict:
        return {
            **self._stats,
            "queued": len(self._queued),
            "queued_by_priority": {p.name.lower(): n for p, n in self._queued_by_priority.items()},
            "in_flight_jobs": len(self._jobs),
            "in_flight_chunks": len(self._in_flight),
        }


def _union_length(intervals: Iterable[tuple[int, int]]) -> int:
    total, cur_start, cur_end = 0, None, None
    for s, e in sorted(intervals):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


class TokenBucket:
    """A byte-rate limiter over a caller-supplied clock (seconds).

    ``reserve(n, now)`` takes *n* tokens and returns how long the caller must
    wait before using them. Tokens refill at ``rate`` per second up to
    ``burst``; a request larger than the balance runs the bucket into debt, so
    over any long window at most ``burst + rate * window`` bytes pass.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ConfigError(f"rate must be positive, got {rate}")
        if burst <= 0:
            raise ConfigError(f"burst must be positive, got {burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def reserve(self, n: float, now: float) -> float:
        """Take *n* tokens; return the delay (>= 0) before they may be spent."""
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
