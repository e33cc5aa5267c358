"""Hydration's policy (pure) and its loop over a real fetch scheduler, on trio's virtual clock."""

from __future__ import annotations

import os
import random

import pytest
import trio
import trio.testing

from lazyfs.errors import ConfigError
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.scheduler import FetchScheduler
from lazyfs.serve.hydrate import MIN_DEADLINE_RATE, UNLIMITED, HydratePolicy, Hydrator, plan_batch
from tests.fetch.test_scheduler import K, Probe, make_chunks, write_blob


@pytest.mark.parametrize("value", [{"rate": 0}, {"rate": -5}, {"deadline": 0}, {"rate": 1, "deadline": 2},
                                   {"speed": 3}, {"rate": "fast"}, {"rate": True}, {"deadline": float("nan")},
                                   "yes", 7, [1]])
def test_bad_hydrate_requests_are_one_clear_error(value):
    with pytest.raises(ConfigError):
        HydratePolicy.from_request(value, now=100.0)


def test_policies_round_trip_through_the_state_file():
    assert HydratePolicy.from_request(None, 0) is None and HydratePolicy.from_request(False, 0) is None
    assert HydratePolicy.from_request(True, 0) == HydratePolicy()
    fixed = HydratePolicy.from_request({"rate": 5 << 20}, 0)
    assert HydratePolicy.from_request(fixed.to_json(), 999) == fixed
    timed = HydratePolicy.from_request({"deadline": 600}, now=1000.0)
    assert timed.deadline_at == 1600.0
    assert HydratePolicy.from_request(timed.to_json(), now=5000.0) == timed  # a restart keeps the same deadline


def test_rate_is_what_is_left_over_the_time_left():
    policy = HydratePolicy(deadline_at=1100.0)
    assert policy.rate_now(100 << 20, now=1000.0, default_rate=0) == (100 << 20) / 100
    assert policy.rate_now(1, now=1000.0, default_rate=0) == MIN_DEADLINE_RATE  # never a crawl
    assert policy.rate_now(100 << 20, now=1200.0, default_rate=0) == UNLIMITED  # late: as fast as it goes
    assert policy.rate_now(100 << 20, now=1200.0, default_rate=7) == 7
    assert HydratePolicy(rate=123).rate_now(1 << 30, now=0, default_rate=9) == 123


def test_batches_cover_everything_in_order(tmp_path):
    _, locs = write_blob(tmp_path / "oci", make_chunks(40, seed=11))
    ends, start = [], 0
    while start < len(locs):
        end = plan_batch(locs, start, rate=1.0, max_range=64 * K)  # 8 max ranges a batch at a crawl
        assert end > start
        ends.append(end)
        start = end
    assert ends[-1] == len(locs)
    sizes = [loc.compressed_length for loc in locs]
    assert sum(sizes[: ends[0] - 1]) < 8 * 64 * K <= sum(sizes[: ends[0]])  # just enough for the budget


def test_hydration_meets_its_deadline_at_the_derived_rate(tmp_path):
    """200 chunks by a deadline of 60 virtual seconds: done by then, at about the derived rate,
    batch by batch. The download stands in for ``background_download``'s contract (it marks the
    batch's chunks local and takes bytes / rate seconds), so the virtual clock measures exactly the
    hydrator's pacing; the scheduler's own rate limit is tested in tests/fetch/test_scheduler.py,
    and the whole path in tests/serve/test_offline.py."""
    _, locs = write_blob(tmp_path / "oci", make_chunks(200, seed=12))
    total = sum(loc.compressed_length for loc in locs)
    local = ChunkCache(None, 0, 1 << 30)  # memory only: what the download admits stays
    batches: list[tuple[float, float, int]] = []  # (start time, rate, bytes)

    async def download(batch, rate):
        nbytes = sum(loc.compressed_length for loc in batch)
        batches.append((trio.current_time(), rate, nbytes))
        await trio.sleep(nbytes / rate)
        for loc in batch:
            local.admit(loc.digest, b"x")
        return {"chunks": len(batch), "bytes": nbytes, "skipped": 0, "failed": 0}

    async def main():
        start = trio.current_time()
        policy = HydratePolicy.from_request({"deadline": 60}, now=start)
        hydrator = Hydrator(locs, policy, cache=local, download=download, default_rate=0,
                            max_range=16 * K, clock=trio.current_time)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hydrator.run)
            while not hydrator.statistics()["hydrated"]:
                await trio.sleep(0.5)
            done = trio.current_time() - start
            hydrator.cancel()
        stats = hydrator.statistics()
        assert stats["bytes_local"] == stats["bytes_total"] == total and stats["chunks_failed"] == 0
        assert 60 * 0.9 <= done <= 60 + 0.5  # by the deadline, and not much before it: paced
        assert len(batches) >= 4 and sum(b[2] for b in batches) == total
        assert batches[0][1] == pytest.approx(total / 60)
        for when, rate, _ in batches:  # each batch at what is left over the time left
            left = total - sum(b[2] for b in batches if b[0] < when)
            assert rate == pytest.approx(max(left / (60 - (when - start)), MIN_DEADLINE_RATE))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_hydration_retries_after_failures_and_finishes(tmp_path):
    """A backend that fails the first attempts: the failed chunks are counted, tried again after a
    back-off, and the image ends up local."""
    blob, locs = write_blob(tmp_path / "oci", make_chunks(6, seed=13))
    probe = Probe(DirectoryBackend(tmp_path / "oci"))
    probe.fail_next = 1_000_000  # fail until told otherwise

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(None, 0, 64 << 20), max_retries=0, deadline=1e9,
                                       attempt_timeout=1e9) as sched:
            hydrator = Hydrator(locs, HydratePolicy(), cache=sched.cache, download=sched.background_download,
                                default_rate=0, max_range=16 * K, clock=trio.current_time)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hydrator.run)
                while hydrator.statistics()["chunks_failed"] == 0:
                    await trio.sleep(0.5)
                probe.fail_next = 0  # the network is back
                while not hydrator.statistics()["hydrated"]:
                    await trio.sleep(0.5)
                hydrator.cancel()
            assert hydrator.statistics()["chunks_failed"] > 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


