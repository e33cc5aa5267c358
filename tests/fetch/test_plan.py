"""The fetch planner, without any I/O: single flight, coalescing, priorities, concurrency."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lazyfs.device.chunks import ChunkLocation, Priority
from lazyfs.errors import ConfigError
from lazyfs.fetch.plan import FetchPlanner, RequestStatus, TokenBucket

BLOB_A = "sha256:" + "a" * 64
BLOB_B = "sha256:" + "b" * 64
BLOB_C = "sha256:" + "c" * 64
K = 1024


def loc(n: int, offset: int, length: int = 100 * K, blob: str = BLOB_A) -> ChunkLocation:
    return ChunkLocation(n.to_bytes(32, "big"), blob, offset, length, length * 2, 1)


def adjacent(count: int, size: int = 100 * K, blob: str = BLOB_A, start: int = 0, first: int = 0) -> list[ChunkLocation]:
    return [loc(first + i, start + i * size, size, blob) for i in range(count)]


def drain(planner: FetchPlanner) -> list:
    jobs = []
    while (job := planner.next_job()) is not None:
        jobs.append(job)
        planner.finish(job)
    return jobs


def test_one_request_is_one_job_of_exactly_that_frame():
    p = FetchPlanner()
    c = loc(1, 12345, 777)
    assert p.request(c) is RequestStatus.QUEUED
    job = p.next_job()
    assert (job.blob, job.offset, job.length, job.locations, job.wasted) == (BLOB_A, 12345, 777, (c,), 0)
    assert job.priority is Priority.DEMAND
    assert p.next_job() is None


def test_single_flight_join_while_queued_and_in_flight_then_refetchable_after_finish():
    p = FetchPlanner()
    c = loc(1, 0)
    assert p.request(c) is RequestStatus.QUEUED
    assert p.request(c) is RequestStatus.JOINED_QUEUED
    assert p.request(c, Priority.BACKGROUND) is RequestStatus.JOINED_QUEUED
    job = p.next_job()
    assert p.request(c) is RequestStatus.JOINED_IN_FLIGHT
    assert p.is_pending(c.digest)
    assert p.next_job() is None
    p.finish(job)
    assert not p.is_pending(c.digest)
    assert p.request(c) is RequestStatus.QUEUED  # e.g. after a failed fetch
    assert p.statistics()["joined"] == 3


def test_same_digest_at_another_location_joins():
    p = FetchPlanner()
    c = loc(1, 0)
    elsewhere = ChunkLocation(c.digest, BLOB_B, 999, c.compressed_length, c.raw_length, c.compression)
    p.request(c)
    assert p.request(elsewhere) is RequestStatus.JOINED_QUEUED
    assert [j.locations for j in drain(p)] == [(c,)]


def test_more_urgent_request_upgrades_a_queued_one():
    p = FetchPlanner()
    bg, other = loc(1, 0), loc(2, 10 << 20)
    p.request(other, Priority.BACKGROUND)
    p.request(bg, Priority.BACKGROUND)
    assert p.request(bg, Priority.DEMAND) is RequestStatus.UPGRADED
    assert p.queued_priority(bg.digest) is Priority.DEMAND
    first = p.next_job()
    assert first.locations == (bg,) and first.priority is Priority.DEMAND


def test_adjacent_frames_coalesce_up_to_max_range():
    p = FetchPlanner(max_range=400 * K, max_jobs=100)
    frames = adjacent(10)
    for c in frames:
        p.request(c)
    jobs = drain(p)
    assert [len(j.locations) for j in jobs] == [4, 4, 2]
    assert [(j.offset, j.length) for j in jobs] == [(0, 400 * K), (400 * K, 400 * K), (800 * K, 200 * K)]
    assert all(j.wasted == 0 for j in jobs)
    assert [c for j in jobs for c in j.locations] == frames


def test_one_byte_over_max_range_splits():
    p = FetchPlanner(max_range=400 * K)
    frames = [loc(1, 0, 200 * K), loc(2, 200 * K, 200 * K), loc(3, 400 * K, 1)]
    for c in frames:
        p.request(c)
    assert [len(j.locations) for j in drain(p)] == [2, 1]
    p = FetchPlanner(max_range=400 * K + 1)
    for c in frames:
        p.request(c)
    assert [len(j.locations) for j in drain(p)] == [3]


def test_leader_in_the_middle_extends_both_ways():
    p = FetchPlanner(max_range=1 << 20)
    frames = adjacent(5)
    p.request(frames[2])
    for c in frames[:2] + frames[3:]:
        p.request(c)
    (job,) = drain(p)
    assert job.locations == tuple(frames) and (job.offset, job.length) == (0, 500 * K)


def test_runs_are_cut_from_their_start_whichever_frame_leads():
    p = FetchPlanner(max_range=400 * K, max_gap=64 * K)
    a, b, c = loc(1, 0, 200 * K), loc(2, 200 * K, 200 * K), loc(3, 400 * K, 1)
    for x in (c, a, b):  # c leads, but the run is cut a+b | c
        p.request(x)
    assert [j.locations for j in drain(p)] == [(c,), (a, b)]
    near = loc(4, 0, 100 * K)
    far = loc(5, 100 * K + 64 * K + 1, 100 * K)  # leader; near is one byte too far behind
    p.request(far)
    p.request(near)
    assert [j.locations for j in drain(p)] == [(far,), (near,)]
    close = loc(6, 100 * K + 64 * K, 100 * K)  # exactly max_gap behind: same run
    p.request(close)
    p.request(near)
    assert [j.locations for j in drain(p)] == [(near, close)]


def greedy_read_count(frames, max_range, max_gap):
    count, start, end = 0, None, None
    for c in sorted(frames, key=lambda c: c.offset):
        if start is None or c.offset - end > max_gap or c.end - start > max_range:
            count, start = count + 1, c.offset
        end = c.end
    return count


@given(
    st.lists(st.sampled_from([1, 4 * K, 40 * K, 64 * K, 100 * K, 300 * K]), min_size=1, max_size=40),
    st.lists(st.sampled_from([0, 0, 0, 100, 64 * K, 64 * K + 1]), min_size=40, max_size=40),
    st.randoms(use_true_random=False),
)
def test_reads_per_run_do_not_depend_on_arrival_order(sizes, gaps, rnd):
    frames, offset = [], 0
    for i, size in enumerate(sizes):
        frames.append(loc(i, offset, size))
        offset += size + gaps[i]
    order = frames[:]
    rnd.shuffle(order)
    p = FetchPlanner(max_range=256 * K, max_gap=64 * K)
    for c in order:
        p.request(c, Priority.READAHEAD)
    jobs = drain(p)
    assert len(jobs) == greedy_read_count(frames, 256 * K, 64 * K)
    assert sorted(c.digest for j in jobs for c in j.locations) == sorted(c.digest for c in frames)


def test_small_gaps_coalesce_and_count_as_waste_big_gaps_split():
    p = FetchPlanner(max_gap=64 * K, max_range=4 << 20)
    a = loc(1, 0, 100 * K)
    b = loc(2, 100 * K + 64 * K, 100 * K)  # gap == max_gap: joins
    c = loc(3, b.end + 64 * K + 1, 100 * K)  # gap just over: separate
    for x in (a, b, c):
        p.request(x)
    first, second = drain(p)
    assert first.locations == (a, b) and first.wasted == 64 * K and first.length == 264 * K
    assert second.locations == (c,) and second.wasted == 0
    assert p.statistics()["wasted_bytes"] == 64 * K


def test_no_coalescing_across_blobs_or_priorities():
    p = FetchPlanner()
    a, b = loc(1, 0, blob=BLOB_A), loc(2, 100 * K, blob=BLOB_B)
    c = loc(3, 100 * K, blob=BLOB_A)
    p.request(a)
    p.request(b)
    p.request(c, Priority.BACKGROUND)
    jobs = drain(p)
    assert sorted(len(j.locations) for j in jobs) == [1, 1, 1]


def test_frame_larger_than_max_range_is_fetched_alone():
    p = FetchPlanner(max_range=64 * K)
    big, small = loc(1, 0, 200 * K), loc(2, 200 * K, 10 * K)
    p.request(big)
    p.request(small)
    jobs = drain(p)
    assert [j.locations for j in jobs] == [(big,), (small,)]


def test_demand_overtakes_queued_lower_priorities():
    p = FetchPlanner(max_jobs=1, reserved_for_demand=0)
    far = [loc(i, i << 24) for i in range(1, 4)]  # far apart: no coalescing
    p.request(far[0], Priority.BACKGROUND)
    running = p.next_job()
    p.request(far[1], Priority.BACKGROUND)
    p.request(far[2], Priority.READAHEAD)
    demand = loc(9, 99 << 24)
    p.request(demand, Priority.DEMAND)
    assert p.demand_waiting()
    assert p.next_job() is None  # lane full
    p.finish(running)
    order = [j.locations[0] for j in drain(p)]
    assert order == [demand, far[2], far[1]]


def test_reserved_slots_only_serve_demand_and_queued_demand_blocks_others():
    p = FetchPlanner(max_jobs=3, reserved_for_demand=1)
    bgs = [loc(i, i << 24) for i in range(1, 5)]
    for c in bgs:
        p.request(c, Priority.BACKGROUND)
    started = [p.next_job(), p.next_job()]
    assert all(started) and p.next_job() is None  # third slot is reserved
    d1, d2 = loc(10, 10 << 24), loc(11, 11 << 24)
    p.request(d1)
    assert p.next_job().locations == (d1,)  # the reserved slot
    p.request(d2)
    p.finish(started[0])
    # A slot freed: the queued demand gets it, never the queued background work.
    assert p.next_job().locations == (d2,)
    assert p.next_job() is None


def test_lanes_are_bounded_independently():
    p = FetchPlanner(max_jobs=1, reserved_for_demand=0)
    a1, a2 = loc(1, 0, blob=BLOB_A), loc(2, 50 << 20, blob=BLOB_A)
    b1 = loc(3, 0, blob=BLOB_B)
    p.request(a1, lane="slow")
    p.request(a2, lane="slow")
    p.request(b1, lane="fast")
    jobs = [p.next_job(), p.next_job()]
    assert {j.lane for j in jobs} == {"slow", "fast"}
    assert p.next_job() is None
    assert p.in_flight_jobs("slow") == 1 and p.in_flight_jobs("fast") == 1


def test_finish_twice_is_an_error_and_config_is_checked():
    p = FetchPlanner()
    p.request(loc(1, 0))
    job = p.next_job()
    p.finish(job)
    with pytest.raises(ValueError):
        p.finish(job)
    for kw in ({"max_range": 0}, {"max_gap": -1}, {"max_jobs": 0}, {"max_jobs": 2, "reserved_for_demand": 2}):
        with pytest.raises(ConfigError):
            FetchPlanner(**kw)


def test_token_bucket_limits_long_run_rate():
    bucket = TokenBucket(rate=1000, burst=500, now=0.0)
    assert bucket.reserve(500, 0.0) == 0.0  # the burst is free
    assert bucket.reserve(1000, 0.0) == pytest.approx(1.0)  # then debt: wait a second
    assert bucket.reserve(100, 1.0) == pytest.approx(0.1)
    assert bucket.reserve(0, 100.0) == 0.0  # refills only up to the burst
    assert bucket.reserve(600, 100.0) == pytest.approx(0.1)
    with pytest.raises(ConfigError):
        TokenBucket(0, 1, 0.0)


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=200), st.floats(0.0, 5.0))
def test_token_bucket_never_exceeds_burst_plus_rate(sizes, step):
    rate, burst = 1000.0, 2000.0
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    sent = 0
    for n in sizes:
        now += bucket.reserve(n, now)  # a caller that waits as told
        sent += n
        assert sent <= burst + rate * now + 1e-6
        now += step


# ---------------------------------------------------------------- property: a random workload

LANES = {BLOB_A: "x", BLOB_B: "x", BLOB_C: "y"}


@st.composite
def frame_pools(draw):
    """Non-overlapping frames over three blobs, with random sizes and gaps."""
    pool = []
    n = 0
    for blob in LANES:
        offset = draw(st.integers(0, 4096))
        for _ in range(draw(st.integers(1, 12))):
            size = draw(st.sampled_from([1, 4 * K, 60 * K, 100 * K, 300 * K]))
            pool.append(loc(n, offset, size, blob))
            n += 1
            offset += size + draw(st.sampled_from([0, 0, 1, 32 * K, 64 * K, 65 * K, 1 << 20]))
    return pool


class PlannerMachine(RuleBasedStateMachine):
    MAX_RANGE = 512 * K
    MAX_GAP = 64 * K
    MAX_JOBS = 3
    RESERVED = 1

    @initialize(pool=frame_pools())
    def setup(self, pool):
        self.pool = pool
        self.p = FetchPlanner(
            max_range=self.MAX_RANGE, max_gap=self.MAX_GAP, max_jobs=self.MAX_JOBS, reserved_for_demand=self.RESERVED
        )
        self.queued: dict[bytes, tuple[Priority, str]] = {}  # model: digest -> (priority, lane)
        self.running: list = []
        self.planned: dict[bytes, int] = {}  # digest -> times planned since last requested fresh

    def _lane_running(self, lane):
        return [j for j in self.running if j.lane == lane]

    @rule(i=st.integers(0, 100), priority=st.sampled_from(list(Priority)))
    def request(self, i, priority):
        c = self.pool[i % len(self.pool)]
        status = self.p.request(c, priority, LANES[c.blob])
        in_flight = any(c.digest in {x.digest for x in j.locations} for j in self.running)
        if in_flight:
            assert status is RequestStatus.JOINED_IN_FLIGHT
        elif c.digest in self.queued:
            old = self.queued[c.digest][0]
            assert status is (RequestStatus.UPGRADED if priority < old else RequestStatus.JOINED_QUEUED)
            self.queued[c.digest] = (min(old, priority), LANES[c.blob])
        else:
            assert status is RequestStatus.QUEUED
            self.queued[c.digest] = (priority, LANES[c.blob])
            self.planned[c.digest] = 0

    @rule()
    def start(self):
        before = {lane: len(self._lane_running(lane)) for lane in set(LANES.values())}
        job = self.p.next_job()
        if job is None:
            # Liveness: nothing was startable.
            for lane in set(LANES.values()):
                waiting = [pr for pr, ln in self.queued.values() if ln == lane]
                if not waiting:
                    continue
                limit = self.MAX_JOBS if min(waiting) == Priority.DEMAND else self.MAX_JOBS - self.RESERVED
                assert before[lane] >= limit
            return
        lane_waiting = [pr for pr, ln in self.queued.values() if ln == job.lane]
        # Strict priority: the job is of the most urgent queued priority of its lane.
        assert job.priority == min(lane_waiting)
        limit = self.MAX_JOBS if job.priority == Priority.DEMAND else self.MAX_JOBS - self.RESERVED
        assert before[job.lane] < limit
        # The range: within max_range unless a single frame, covering every frame exactly.
        assert job.length <= self.MAX_RANGE or len(job.locations) == 1
        assert all(c.blob == job.blob and job.offset <= c.offset and c.end <= job.end for c in job.locations)
        assert job.offset == min(c.offset for c in job.locations) and job.end == max(c.end for c in job.locations)
        assert job.wasted == job.length - sum(c.compressed_length for c in job.locations)
        for c in job.locations:
            assert self.queued[c.digest] == (job.priority, job.lane)
            del self.queued[c.digest]
            self.planned[c.digest] += 1
            assert self.planned[c.digest] == 1  # planned exactly once
        self.running.append(job)

    @precondition(lambda self: self.running)
    @rule(k=st.integers(0, 100))
    def finish(self, k):
        job = self.running.pop(k % len(self.running))
        self.p.finish(job)

    @invariant()
    def counts_agree(self):
        if not hasattr(self, "p"):
            return
        assert self.p.queued() == len(self.queued)
        assert self.p.in_flight_jobs() == len(self.running)
        assert self.p.demand_waiting() == any(pr == Priority.DEMAND for pr, _ in self.queued.values())

    def teardown(self):
        if not hasattr(self, "p"):
            return
        # Everything requested gets planned (exactly once) once the running jobs end.
        for job in self.running:
            self.p.finish(job)
        while (job := self.p.next_job()) is not None:
            for c in job.locations:
                self.planned[c.digest] += 1
                del self.queued[c.digest]
            self.p.finish(job)
        assert not self.queued
        assert all(n == 1 for n in self.planned.values())


TestPlannerMachine = PlannerMachine.TestCase
TestPlannerMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
