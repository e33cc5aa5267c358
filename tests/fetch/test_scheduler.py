"""The trio fetch scheduler against real blob files (DirectoryBackend) and a fault-injecting wrapper."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from lazyfs.device.chunks import ChunkLocation, Priority
from lazyfs.errors import FetchError, IntegrityError, NotFoundError, RangeError
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.scheduler import FetchScheduler, LatencyHistogram
from lazyfs.format.chunk import COMPRESSION_NONE, COMPRESSION_ZSTD
from tests.support.layers import write_frames_blob

K = 1024


# ---------------------------------------------------------------- helpers


def make_chunks(n: int, size: int = 64 * K, seed: int = 0) -> list[bytes]:
    """Distinct chunks, half random half zeros (so zstd frames), every 4th incompressible."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append(rng.randbytes(size))
        else:
            out.append(rng.randbytes(size // 2) + bytes(size - size // 2))
    return out


def write_blob(root: Path, raws: list[bytes], trailer: bytes = b"metadata+footer") -> tuple[str, list[ChunkLocation]]:
    """An OCI-layout blob file of concatenated chunk frames; returns its name and the frames' locations."""
    return write_frames_blob(root, raws, trailer)


class Probe(Backend):
    """Wraps a backend: records every call and can fail, corrupt, gate or stall reads."""

    def __init__(self, inner: Backend, name: str = "probe") -> None:
        self.inner = inner
        self.name = name
        self.calls: list[tuple[str, int, int]] = []
        self.bytes = 0
        self.fail_next = 0  # raise FetchError for this many calls
        self.corrupt: set[int] = set()  # absolute blob offsets whose byte is flipped
        self.stall = False
        self.gate: trio.Event | None = None  # calls wait for it
        self._called = trio.Event()

    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        self.calls.append((blob, offset, length))
        self._called.set()
        self._called = trio.Event()
        if self.gate is not None:
            await self.gate.wait()
        if self.stall:
            await trio.sleep_forever()
        if self.fail_next:
            self.fail_next -= 1
            raise FetchError(f"{self.name}: injected 503", status=503)
        data = bytearray(await self.inner.read_range(blob, offset, length))
        for pos in self.corrupt:
            if offset <= pos < offset + length:
                data[pos - offset] ^= 0xFF
        self.bytes += len(data)
        return bytes(data)

    async def blob_size(self, blob: str) -> int:
        return await self.inner.blob_size(blob)

    async def wait_calls(self, n: int) -> None:
        while len(self.calls) < n:
            await self._called.wait()


async def settle(cache: ChunkCache) -> None:
    """Wait (bounded) until the cache's disk writes, which run after readers are served, are done."""
    with trio.fail_after(10):
        while cache.statistics()["pending_writes"]:
            await trio.sleep(0.001)


def run(main, *args) -> None:
    async def bounded():
        with trio.fail_after(60):  # no test may hang
            await main(*args)

    trio.run(bounded)


FAST = {"backoff_base": 0.001, "backoff_max": 0.01}


# ---------------------------------------------------------------- reading


def test_one_chunk_read_fetches_exactly_that_chunk(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(10))
    probe = Probe(DirectoryBackend(tmp_path / "oci"))

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert await sched.get(locs[3]) == raws[3]
            assert probe.calls == [(blob, locs[3].offset, locs[3].compressed_length)]
            assert await sched.get(locs[3]) == raws[3]  # now a memory hit
            assert len(probe.calls) == 1
            st = sched.statistics()
            assert (st["requests"], st["memory_hits"], st["fetches"], st["ranged_gets"]) == (2, 1, 1, 1)
            assert st["bytes_fetched"] == locs[3].compressed_length
            assert st["bytes_served"] == 2 * len(raws[3])
            assert st["latency"]["count"] == 2

    run(main)
    assert {loc.compression for loc in locs} == {COMPRESSION_NONE, COMPRESSION_ZSTD}


def test_hundred_concurrent_readers_share_one_fetch(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(3))
    probe = Probe(DirectoryBackend(tmp_path / "oci"))
    probe.gate = trio.Event()

    async def main():
        results = []

        async def reader():
            results.append(await sched.get(locs[1]))

        async with FetchScheduler.open([probe], ChunkCache(None, 0, 1 << 20)) as sched:
            async with trio.open_nursery() as nursery:
                for _ in range(100):
                    nursery.start_soon(reader)
                await probe.wait_calls(1)
                await trio.testing.wait_all_tasks_blocked()
                assert sched.statistics()["joins"] == 99
                probe.gate.set()
            assert results == [raws[1]] * 100
            assert len(probe.calls) == 1
            assert sched.statistics()["fetches"] == 1

    run(main)


def test_cancelled_reader_does_not_cancel_the_shared_fetch(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(2))
    probe = Probe(DirectoryBackend(tmp_path / "oci"))
    probe.gate = trio.Event()

    async def main():
        got = []
        async with FetchScheduler.open([probe], ChunkCache(None, 0, 1 << 20)) as sched:
            async with trio.open_nursery() as nursery:
                first = trio.CancelScope()

                async def first_reader():
                    with first:
                        await sched.get(locs[0])
                    got.append("cancelled")

                async def second_reader():
                    got.append(await sched.get(locs[0]))

                nursery.start_soon(first_reader)
                await probe.wait_calls(1)
                nursery.start_soon(second_reader)
                await trio.testing.wait_all_tasks_blocked()
                first.cancel()  # the reader that started the fetch goes away
                await trio.testing.wait_all_tasks_blocked()
                probe.gate.set()
            assert sorted(got, key=repr) == sorted(["cancelled", raws[0]], key=repr)
            assert len(probe.calls) == 1

    run(main)


def test_adjacent_chunks_read_together_coalesce_into_few_ranged_reads(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(64))
    total = sum(loc.compressed_length for loc in locs)
    max_range = 256 * K
    probe = Probe(DirectoryBackend(tmp_path / "oci"))

    async def main():
        out = {}

        async def read(i):
            out[i] = await sched.get(locs[i])

        async with FetchScheduler.open([probe], ChunkCache(None, 0, 64 << 20), max_range=max_range, max_jobs_per_backend=64) as sched:
            async with trio.open_nursery() as nursery:
                for i in range(len(locs)):
                    nursery.start_soon(read, i)
            st = sched.statistics()
        assert [out[i] for i in range(len(locs))] == raws
        # Greedy packing of frames into <= max_range reads: at most ~ total/max_range + the partial tails.
        assert math.ceil(total / max_range) <= len(probe.calls) <= math.ceil(total / max_range) * 2
        assert len(probe.calls) < len(locs) // 4
        assert all(length <= max_range for _, _, length in probe.calls)
        assert st["bytes_fetched"] == total and st["wasted_bytes"] == 0

    run(main)


def test_sequential_reader_with_readahead_prefetch_coalesces(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(48))
    total = sum(loc.compressed_length for loc in locs)
    max_range = 512 * K
    probe = Probe(DirectoryBackend(tmp_path / "oci"))

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(None, 0, 64 << 20), max_range=max_range) as sched:
            window = 16
            for i, loc in enumerate(locs):
                if i % window == 0:
                    sched.prefetch(locs[i : i + 2 * window], Priority.READAHEAD)
                assert await sched.get(loc) == raws[i]
        assert len(probe.calls) <= 2 * math.ceil(total / max_range) + 2
        assert len(probe.calls) < len(locs) // 3

    run(main)


# ---------------------------------------------------------------- verification and failover


def test_corrupt_bytes_raise_integrity_error_and_are_never_cached(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(4))
    bad = Probe(DirectoryBackend(tmp_path / "oci"), "bad-mirror")
    bad.corrupt.add(locs[2].offset + 17)

    async def main():
        cache = ChunkCache(tmp_path / "cache", 1 << 30)
        async with FetchScheduler.open([bad], cache) as sched:
            with pytest.raises(IntegrityError) as info:
                await sched.get(locs[2])
            assert "bad-mirror" in str(info.value)
            assert locs[2].digest not in cache
            assert sched.statistics()["integrity_failures"] == 1
            with pytest.raises(IntegrityError):  # not remembered as good either
                await sched.get(locs[2])
            assert len(bad.calls) == 2
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]

    run(main)