MiB = 1 << 20


def two_images(tmp_path):
    """Local images "a" (2 MiB, random) and "b" (4 MiB), and a Host config with a 3 MiB chunk
    cache (half a MiB of it in memory): a hydrated a fits, a and b together do not."""
    from lazyfs.config import Config
    from lazyfs.image.ref import LocalRef

    images = {}
    for name, size in (("a", 2 * MiB), ("b", 4 * MiB)):
        raw = tmp_path / f"raw-{name}"
        raw.write_bytes(random.Random(name).randbytes(size))
        images[name] = (LocalRef(str(tmp_path / f"layout-{name}"), "v1"), raw)
    config = Config(run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"), cache_root=str(tmp_path / "cache"),
                    writable_root=str(tmp_path / "writable"), trace_record_seconds=0, readahead_chunks=0,
                    cache_size=3 * MiB, memory_cache_size=MiB // 2,
                    flat_cache_size=0)  # B's demand reads must go to the chunk tier (with flat files they go there)
    return images, config


async def create_images(images) -> None:
    from lazyfs.image.local import create_image

    for local, raw in images.values():
        await create_image(local, from_file=str(raw))


def test_a_hydrated_image_stays_local_while_another_image_churns_the_cache(tmp_path):
    """A Host with a 3 MiB chunk cache: image A (2 MiB) hydrated, then image B (4 MiB) read in
    full. B's reads evict B's own chunks, never A's: A stays hydrated. (Without the cache's
    ``protected`` hook — tried once — A loses chunks and this test fails.)"""
    from lazyfs.serve.host import Host

    images, config = two_images(tmp_path)

    async def main():
        await create_images(images)
        with trio.fail_after(120):
            async with Host.open(config) as host:
                a = await host.attach(f"oci:{images['a'][0].path}:v1", name="a", hydrate=HydratePolicy())
                while not a.hydration.statistics()["hydrated"]:
                    await trio.sleep(0.05)
                b = await host.attach(f"oci:{images['b'][0].path}:v1", name="b", hydrate=False)
                for offset in range(0, b.device.size, MiB):
                    await b.device.read(offset, min(MiB, b.device.size - offset))
                assert host.cache.statistics()["evictions"] > 0  # the cache was churned
                assert a.hydration.statistics()["hydrated"], a.hydration.statistics()
                assert not b.hydration.statistics()["hydrated"]
                await host.detach("a")  # no longer hydrated: its chunks are fair game again
                assert not host._hydrated_chunks

    trio.run(main)


