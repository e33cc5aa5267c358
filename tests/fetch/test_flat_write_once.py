"""The fetch path writes each fetched block once: into the flat layer file, not also as a chunk file."""

from __future__ import annotations

import os
from collections import Counter

import trio

from lazyfs.device.merged import MergedDevice
from lazyfs.fetch import cache as cache_mod
from lazyfs.fetch import flatfile
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.flatfile import FlatCache, LayerFlats
from lazyfs.fetch.scheduler import FetchScheduler
from lazyfs.format.layer import BLOCK_SIZE
from tests.support.layers import STACK_SIZE, MemoryBackend, make_stack


def _chunk_files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


class WriteCounter:
    """A counting shim over both disk tiers: every block written to a flat file, every chunk file written."""

    def __init__(self, monkeypatch) -> None:
        self.flat_blocks: Counter[tuple[int, int]] = Counter()  # (fd, block) -> times written
        self.chunk_files: Counter[str] = Counter()
        real_pwrite, real_entry = flatfile.pwrite_all, cache_mod._write_entry

        def pwrite_all(fd, data, offset):
            assert offset % BLOCK_SIZE == 0 and len(data) % BLOCK_SIZE == 0
            for b in range(len(data) // BLOCK_SIZE):
                self.flat_blocks[(fd, offset // BLOCK_SIZE + b)] += 1
            real_pwrite(fd, data, offset)

        def write_entry(path, data, fsync):
            self.chunk_files[str(path)] += 1
            real_entry(path, data, fsync)

        monkeypatch.setattr(flatfile, "pwrite_all", pwrite_all)
        monkeypatch.setattr(cache_mod, "_write_entry", write_entry)


async def _read_all(tmp_path, layers, backend, **flat_kw):
    """A host-like stack: scheduler over a chunk cache on disk, flat layer files under the device."""
    chunks = ChunkCache(tmp_path / "chunks", 1 << 30, memory_bytes=0)  # nothing kept in memory
    flat = await FlatCache.load(tmp_path / "flat", 1 << 30, **flat_kw)
    async with FetchScheduler.open([backend], chunks) as sched:
        sched.flat = flat
        dev = MergedDevice(layers, sched)
        dev.block_cache = await LayerFlats.open(flat, layers)
        got = await dev.read(0, STACK_SIZE)
        return got, dev, flat, chunks, sched.statistics()


def test_each_fetched_block_is_written_once_into_the_flat_file_and_no_chunk_file(tmp_path, monkeypatch):
    """A cold read of a whole stack through the fetch scheduler and the flat files writes every block
    it fetched exactly once (into its layer's flat file, in the decode worker) and no chunk file.

    Broken on purpose once (``_decode_job`` writing the chunk file as well as the flat targets, and
    ``_resolve`` admitting with ``disk=True``: the double write this test guards against): chunk files
    appeared and the test went red. A second break (``FlatCache.targets`` returning nothing, so the
    device's own admit wrote the flat file after the scheduler wrote the chunk file) was red as well.
    """
    counter = WriteCounter(monkeypatch)
    layers, mem, model = make_stack(7)
    backend = MemoryBackend(mem.blobs)

    async def main():
        got, dev, flat, chunks, st = await _read_all(tmp_path, layers, backend)
        assert got == model
        assert st["fetches"] > 0 and st["cache"]["writes"] == 0
        assert counter.chunk_files == Counter() and _chunk_files(tmp_path / "chunks") == []
        assert counter.flat_blocks and max(counter.flat_blocks.values()) == 1  # each block once
        held = sum(f.map.count for f in dev.block_cache.files)
        assert len(counter.flat_blocks) == held
        fst = flat.statistics()
        assert fst["fetch_writes"] == fst["writes"] and fst["fetch_bytes_written"] == held * BLOCK_SIZE
        await dev.aclose()
        await flat.aclose()
        # found again after a restart (persisted at detach): the network is not asked
        reads = len(backend.reads)
        got, dev, flat, chunks, st = await _read_all(tmp_path, layers, backend)
        assert got == model and len(backend.reads) == reads and st["fetches"] == 0
        assert counter.chunk_files == Counter()
        await dev.aclose()
        await flat.aclose()

    trio.run(main)


def test_blocks_the_fetch_path_wrote_but_did_not_persist_are_fetched_again_after_a_crash(tmp_path):
    """With no chunk file behind it, a block written into the flat file by the fetch path is trusted
    only once its map record is persisted (after the data fdatasync). A crash before that: nothing
    is listed, the chunks are fetched again and read right.

    Broken on purpose once (``FlatCache.committed`` appending the map record to the map file at once,
    ``write_all(f.map_fd, f.take_pending())``, before any data fdatasync): the blocks were listed after
    the "crash" and served without a fetch, red.
    """
    layers, mem, model = make_stack(8, nlayers=1)
    backend = MemoryBackend(mem.blobs)

    async def main():
        got, dev, flat, chunks, _ = await _read_all(tmp_path, layers, backend, persist_interval=3600)
        assert got == model and sum(f.map.count for f in dev.block_cache.files) > 0
        for f in dev.block_cache.files:  # the process dies: no persist, no close
            f.close()
        reads = len(backend.reads)
        got, dev, flat, chunks, st = await _read_all(tmp_path, layers, backend)
        assert got == model
        assert st["fetches"] == len(dev.index.locations()) and len(backend.reads) > reads
        await dev.aclose()
        await flat.aclose()

    trio.run(main)


def test_an_image_read_into_its_flat_files_counts_as_local_and_hydrates_from_them(tmp_path):
    """With no chunk files behind them, blocks held in the device's flat files still make its image
    fully local: the daemon's check builds the hydrated file from the flat files, with the network
    and the chunk store not asked again (the scheduler is stopped by then).

    Broken on purpose once (``is_fully_local`` ignoring the block cache, as before this change):
    ``check_once`` built nothing and the test went red.
    """
    from lazyfs.config import Config
    from lazyfs.serve import hydrated
    from tests.serve.test_hydrated_build import MANIFEST, _Host, _Image

    layers, mem, model = make_stack(9)
    backend = MemoryBackend(mem.blobs)

    async def main():
        got, dev, flat, chunks, _ = await _read_all(tmp_path, layers, backend)
        assert got == model and _chunk_files(tmp_path / "chunks") == []
        reads = len(backend.reads)
        assert hydrated.missing_chunks(dev, chunks) == 0
        att = _Host(device=dev, store=dev.store, opened=_Image(MANIFEST), ref="test/image", name="a", tasks=set())
        host = _Host(config=Config(cache_root=str(tmp_path)), cache=chunks, attachments={"a": att})
        (built,) = await hydrated.check_once(host, set())
        with open(built.path, "rb") as f:
            assert f.read() == bytes(model)
        assert len(backend.reads) == reads
        await dev.aclose()
        await flat.aclose()

    trio.run(main)