def test_corrupt_chunk_is_refetched_from_the_next_backend_alone(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(3))
    bad = Probe(DirectoryBackend(tmp_path / "oci"), "bad-mirror")
    bad.corrupt.add(locs[1].offset + locs[1].compressed_length - 1)
    good = Probe(DirectoryBackend(tmp_path / "oci"), "origin")

    async def main():
        cache = ChunkCache(tmp_path / "cache", 1 << 30)
        out = {}

        async def read(i):
            out[i] = await sched.get(locs[i])

        async with FetchScheduler.open([bad, good], cache) as sched:
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(read, i)
            st = sched.statistics()
        assert [out[i] for i in range(3)] == raws
        start, end = locs[0].offset, locs[2].end
        assert bad.calls == [(blob, start, end - start)]  # one coalesced read
        assert good.calls == [(blob, locs[1].offset, locs[1].compressed_length)]  # only the bad chunk
        assert st["integrity_failures"] == 1 and st["failovers"] == 1
        for loc, raw in zip(locs, raws):
            assert cache.path_of(loc.digest).read_bytes() == raw

    run(main)


def test_fetch_errors_are_retried_then_succeed(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(2))
    flaky = Probe(DirectoryBackend(tmp_path / "oci"))
    flaky.fail_next = 3

    async def main():
        async with FetchScheduler.open([flaky], ChunkCache(None, 0, 1 << 20), max_retries=4, **FAST) as sched:
            assert await sched.get(locs[0]) == raws[0]
            st = sched.statistics()
        assert len(flaky.calls) == 4
        assert (st["retries"], st["fetch_errors"], st["ranged_gets"]) == (3, 3, 4)

    run(main)