def test_progress_is_a_counter_that_matches_a_recount_through_churn_and_restart(tmp_path, monkeypatch):
    """Hydration progress is kept by the chunk cache's ``watch``, not recounted per call:
    ``statistics()`` (``lazyfs stats``, /metrics) makes no cache lookup at all, and the counters
    equal a full recount after hydration, after another image churned a small cache (memory-tier
    drops, pending writes, disk evictions), and after a restart that restores both images.
    Broken on purpose once: without the notification in ``ChunkCache._forget`` (disk evictions)
    image b's counter stayed above the recount and this test went red; with statistics() scanning
    the chunk list again, the lookup count went red; without the count at construction, the
    restored image a read 0 chunks local and it went red."""
    from lazyfs.serve import host as host_module

    lookups = [0]

    class CountingCache(ChunkCache):
        def __contains__(self, digest: bytes) -> bool:
            lookups[0] += 1
            return super().__contains__(digest)

    monkeypatch.setattr(host_module, "ChunkCache", CountingCache)
    refs, config = two_images(tmp_path)

    def check(host, att) -> dict:
        before = lookups[0]
        stats = att.hydration.statistics()
        assert lookups[0] == before, "statistics() looked chunks up in the cache"
        local = [loc for loc in att.hydration.locations if loc.digest in host.cache]
        assert (stats["chunks_local"], stats["bytes_local"]) == (len(local), sum(loc.compressed_length for loc in local))
        assert stats["hydrated"] == (len(local) == stats["chunks_total"])
        return stats

    async def read_all(att) -> None:
        for offset in range(0, att.device.size, MiB):
            await att.device.read(offset, min(MiB, att.device.size - offset))

    async def main():
        await create_images(refs)
        manifests = {}
        with trio.fail_after(120):
            async with host_module.Host.open(config) as host:
                a = await host.attach(f"oci:{refs['a'][0].path}:v1", name="a", hydrate=HydratePolicy())
                b = await host.attach(f"oci:{refs['b'][0].path}:v1", name="b", hydrate=False)
                assert check(host, b)["chunks_local"] == 0
                while not check(host, a)["hydrated"]:
                    await trio.sleep(0.05)
                await read_all(b)
                assert host.cache.statistics()["evictions"] > 0  # the cache was churned
                assert check(host, a)["hydrated"]
                assert 0 < check(host, b)["chunks_local"] < check(host, b)["chunks_total"]
                manifests = {n: att.opened.image.manifest.digest for n, att in host.attachments.items()}
            async with host_module.Host.open(config) as host:  # a restart: attach again what was attached
                a = await host.attach(f"oci:{refs['a'][0].path}:v1", name="a", hydrate=HydratePolicy(),
                                      manifest=manifests["a"])
                b = await host.attach(f"oci:{refs['b'][0].path}:v1", name="b", hydrate=False, manifest=manifests["b"])
                assert check(host, a)["hydrated"]  # counted once, from the disk cache
                assert 0 < check(host, b)["chunks_local"] < check(host, b)["chunks_total"]
                await read_all(b)
                check(host, a), check(host, b)
                await host.detach("b")
                assert host.cache._watchers == [a.hydration._cache_changed]  # b's counter stopped with it

    trio.run(main)


