"""The chunk cache: content-addressed files, LRU bounds, restarts, damaged entries."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from lazyfs.device.chunks import ChunkLocation
from lazyfs.errors import ConfigError
from lazyfs.fetch.backend import Backend
from lazyfs.fetch import cache as cache_module
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.scheduler import FetchScheduler
from lazyfs.format.chunk import chunk_digest
from tests.support.layers import write_frames_blob

K = 1024


def chunk(n: int, size: int = 16 * K) -> tuple[bytes, bytes]:
    raw = random.Random(n).randbytes(size)
    return chunk_digest(raw), raw


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def run(main) -> None:
    async def bounded():
        with trio.fail_after(60):
            await main()

    trio.run(bounded)


async def settle(cache: ChunkCache) -> None:
    with trio.fail_after(10):
        while cache.statistics()["pending_writes"]:
            await trio.sleep(0.001)


class CountingBackend(Backend):
    """Counts the ranged reads that reach a real directory backend."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = "counting"
        self.calls = 0

    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        self.calls += 1
        return await self.inner.read_range(blob, offset, length)

    async def blob_size(self, blob: str) -> int:
        return await self.inner.blob_size(blob)


def write_blob(root: Path, raws: list[bytes]) -> list[ChunkLocation]:
    return write_frames_blob(root, raws)[1]


# ---------------------------------------------------------------- the cache alone


def test_put_get_layout_and_tiers(tmp_path):
    async def main():
        cache = ChunkCache(tmp_path, 1 << 20, memory_bytes=64 * K)
        digest, raw = chunk(1)
        assert await cache.get(digest) is None
        await cache.put(digest, raw)
        h = digest.hex()
        assert (tmp_path / h[:2] / h[2:]).read_bytes() == raw
        assert cache.path_of(digest) == tmp_path / h[:2] / h[2:]
        assert await cache.get(digest) == raw  # memory
        fresh = ChunkCache(tmp_path, 1 << 20, memory_bytes=64 * K)
        assert digest in fresh and fresh.on_disk(digest)
        assert fresh.get_memory(digest) is None
        assert await fresh.get(digest) == raw  # disk, verified, promoted
        assert fresh.get_memory(digest) == raw
        st = fresh.statistics()
        assert (st["disk_hits"], st["memory_hits"], st["entries"], st["bytes"]) == (1, 1, 1, len(raw))
        assert cache.statistics()["misses"] == 1

    run(main)


def test_cache_is_private_whatever_the_umask_and_an_older_cache_is_closed(tmp_path):
    """Chunks of private images: directories 0700, files 0600, also under umask 022 (docs/trust.md)."""
    root = tmp_path / "cache"
    h = chunk(1)[0].hex()
    (root / h[:2]).mkdir(parents=True, mode=0o755)
    (root / h[:2] / h[2:]).write_bytes(chunk(1)[1])  # left readable by an older lazyfs
    for p in (root, root / h[:2], root / h[:2] / h[2:]):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    old = os.umask(0o022)
    try:
        async def main():
            cache = ChunkCache(root, 1 << 20, memory_bytes=0)
            for n in range(2, 6):
                await cache.put(*chunk(n))
        run(main)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}
    assert len(modes) > 5 and modes == {k: "0o700" if (root / k).is_dir() else "0o600" for k in modes}, modes


def test_memory_tier_is_bounded_and_memory_only_mode_works():
    async def main():
        cache = ChunkCache(None, 0, memory_bytes=40 * K)
        items = [chunk(i) for i in range(5)]
        for digest, raw in items:
            await cache.put(digest, raw)
            assert cache.statistics()["memory_bytes"] <= 40 * K
        assert [cache.get_memory(d) is not None for d, _ in items] == [False, False, False, True, True]
        assert cache.statistics()["entries"] == 0
        with pytest.raises(ConfigError):
            cache.path_of(items[0][0])
        with pytest.raises(ConfigError):
            ChunkCache(None, -1)

    run(main)