def test_persistent_fetch_errors_fail_over_then_surface(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(2))
    down = Probe(DirectoryBackend(tmp_path / "oci"), "down")
    down.fail_next = 10**9
    up = Probe(DirectoryBackend(tmp_path / "oci"), "up")

    async def main():
        async with FetchScheduler.open([down], ChunkCache(None, 0, 1 << 20), max_retries=2, **FAST) as sched:
            with pytest.raises(FetchError) as info:
                await sched.get(locs[0])
            assert info.value.status == 503
        assert len(down.calls) == 3
        async with FetchScheduler.open([down, up], ChunkCache(None, 0, 1 << 20), max_retries=2, **FAST) as sched:
            assert await sched.get(locs[1]) == raws[1]
        assert len(up.calls) == 1

    run(main)


def test_missing_blob_is_not_found_and_not_retried(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", make_chunks(1))
    (tmp_path / "oci" / "blobs" / "sha256" / blob[7:]).unlink()
    probe = Probe(DirectoryBackend(tmp_path / "oci"))

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(None, 0, 1 << 20), **FAST) as sched:
            with pytest.raises(NotFoundError):
                await sched.get(locs[0])
        assert len(probe.calls) == 1

    run(main)


def test_stalled_backend_errors_out_while_another_backend_keeps_serving(tmp_path):
    slow_blob, slow_locs = write_blob(tmp_path / "oci", make_chunks(2, seed=1))
    fast_blob, fast_locs = write_blob(tmp_path / "oci", fast_raws := make_chunks(4, seed=2))
    stalled = Probe(DirectoryBackend(tmp_path / "oci"), "stalled")
    stalled.stall = True
    fast = Probe(DirectoryBackend(tmp_path / "oci"), "fast")

    async def main():
        outcome = {}

        async def slow_reader():
            try:
                await sched.get(slow_locs[0])
            except FetchError as exc:
                outcome["slow"] = exc

        async with FetchScheduler.open([stalled], ChunkCache(None, 0, 1 << 20), deadline=1.0) as sched:
            sched.set_backends(fast_blob, [fast])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_reader)
                await stalled.wait_calls(1)
                for loc, raw in zip(fast_locs, fast_raws):
                    assert await sched.get(loc) == raw
                outcome["fast_done"] = True
            st = sched.statistics()
        assert outcome["fast_done"]
        assert "deadline" in str(outcome["slow"])
        assert st["deadline_exceeded"] >= 1
        assert len(fast.calls) == 4 and all(c[0] == fast_blob for c in fast.calls)

    run(main)


