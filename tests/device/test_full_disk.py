"""A full writable root (a small tmpfs): writes and flushes fail with ENOSPC, nothing acknowledged is lost.

Break-tests, each done once by hand:
* ``pwrite_all`` writing once instead of looping: on the full disk the
  journal batch is short, and the flush reports success for it
  ("DID NOT RAISE StorageError").
* the sparse layer writing in block order instead of holes first: a write
  that fails for lack of space has already overwritten DATA blocks (the
  "changes nothing visible" assertion goes red).
* ``WritableLayer._before_write`` ignoring ``keep_free``: the layer fills the
  disk and the chunk cache's writes fail ("the writable layer took the chunk
  cache's space").
"""

import contextlib
import errno
import os
import random
import subprocess

import pytest
import trio

from lazyfs.config import Config
from lazyfs.device.writable import create_writable, open_writable
from lazyfs.errors import StorageError
from lazyfs.fetch.cache import ChunkCache
from lazyfs.serve.diskbudget import DiskBudget
from tests.conftest import require_root

BS = 4096


@contextlib.contextmanager
def small_tmpfs(path, size: str):
    require_root()
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: str) -> str:
    """A balloon file taking every free byte of *path*'s file system."""
    balloon = os.path.join(path, "balloon")
    fd = os.open(balloon, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, BS, 512, 1):
            while True:
                try:
                    if os.write(fd, bytes(size)) < size:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return balloon


def contents(layer, blocks: int) -> dict[int, bytes | None]:
    out = {}
    for start, count, state in layer.lookup(0, blocks):
        for b in range(start, start + count):
            out[b] = None if state == 0 else bytes(BS) if state == 2 else layer.read_blocks(b, 1)
    return out


@pytest.mark.parametrize("kind", ["sparse", "log"])
def test_full_writable_root(tmp_path, kind):
    with small_tmpfs(tmp_path / "small", "2m") as small:
        blocks = 2048  # an 8 MiB device on a 2 MiB disk
        root = os.path.join(small, "w")
        with open(os.path.join(small, "other-data"), "wb") as f:  # someone else's: freed at the end
            f.write(bytes(256 << 10))
        layer = create_writable(root, kind, blocks * BS)
        rng = random.Random(1)
        acknowledged: dict[int, bytes] = {}
        pending: dict[int, bytes] = {}
        write_failures = flush_failures = 0
        try:
            for _ in range(1000):  # bounded: the disk is full long before
                start, count = rng.randrange(blocks - 8), rng.randint(1, 8)
                data = rng.randbytes(count * BS)
                before = contents(layer, blocks) if kind == "sparse" else None
                try:
                    layer.write_blocks(start, data)
                    pending.update({start + i: data[i * BS : (i + 1) * BS] for i in range(count)})
                except StorageError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    write_failures += 1
                    if before is not None:  # a write that fails for lack of space changes nothing visible
                        after = contents(layer, blocks)
                        assert all(after[b] == before[b] for b in range(start, start + count))
                try:
                    layer.flush()
                    acknowledged.update(pending)
                    pending.clear()
                except StorageError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    flush_failures += 1
                if write_failures > 20:
                    break
            assert write_failures > 20
            # journal-only work once the data cannot grow: discards (no data) until a flush needs a new page
            for i in range(600):
                layer.zero_blocks(rng.randrange(blocks), 1) if kind == "log" else layer.write_blocks(
                    next(iter(acknowledged)), acknowledged[next(iter(acknowledged))])
            fill(small)
            with pytest.raises(StorageError) as full:
                layer.flush()
            assert full.value.errno == errno.ENOSPC
            stats = layer.statistics()
            assert stats["write_errors"] >= 20 and stats["flush_errors"] >= 1 and not stats["failed"]
        finally:
            layer.close()
        # the layer opens on the full disk, with every acknowledged write
        layer = open_writable(root)
        try:
            got = contents(layer, blocks)
            lost = [b for b, data in acknowledged.items() if got[b] != data]
            assert lost == [], f"acknowledged writes lost in blocks {lost[:10]}"
        finally:
            layer.close()
        os.unlink(os.path.join(small, "balloon"))
        os.unlink(os.path.join(small, "other-data"))
        layer = open_writable(root)  # and with room again it takes writes
        try:
            victim = next(iter(acknowledged))
            layer.write_blocks(victim, bytes([7]) * BS)
            layer.flush()
        finally:
            layer.close()
        layer = open_writable(root)
        try:
            assert layer.read_blocks(victim, 1) == bytes([7]) * BS
        finally:
            layer.close()


def test_writable_layers_leave_the_chunk_cache_its_budget(tmp_path):
    """Cache root and writable root on one 4 MiB disk, cache budget 1.5 MiB: writes stop short of it."""
    import blake3

    with small_tmpfs(tmp_path / "small", "4m") as small:
        config = Config(cache_root=os.path.join(small, "cache"), writable_root=os.path.join(small, "writable"),
                        cache_size=1536 << 10)
        cache = ChunkCache(config.cache_root, config.cache_size)
        budget = DiskBudget(config, cache)
        root = os.path.join(config.writable_root, "img")
        layer = create_writable(root, "sparse", 4096 * BS)
        layer.keep_free = budget.reserve_for(root)
        assert layer.keep_free is not None
        rng = random.Random(2)
        refusal = None
        try:
            for block in range(0, 4096, 4):  # a container writing until its disk is "full"
                try:
                    layer.write_blocks(block, rng.randbytes(4 * BS))
                    layer.flush()
                except StorageError as exc:
                    refusal = exc
                    break
            sample = budget.sample({"img": layer})
            stats = layer.statistics()
        finally:
            layer.close()

        async def fill_cache():
            for i in range(5):  # 5 x 256 KiB = 1.25 MiB of the 1.5 MiB budget
                raw = bytes([i + 1]) * (256 << 10)
                await cache.put(blake3.blake3(raw).digest(), raw)

        trio.run(fill_cache)
        assert cache.statistics()["write_errors"] == 0, "the writable layer took the chunk cache's space"
        assert refusal is not None and refusal.errno == errno.ENOSPC and "chunk cache" in str(refusal)
        assert stats["refused_for_reserve"] == 1
        assert sample["writable_reserve"] == 1536 << 10
        assert sample["writable_layers"]["bytes"] > 1 << 20
        assert sample["writable_layers"]["max_bytes"] == stats["max_disk_bytes"]
        assert sample["chunk_cache"]["max_bytes"] == 1536 << 10