def test_disk_bound_holds_under_churn_and_evicts_least_recently_used(tmp_path):
    budget = 200 * K

    async def main():
        cache = ChunkCache(tmp_path, budget, memory_bytes=0)
        rng = random.Random(7)
        kept = chunk(1000, 10 * K)
        await cache.put(*kept)
        for i in range(120):
            digest, raw = chunk(i, rng.choice([1, 4 * K, 10 * K, 33 * K, 64 * K]))
            await cache.put(digest, raw)
            if i % 3 == 0:
                assert await cache.get(kept[0]) == kept[1]  # keep it recently used
            on_disk = files(tmp_path)
            assert sum(on_disk.values()) <= budget
            assert cache.statistics()["bytes"] == sum(on_disk.values()) <= budget
            assert cache.statistics()["entries"] == len(on_disk)
            assert cache.on_disk(digest)  # the newest entry is always there
        assert kept[0] in cache
        st = cache.statistics()
        assert st["evictions"] > 50 and st["damaged"] == 0
        # Too big for the whole budget: served from memory at most, never written.
        big = chunk(5000, budget + 1)
        await cache.put(*big)
        assert not cache.on_disk(big[0])

    run(main)


def test_restart_rebuilds_the_lru_order_from_file_times(tmp_path):
    async def main():
        cache = ChunkCache(tmp_path, 1 << 20, memory_bytes=0)
        items = [chunk(i, 10 * K) for i in range(6)]
        for digest, raw in items:
            await cache.put(digest, raw)
        # Make access times explicit: item 0 used most recently, then 5, 4, ...
        for age, (digest, _) in enumerate([items[0]] + items[:0:-1]):
            t = 1_000_000_000 - age * 100
            os.utime(cache.path_of(digest), (t, t))
        (tmp_path / items[0][0].hex()[:2] / ".tmp-interrupted").write_bytes(b"partial")
        # A smaller budget at restart evicts the oldest: items 1 and 2.
        smaller = ChunkCache(tmp_path, 40 * K, memory_bytes=0)
        assert [smaller.on_disk(d) for d, _ in items] == [True, False, False, True, True, True]
        assert not list(tmp_path.rglob(".tmp-*"))
        assert sum(files(tmp_path).values()) <= 40 * K
        for digest, raw in (items[0], items[3]):
            assert await smaller.get(digest) == raw

    run(main)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "replace"])
def test_damaged_entry_is_deleted_and_reported_as_a_miss(tmp_path, damage):
    async def main():
        cache = ChunkCache(tmp_path, 1 << 20, memory_bytes=0)
        digest, raw = chunk(3)
        await cache.put(digest, raw)
        path = cache.path_of(digest)
        if damage == "truncate":
            path.write_bytes(raw[:-1])
        elif damage == "flip":
            path.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
        elif damage == "empty":
            path.write_bytes(b"")
        else:
            path.write_bytes(chunk(4)[1])  # a valid chunk, under the wrong name
        reopened = ChunkCache(tmp_path, 1 << 20, memory_bytes=0) if damage == "empty" else cache
        assert await reopened.get(digest) is None
        assert not path.exists() and not reopened.on_disk(digest)
        assert reopened.statistics()["damaged"] == 1

    run(main)


def test_background_admission_skips_the_memory_tier(tmp_path):
    async def main():
        cache = ChunkCache(tmp_path, 1 << 20, memory_bytes=1 << 20)
        digest, raw = chunk(9)
        cache.admit(digest, raw, memory=False)
        assert cache.get_memory(digest) == raw  # served while pending
        await cache.write_pending(digest)
        assert cache.statistics()["memory_entries"] == 0 and cache.on_disk(digest)
        assert await cache.get(digest) == raw

    run(main)


# ---------------------------------------------------------------- through the scheduler