def test_stalled_mirror_is_skipped_after_the_attempt_timeout(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(1))
    stalled = Probe(DirectoryBackend(tmp_path / "oci"), "stalled")
    stalled.stall = True
    origin = Probe(DirectoryBackend(tmp_path / "oci"), "origin")

    async def main():
        opts = {"attempt_timeout": 0.05, "max_retries": 1, "deadline": 30.0, **FAST}
        async with FetchScheduler.open([stalled, origin], ChunkCache(None, 0, 1 << 20), **opts) as sched:
            assert await sched.get(locs[0]) == raws[0]
        assert len(stalled.calls) == 2 and len(origin.calls) == 1

    run(main)


# ---------------------------------------------------------------- priorities


def test_demand_reads_overtake_queued_background_ones(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(10))
    probe = Probe(DirectoryBackend(tmp_path / "oci"))
    probe.gate = trio.Event()

    async def main():
        opts = {"max_jobs_per_backend": 1, "reserved_for_demand": 0, "max_gap": 0, "max_range": 1}  # one chunk per read
        cache = ChunkCache(None, 0, 64 << 20)
        async with FetchScheduler.open([probe], cache, **opts) as sched:
            assert sched.prefetch(locs[:5], Priority.BACKGROUND) == 5
            await probe.wait_calls(1)  # locs[0] holds the only slot
            got = []
            async with trio.open_nursery() as nursery:

                async def demand():
                    got.append(await sched.get(locs[8]))

                nursery.start_soon(demand)
                await trio.testing.wait_all_tasks_blocked()
                assert sched.statistics()["planner"]["queued_by_priority"]["demand"] == 1
                probe.gate.set()
            assert got == [raws[8]]
            for loc in locs[:5]:
                await sched.ensure(loc, Priority.BACKGROUND)
        offsets = [offset for _, offset, _ in probe.calls]
        assert offsets == [locs[i].offset for i in (0, 8, 1, 2, 3, 4)]

    run(main)


def test_background_download_fetches_everything_and_yields_to_demand(tmp_path):
    demand_blob, demand_locs = write_blob(tmp_path / "oci", demand_raws := make_chunks(1, seed=5))
    bg_blob, bg_locs = write_blob(tmp_path / "oci", bg_raws := make_chunks(20, seed=6))
    demand_backend = Probe(DirectoryBackend(tmp_path / "oci"), "demand")
    demand_backend.gate = trio.Event()
    bg_backend = Probe(DirectoryBackend(tmp_path / "oci"), "bulk")

    async def main():
        cache = ChunkCache(tmp_path / "cache", 1 << 30, memory_bytes=1 << 20)
        async with FetchScheduler.open([bg_backend], cache) as sched:
            sched.set_backends(demand_blob, [demand_backend])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sched.get, demand_locs[0])
                await demand_backend.wait_calls(1)  # a demand read is now waiting
                summary = {}

                async def download():
                    summary.update(await sched.background_download(bg_locs + bg_locs[:3], rate_bytes_per_s=1e12))

                nursery.start_soon(download)
                await trio.testing.wait_all_tasks_blocked()
                assert bg_backend.calls == []  # paused while the demand read waits
                demand_backend.gate.set()
            assert summary == {"chunks": 20, "bytes": sum(l.compressed_length for l in bg_locs), "skipped": 3, "failed": 0}
            await settle(cache)
            # Background chunks went to disk only: the memory tier holds just the demand chunk.
            assert cache.statistics()["entries"] == 21 and cache.statistics()["memory_entries"] == 1
            calls = len(bg_backend.calls)
            for loc, raw in zip(bg_locs, bg_raws):
                assert await sched.get(loc) == raw
            assert len(bg_backend.calls) == calls  # all served from the cache
            assert sched.statistics()["background_chunks"] == 20

    run(main)


