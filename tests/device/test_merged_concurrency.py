"""MergedDevice never holds its write lock across a chunk fetch, and its writable layer's disk
I/O runs off the event loop (docs/daemon.md, "Concurrency").

Each test orders completions instead of timing them: the stalled operation is held until the
other one has completed, or, if the guarantee is broken, until a stand-in fetch deadline
expires, after which the order comes out wrong and the test fails.
"""

import threading

import trio
import trio.testing

from lazyfs.device.chunks import ChunkLocation, Priority
from lazyfs.device.merged import MergedDevice
from lazyfs.device.writable import create_writable
from lazyfs.format.layer import BLOCK_SIZE as BS
from tests.support.layers import MemoryBackend, build_blob
from tests.support.sources import CountingSource

SIZE = 64 * BS
DEADLINE = 15.0  # stands in for the fetch deadline; only a broken guarantee ever waits for it


class GatedSource(CountingSource):
    """Holds every get of chunk *gated* until ``release`` is set (or DEADLINE passes)."""

    def __init__(self, backend, gated: bytes) -> None:
        super().__init__(backend)
        self.gated, self.release, self.waiting = gated, trio.Event(), trio.Event()

    async def get(self, loc: ChunkLocation, priority: Priority = Priority.DEMAND) -> bytes:
        if loc.digest == self.gated:
            self.waiting.set()
            with trio.move_on_after(DEADLINE):
                await self.release.wait()
        return await super().get(loc, priority)


def _device(tmp_path, name="w"):
    """A one-layer device (two chunks: blocks 0-3 and 32-35) with a sparse writable layer."""
    blob, digest, meta = build_blob(SIZE, [(0, b"\x01" * 4 * BS), (32, b"\x02" * 4 * BS)], chunk_size=16 * 1024)
    backend = MemoryBackend({digest: blob})
    first = next(loc for loc in meta.locations(digest))
    store = GatedSource(backend, first.digest)
    layer = create_writable(str(tmp_path / name), "sparse", SIZE)
    return MergedDevice([(meta, digest)], store, layer), store


def test_read_modify_write_does_not_hold_the_write_lock_across_a_chunk_miss(tmp_path):
    """An unaligned write to block 0 waits for its lower chunk; a write and flush elsewhere on
    the same device completes meanwhile, and the stalled write still lands its bytes correctly.

    Broken on purpose once: with the edge blocks read inside ``async with self._write_lock``
    (as before), the order came out ["rmw", "other"] after DEADLINE and this test failed.
    """
    async def main():
        device, store = _device(tmp_path)
        order = []

        async def rmw():
            await device.write(100, b"x" * 10)  # partial block 0: needs the gated chunk
            order.append("rmw")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(rmw)
            await store.waiting.wait()
            await device.write(40 * BS, b"y" * BS)
            await device.flush()
            order.append("other")
            store.release.set()
        assert order == ["other", "rmw"]
        got = await device.read(0, BS)
        assert got == b"\x01" * 100 + b"x" * 10 + b"\x01" * (BS - 110)
        assert await device.read(40 * BS, BS) == b"y" * BS
        await device.aclose()

    trio.run(main)


def test_read_modify_write_rechecks_the_writable_layer_under_the_lock(tmp_path):
    """A write that lands on an edge block while a read-modify-write fetches is not undone:
    the edge is taken from the writable layer, not from the lower bytes fetched before.

    Broken on purpose once: with the pre-fetched lower bytes used without re-checking the
    block's state under the lock, block 0 read back as the old lower bytes and this failed.
    """
    async def main():
        device, store = _device(tmp_path)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.write, 100, b"x" * 10)
            await store.waiting.wait()
            await device.write(0, b"z" * BS)  # the whole of block 0, while the other waits
            store.release.set()
        assert await device.read(0, BS) == b"z" * 100 + b"x" * 10 + b"z" * (BS - 110)
        await device.aclose()

    trio.run(main)


def test_slow_disk_write_does_not_stop_reads_of_another_device(tmp_path):
    """A writable layer whose pwrite hangs (an injected hook, in the worker thread) does not stop
    reads, nor writable-layer reads, of another device on the same event loop.

    Broken on purpose once: with ``layer.write_blocks`` called inline on the event loop (as
    before), the loop sat in the hook until DEADLINE and the order came out ["slow write", "reads"].
    """
    async def main():
        slow, _ = _device(tmp_path, "slow")
        other, other_store = _device(tmp_path, "other")
        other_store.release.set()
        await other.write(8 * BS, b"w" * BS)  # a block the reads below take from the writable layer
        entered, go = threading.Event(), threading.Event()
        real = slow.writable._write_data

        def hanging_pwrite(data, offset):
            entered.set()
            go.wait(DEADLINE)
            real(data, offset)

        slow.writable._write_data = hanging_pwrite
        order = []

        async def write_slowly():
            await slow.write(16 * BS, b"s" * BS)
            order.append("slow write")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_slowly)
            await trio.to_thread.run_sync(entered.wait, DEADLINE)
            assert entered.is_set()
            for offset in range(0, SIZE, 4 * BS):
                await other.read(offset, 4 * BS)
            assert await other.read(8 * BS, BS) == b"w" * BS
            order.append("reads")
            go.set()
        assert order == ["reads", "slow write"]
        assert await slow.read(16 * BS, BS) == b"s" * BS
        await slow.aclose()
        await other.aclose()

    trio.run(main)


def test_aclose_waits_for_reads_in_worker_threads(tmp_path):
    """A writable-layer read that fell back to a worker thread finishes before the layer's
    descriptor is closed (it could otherwise read a reused descriptor)."""
    async def main():
        device, store = _device(tmp_path)
        store.release.set()
        await device.write(0, b"a" * BS)
        device.writable._nowait = False  # every read of the writable layer goes to a thread
        entered, go = threading.Event(), threading.Event()
        real = device.writable.read_blocks

        def slow_read(start, count):
            entered.set()
            go.wait(DEADLINE)
            return real(start, count)

        device.writable.read_blocks = slow_read
        results = []

        async def reader():
            results.append(await device.read(0, BS))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.to_thread.run_sync(entered.wait, DEADLINE)
            nursery.start_soon(device.aclose)
            await trio.testing.wait_all_tasks_blocked()
            assert device.writable._fd >= 0  # still open: the read is in its thread
            go.set()
        assert results == [b"a" * BS]
        assert device.writable._fd == -1
        assert device.thread_reads == 1

    trio.run(main)