def test_restart_serves_from_disk_without_backend_reads_and_refetches_damage(tmp_path):
    raws = [random.Random(i).randbytes(32 * K) + bytes(32 * K) for i in range(8)]
    locs = write_blob(tmp_path / "oci", raws)
    backend = CountingBackend(DirectoryBackend(tmp_path / "oci"))
    root = tmp_path / "cache"

    async def main():
        async with FetchScheduler.open([backend], ChunkCache(root, 1 << 30)) as sched:
            async with trio.open_nursery() as nursery:
                for loc in locs:
                    nursery.start_soon(sched.get, loc)
        assert 1 <= backend.calls <= 2
        # "Restart": a new cache and scheduler over the same root.
        fetched = backend.calls
        cache = ChunkCache(root, 1 << 30)
        assert cache.statistics()["entries"] == 8
        async with FetchScheduler.open([backend], cache) as sched:
            for loc, raw in zip(locs, raws):
                assert await sched.get(loc) == raw
            assert backend.calls == fetched
            assert sched.statistics()["disk_hits"] == 8
        # Damage one entry on disk: the next reader refetches it and never sees the bad bytes.
        path = cache.path_of(locs[5].digest)
        path.write_bytes(path.read_bytes()[: 1000])
        cache = ChunkCache(root, 1 << 30)
        async with FetchScheduler.open([backend], cache) as sched:
            assert await sched.get(locs[5]) == raws[5]
            assert backend.calls == fetched + 1
            await settle(cache)
        assert path.read_bytes() == raws[5]
        assert cache.statistics()["damaged"] == 1

    run(main)


def test_cache_is_shared_by_digest_across_blobs(tmp_path):
    # The same chunk in two different blobs (two images): fetched once.
    raw = random.Random(11).randbytes(20 * K)
    loc_a = write_blob(tmp_path / "oci", [raw])[0]
    loc_b = write_blob(tmp_path / "oci", [b"\1" * 4096, raw])[1]
    assert loc_a.blob != loc_b.blob and loc_a.digest == loc_b.digest
    backend = CountingBackend(DirectoryBackend(tmp_path / "oci"))

    async def main():
        async with FetchScheduler.open([backend], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert await sched.get(loc_a) == raw
            assert await sched.get(loc_b) == raw
        assert backend.calls == 1

    run(main)


def test_a_disk_hit_refreshes_the_file_time_at_most_once_per_epoch(tmp_path):
    """No inode write per hit: the access order reaches the file time once per TOUCH_EPOCH per entry.

    Broken on purpose once (``touch`` always True): the second hit moved the file time, red.
    """
    async def main():
        cache = ChunkCache(tmp_path, 1 << 20, memory_bytes=0)
        digest, raw = chunk(5)
        await cache.put(digest, raw)
        path = cache.path_of(digest)
        assert await cache.get(digest) == raw
        os.utime(path, (1_000_000_000, 1_000_000_000))
        assert await cache.get(digest) == raw  # same epoch: the file time stays
        assert os.stat(path).st_mtime == 1_000_000_000
        cache._epoch_started -= cache_module.TOUCH_EPOCH  # the next epoch (no wall-clock wait)
        assert await cache.get(digest) == raw
        assert os.stat(path).st_mtime > 1_000_000_000

    run(main)


def test_watchers_hear_every_change_of_membership(tmp_path):
    """``watch`` reports each change of ``digest in cache``, through every tier: pending, disk,
    a failed disk write, memory drops and disk evictions; a replay of the reports always equals
    ``in``. Broken on purpose once: without the report after a failed write (``write_pending``'s
    finally) the replay kept the chunk and this test went red."""
    cache = ChunkCache(tmp_path / "c", max_bytes=40 * K, memory_bytes=20 * K)
    chunks = [chunk(n) for n in range(5)]
    seen: set[bytes] = set()
    events = []

    def heard(digest: bytes, present: bool) -> None:
        assert (digest in seen) != present, "a report that changed nothing"
        (seen.add if present else seen.discard)(digest)
        events.append((digest, present))

    unwatch = cache.watch(heard)

    def check() -> None:
        assert seen == {d for d, _ in chunks if d in cache}

    async def main():
        d0, r0 = chunks[0]
        (tmp_path / "c" / d0.hex()[:2]).write_bytes(b"")  # its directory is a file: the write fails
        cache.admit(d0, r0, memory=False)  # pending only
        check()
        assert d0 in seen
        await cache.write_pending(d0)
        check()
        assert d0 not in seen and cache.statistics()["write_errors"] == 1
        for digest, raw in chunks[1:]:  # 16 KiB each: memory holds one, disk two
            await cache.put(digest, raw)
            check()
        assert cache.statistics()["evictions"] > 0
        unwatch()
        count = len(events)
        await cache.put(*chunk(9))
        assert len(events) == count  # no longer watching

    run(main)