def test_background_download_respects_the_rate(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", make_chunks(24, seed=7))
    total = sum(loc.compressed_length for loc in locs)
    probe = Probe(DirectoryBackend(tmp_path / "oci"))
    rate = 100 * K  # bytes per virtual second
    max_range = 128 * K

    async def main():
        with trio.fail_after(60_000):
            async with FetchScheduler.open([probe], ChunkCache(None, 0, 64 << 20), max_range=max_range) as sched:
                start = trio.current_time()
                result = await sched.background_download(locs, rate_bytes_per_s=rate, delay_s=3.0)
                elapsed = trio.current_time() - start
        assert result["chunks"] == 24 and len(probe.calls) >= 1
        # The bucket starts with one max range of tokens; everything beyond that waits for the rate.
        assert elapsed >= 3.0 + (total - max_range) / rate - 1e-6

    # A virtual clock running 1000x real time: the rate is measured, not waited for.
    trio.run(main, clock=trio.testing.MockClock(rate=1000))


def test_closing_the_scheduler_fails_waiting_readers(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", make_chunks(1))
    probe = Probe(DirectoryBackend(tmp_path / "oci"))
    probe.stall = True

    async def main():
        errors = []

        async def reader(sched):
            try:
                await sched.get(locs[0])
            except FetchError as exc:
                errors.append(exc)

        async with trio.open_nursery() as outer:
            async with FetchScheduler.open([probe], ChunkCache(None, 0, 1 << 20)) as sched:
                outer.start_soon(reader, sched)
                await probe.wait_calls(1)
        assert len(errors) == 1 and "stopped" in str(errors[0])
        with pytest.raises(FetchError):
            await sched.get(locs[0])

    run(main)


def test_one_coalesced_read_is_decoded_in_one_thread_hop(tmp_path):
    # One job holds a small chunk and then a big one. Decode, verify and the
    # cache write-back of both run in one worker hop (issue 14 item 4), so the
    # small chunk is never resolved while the job still runs: the old window in
    # which a reader found the planner saying "in flight" for an already resolved
    # digest is gone. With a cache that keeps nothing, a later reader fetches again.
    # Broken on purpose once (a hop per chunk again): decode_hops went to 4, red.
    raws = [b"x" * 4096 + random.Random(1).randbytes(4096), random.Random(2).randbytes(8 << 20), b"z" * 8192]
    blob, locs = write_blob(tmp_path / "oci", raws)
    probe = Probe(DirectoryBackend(tmp_path / "oci"))
    probe.gate = trio.Event()

    async def main():
        opts = {"max_range": 64 << 20, "max_jobs_per_backend": 1, "reserved_for_demand": 0, "deadline": 20.0}
        async with FetchScheduler.open([probe], ChunkCache(None, 0, 0), **opts) as sched:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sched.get, locs[2])
                await probe.wait_calls(1)  # holds the only slot
                nursery.start_soon(sched.get, locs[1])
                await trio.testing.wait_all_tasks_blocked()
                probe.gate.set()
                assert await sched.get(locs[0]) == raws[0]
                assert await sched.get(locs[0]) == raws[0]
            st = sched.statistics()
        assert probe.calls[1] == (blob, locs[0].offset, locs[1].end - locs[0].offset)
        assert st["decode_hops"] == 3  # one per ranged read, not one per chunk (4)
        assert len(probe.calls) == 3

    run(main)


def test_statistics_latency_histogram():
    h = LatencyHistogram((0.001, 0.01, 0.1, math.inf))
    for v in [0.0005] * 50 + [0.005] * 45 + [0.05] * 4 + [5.0]:
        h.observe(v)
    snap = h.snapshot()
    assert [c for _, c in snap["buckets"]] == [50, 45, 4, 1]
    assert snap["count"] == 100
    assert snap["p50"] <= 0.001 < snap["p95"] <= 0.01 < snap["p99"] <= 0.1
    assert LatencyHistogram().quantile(0.5) == 0.0


# ---------------------------------------------------------------- the directory backend


def test_directory_backend_ranges_and_errors(tmp_path):
    blob, _ = write_blob(tmp_path / "oci", [b"a" * 5000], trailer=b"tail")
    backend = DirectoryBackend(tmp_path / "oci")
    data = (tmp_path / "oci" / "blobs" / "sha256" / blob[7:]).read_bytes()

    async def main():
        assert await backend.blob_size(blob) == len(data)
        assert await backend.read_range(blob, 3, 10) == data[3:13]
        assert await backend.read_range(blob, 0, len(data)) == data
        assert await backend.read_range(blob, 5, 0) == b""
        with pytest.raises(FetchError, match="short read"):
            await backend.read_range(blob, len(data) - 2, 10)
        with pytest.raises(NotFoundError):
            await backend.read_range("sha256:" + "0" * 64, 0, 1)
        with pytest.raises(NotFoundError):
            await backend.blob_size("sha256:" + "0" * 64)
        with pytest.raises(NotFoundError):
            await backend.read_range("sha256:../../etc/passwd", 0, 1)
        with pytest.raises(RangeError):
            await backend.read_range(blob, -1, 1)

    run(main)


def test_run_in_a_callers_nursery_and_aclose(tmp_path):
    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(2))
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    sched = FetchScheduler([DirectoryBackend(tmp_path / "oci")], cache)

    async def main():
        with pytest.raises(FetchError, match="not running"):
            await sched.get(locs[0])
        async with trio.open_nursery() as nursery:
            await nursery.start(sched.run)
            assert await sched.get(locs[0]) == raws[0]
            await sched.aclose()  # ends sched.run, so the nursery can exit
        assert cache.statistics()["misses"] == 1 and cache.on_disk(locs[0].digest)
        with pytest.raises(RuntimeError):
            await sched.run()

    run(main)