@pytest.mark.registry
def test_hydration_fetches_nothing_the_flat_files_already_hold(env, tmp_path, monkeypatch):
    """The cold path writes a fetched chunk into the flat layer files and no chunk file; hydration
    counts such a chunk as local, so hydrating an image half read through the flat tier fetches
    from the real registry only the other half: no chunk is fetched twice. The progress counter
    follows flat writes as they happen (``FlatCache.watch``), and counts held chunks at attach.

    Broken on purpose twice: ``Hydrator.missing`` looking at the chunk cache only, as before:
    the 7 chunks of the first half were fetched a second time (counts of 2), red; ``_is_local``
    ignoring the flat files: the counter of image a stayed at 0, red.
    """
    from collections import Counter

    from lazyfs.config import Config, RegistrySettings
    from lazyfs.fetch import scheduler as scheduler_module
    from lazyfs.serve.host import Host
    from lazyfs.serve.hydrate import HeldByBlockCache

    fetched: Counter[bytes] = Counter()  # chunk digest -> times it came over the network
    real_decode = scheduler_module._decode_job

    def counting_decode(frames, source, write, flat, tails):
        fetched.update(loc.digest for loc, _ in frames)
        return real_decode(frames, source, write, flat, tails)

    monkeypatch.setattr(scheduler_module, "_decode_job", counting_decode)
    config = Config(run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"), cache_root=str(tmp_path / "cache"),
                    writable_root=str(tmp_path / "writable"), trace_record_seconds=0, trace_replay=False,
                    readahead_chunks=0, flat_cache_size=256 * MiB, memory_cache_size=0,  # as after a restart
                    registries=(RegistrySettings(env.registry.registry, plain_http=True),))

    def recount(host, att) -> int:
        held = HeldByBlockCache(att.device)
        return sum(1 for loc in att.hydration.locations if loc.digest in host.cache or loc.digest in held)

    async def main():
        with trio.fail_after(120):
            async with Host.open(config) as host:
                a = await host.attach(env.ref, name="a", hydrate=False)
                locations = a.hydration.locations  # in virtual order: read every use of the first half
                first_half = {loc.digest for loc in locations[: len(locations) // 2]}
                bs = a.device.block_size
                for seg in a.device.index.segments:
                    if seg.loc is not None and seg.loc.digest in first_half:
                        await a.device.read(seg.start * bs, (seg.end - seg.start) * bs)
                held = HeldByBlockCache(a.device)
                in_flat = {loc.digest for loc in a.hydration.locations if loc.digest in held}
                assert in_flat >= first_half and set(fetched) >= in_flat and max(fetched.values()) == 1
                assert not any(digest in host.cache for digest in in_flat)  # the flat tier alone holds them
                chunks_total = a.hydration.statistics()["chunks_total"]
                assert 0 < a.hydration.statistics()["chunks_local"] == recount(host, a) < chunks_total
                await host.detach("a")  # its layer files stay (well under flat_cache_size)

                b = await host.attach(env.ref, name="b", hydrate=HydratePolicy())
                assert b.hydration.statistics()["chunks_local"] >= len(in_flat)  # counted at attach
                for _ in range(2400):  # bounded: 2 min of polls at most
                    polled = b.hydration.statistics()  # its fetch count is added when a batch returns
                    if polled["hydrated"] and polled["chunks_fetched"] >= chunks_total - len(in_flat):
                        break
                    await trio.sleep(0.05)
                stats = b.hydration.statistics()
                assert stats["hydrated"] and stats["chunks_local"] == recount(host, b) == chunks_total
                assert max(fetched.values()) == 1, [d.hex()[:16] for d, n in fetched.items() if n > 1]
                assert set(fetched) == {loc.digest for loc in b.hydration.locations}
                assert stats["chunks_fetched"] == chunks_total - len(in_flat)
                for offset in range(0, b.device.size, MiB):  # all local now: the registry is not asked
                    await b.device.read(offset, min(MiB, b.device.size - offset))
                assert max(fetched.values()) == 1 and sum(fetched.values()) == chunks_total

    trio.run(main)


def test_a_flat_block_found_damaged_makes_its_chunk_missing_again(tmp_path):
    """Only verified flat data counts: a block that fails its hash when read is dropped, the
    hydration counter loses its chunk at once (``FlatCache.watch``) and ``missing()`` names it;
    the chunk fetched again and written back by the device (``LayerFlats.admit``) counts again.

    Broken on purpose once (no ``changed`` call after the drop in ``LayerFlats.read_into``): the
    counter still said every chunk was local and this test went red.
    """
    from lazyfs.device.merged import MergedDevice
    from lazyfs.errors import FetchError
    from lazyfs.format.layer import BLOCK_SIZE
    from lazyfs.serve.hydrate import HeldByBlockCache
    from tests.fetch.test_flatfile import NoSource, _device, _hydrate
    from tests.support.layers import make_stack
    from tests.support.sources import CountingSource

    layers, backend, model = make_stack(5, nlayers=1)
    trio.run(_hydrate, tmp_path / "flat", layers, backend)  # every block in the flat file, no chunk file
    seg = next(s for s in MergedDevice(layers, NoSource()).index.segments
               if any(model[s.start * BLOCK_SIZE : s.end * BLOCK_SIZE]))
    (data,) = [p for p in (tmp_path / "flat").iterdir() if p.suffix == ".data"]
    pos = seg.start * BLOCK_SIZE + 100
    with open(data, "r+b") as f:
        old = os.pread(f.fileno(), 1, pos)
        os.pwrite(f.fileno(), bytes([old[0] ^ 0xFF]), pos)

    async def main():
        dev, flat = await _device(tmp_path / "flat", layers, NoSource())
        hydration = Hydrator(dev.index.locations(), HydratePolicy(), cache=ChunkCache(tmp_path / "chunks", 1 << 30),
                             download=None, default_rate=0, max_range=1 << 20, held=HeldByBlockCache(dev))
        total = len(hydration.locations)
        assert hydration.statistics()["chunks_local"] == total and hydration.missing() == []
        with pytest.raises(FetchError):  # the damaged block is dropped; the store may not be asked
            await dev.read(pos - 100, BLOCK_SIZE)
        assert hydration.statistics()["chunks_local"] == total - 1
        assert [loc.digest for loc in hydration.missing()] == [seg.loc.digest]
        dev.store = CountingSource(backend)
        assert await dev.read(pos - 100, BLOCK_SIZE) == model[pos - 100 : pos - 100 + BLOCK_SIZE]
        assert hydration.statistics()["chunks_local"] == total and hydration.missing() == []
        hydration.cancel()
        assert flat._watchers == []
        await dev.aclose()
        await flat.aclose()

    trio.run(main)