def test_a_joiner_with_another_location_reads_its_own_when_the_flight_fails(tmp_path):
    # The same chunk lives in two blobs; the first reader's blob is unreadable. The
    # second reader (another location of the digest) joins the first one's flight,
    # sees it fail, and then reads its own location once (issue 13 item 4): it gets
    # the bytes, the first reader gets the error. Broken on purpose once (joiners
    # re-raised the flight's error): the second reader failed too, red.
    raw = make_chunks(1, seed=7)[0]
    blob_a, (loc_a,) = write_blob(tmp_path / "oci", [raw], trailer=b"a")
    blob_b, (loc_b,) = write_blob(tmp_path / "oci", [raw], trailer=b"b")
    assert blob_a != blob_b and loc_a.digest == loc_b.digest
    probe = Probe(DirectoryBackend(tmp_path / "oci"))
    probe.gate = trio.Event()
    probe.fail_next = 1

    async def main():
        results = {}

        async def reader(name, loc):
            try:
                results[name] = await sched.get(loc)
            except FetchError as exc:
                results[name] = exc

        async with FetchScheduler.open([probe], ChunkCache(None, 0, 1 << 20), max_retries=0) as sched:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, "a", loc_a)
                await probe.wait_calls(1)
                nursery.start_soon(reader, "b", loc_b)
                await trio.testing.wait_all_tasks_blocked()
                probe.gate.set()
            st = sched.statistics()
        assert isinstance(results["a"], FetchError)
        assert results["b"] == raw
        assert st["joins"] == 1 and st["location_retries"] == 1
        assert [c[0] for c in probe.calls] == [blob_a, blob_b]

    run(main)


def test_decode_threads_default_to_the_cores():
    sched = FetchScheduler([DirectoryBackend("/nonexistent")], ChunkCache(None, 0, 0))
    assert sched._verify_threads == (os.cpu_count() or 1)
    assert FetchScheduler([DirectoryBackend("/nonexistent")], ChunkCache(None, 0, 0), verify_threads=3)._verify_threads == 3
