"""The handler against the emulated kernel side of the ring, with a MemorySource behind it."""

from __future__ import annotations

import random
import struct

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.device.source import BlockSource
from lazyfs.serve.tcmu import ring as R
from tests.support.memory import MemorySource
from tests.support.tcmu_kernel import CMDR_OFF, KernelEmulator, serve_emulated

GOOD, CHECK_CONDITION = 0x00, 0x02


def run(main, timeout=60):
    """trio.run with a deadline, so a lost completion fails the test instead of hanging it."""
    async def bounded():
        with trio.fail_after(timeout):
            await main()

    trio.run(bounded)


def read10(lba, blocks):
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba, blocks):
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read16(lba, blocks):
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba, blocks, fua=False):
    return struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, blocks, 0, 0)


SYNC10 = bytes([0x35] + [0] * 9)


def key_asc(c):
    assert c.status == CHECK_CONDITION, c
    return c.sense[2] & 0x0F, c.sense[12], c.sense[13]


def test_read_whole_device_with_read16():
    async def main():
        data = random.Random(1).randbytes(8 << 20)
        src = MemorySource(data)
        async with serve_emulated(src) as (emu, handler):
            chunk = 256  # blocks of 512 = 128 KiB per command, scattered over many iovecs
            got = {}

            async def read(lba):
                c = await emu.submit(read16(lba, chunk))
                assert c.status == GOOD, c
                got[lba] = c.data_in

            async with trio.open_nursery() as n:
                for lba in range(0, len(data) // 512, chunk):
                    n.start_soon(read, lba)
            assert b"".join(got[k] for k in sorted(got)) == data
            assert emu.stats["max_iovecs"] > 1 and emu.stats["max_inflight"] > 1
            assert handler.statistics()["bytes_read"] == len(data)

    run(main)


def test_read_capacity_and_inquiry_through_the_ring():
    async def main():
        src = MemorySource(4 << 20)
        async with serve_emulated(src, block_size=4096) as (emu, _):
            c = await emu.submit(bytes([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]))
            assert struct.unpack_from(">QI", c.data_in) == ((4 << 20) // 4096 - 1, 4096)
            c = await emu.submit(bytes([0x12, 0, 0, 0, 255, 0]))
            # 36 bytes of standard data in a 255-byte buffer: the residual travels as read_len
            assert c.status == GOOD and len(c.data_in) == 36 and c.read_len == 36
            c = await emu.submit(bytes([0x12, 1, 0x83, 0, 255, 0]))
            assert c.data_in[1] == 0x83 and c.data_in[5] == 0x03
            c = await emu.submit(bytes([0xC5] + [0] * 9))
            assert not c.unknown_op and key_asc(c) == (5, 0x20, 0)

    run(main)


def test_concurrent_writes_and_synchronize_cache():
    async def main():
        size = 4 << 20
        src = MemorySource(size)
        model = bytearray(size)
        rng = random.Random(2)
        async with serve_emulated(src) as (emu, handler):
            async def write(lba, blocks, sixteen):
                payload = rng.randbytes(blocks * 512)
                model[lba * 512 : (lba + blocks) * 512] = payload
                cdb = write16(lba, blocks) if sixteen else write10(lba, blocks)
                c = await emu.submit(cdb, payload)
                assert c.status == GOOD, c

            async with trio.open_nursery() as n:
                for i, lba in enumerate(range(0, size // 512, 64)):
                    n.start_soon(write, lba + i % 7, 1 + i % 57, i % 2 == 0)
                    if i % 10 == 0:
                        n.start_soon(emu.submit, SYNC10)
            c = await emu.submit(bytes([0x91] + [0] * 15))  # SYNCHRONIZE CACHE(16)
            assert c.status == GOOD
            assert src.flushes >= 2
            assert bytes(src.data) == bytes(model)
            back = b"".join([(await emu.submit(read10(lba, 1024))).data_in for lba in range(0, size // 512, 1024)])
            assert back == bytes(model)
            assert handler.statistics()["bytes_written"] > 0

    run(main)


def test_pad_and_wrap_around_with_a_small_ring():
    async def main():
        data = random.Random(3).randbytes(1 << 20)
        src = MemorySource(data)
        # room for ~9 entries: the ring wraps every few commands and PADs are frequent
        async with serve_emulated(src, cmdr_size=1280, data_size=256 << 10) as (emu, _):
            rng = random.Random(4)

            async def one(i):
                lba = rng.randrange(0, 2048 - 64)
                blocks = rng.choice([1, 3, 8, 17, 64])
                cdb = read16(lba, blocks) if i % 3 else read10(lba, blocks)
                c = await emu.submit(cdb)
                assert c.status == GOOD and c.data_in == data[lba * 512 : (lba + blocks) * 512]

            async with trio.open_nursery() as n:
                for i in range(600):
                    n.start_soon(one, i)
            stats = emu.stats
            assert stats["commands"] == 600 and stats["pads"] > 20 and stats["waits_for_space"] > 0

    run(main)


def test_tmr_entries_in_the_ring_are_skipped():
    async def main():
        src = MemorySource(1 << 20)
        async with serve_emulated(src, cmdr_size=1024) as (emu, handler):
            for i in range(30):
                await emu.submit_tmr(R.TMR_ABORT_TASK, list(range(i % 5)))
                c = await emu.submit(read10(i, 1))
                assert c.status == GOOD
            assert handler.statistics()["tmr"] == 30 and emu.stats["pads"] > 0

    run(main)


class GatedSource(BlockSource):
    """Wraps a source; reads touching ``[gate_start, gate_end)`` wait until ``gate`` is set."""

    def __init__(self, inner: BlockSource, gate_start: int, gate_end: int) -> None:
        self.inner, self.size, self.read_only = inner, inner.size, inner.read_only
        self.gate_start, self.gate_end = gate_start, gate_end
        self.gate = trio.Event()
        self.waiting = 0

    async def read(self, offset, length):
        if offset < self.gate_end and offset + length > self.gate_start:
            self.waiting += 1
            await self.gate.wait()
        return await self.inner.read(offset, length)

    async def write(self, offset, data):
        await self.inner.write(offset, data)


def test_a_slow_read_does_not_hold_back_other_completions():
    async def main():
        data = random.Random(5).randbytes(1 << 20)
        src = GatedSource(MemorySource(data), 0, 4096)
        async with serve_emulated(src, cmdr_size=2048) as (emu, _):
            async with trio.open_nursery() as n:
                slow = {}

                async def slow_read():
                    slow["c"] = await emu.submit(read16(0, 8))

                n.start_soon(slow_read)
                await trio.testing.wait_all_tasks_blocked()
                assert src.waiting == 1
                # Far more commands than the ring holds: they all need the slow one's slot to be passed.
                model = bytearray(data)
                for i in range(200):
                    lba = 8 + (i * 37) % 2000
                    c = await emu.submit(read10(lba, 4))
                    assert c.data_in == model[lba * 512 : (lba + 4) * 512]
                    c = await emu.submit(write10(lba, 1), b"w" * 512)
                    assert c.status == GOOD
                    model[lba * 512 : (lba + 1) * 512] = b"w" * 512
                assert "c" not in slow
                src.gate.set()
            assert slow["c"].data_in == data[:4096]

    run(main)


def test_without_out_of_order_capability_completions_wait_for_ring_order():
    async def main():
        data = bytes(range(256)) * 4096
        src = GatedSource(MemorySource(data), 0, 512)
        flags = R.CAP_READ_LEN | R.CAP_TMR  # an old kernel: no CAP_OOOC
        async with serve_emulated(src, flags=flags) as (emu, handler):
            assert not handler.ring.out_of_order
            done = []

            async def read(lba):
                c = await emu.submit(read10(lba, 1))
                done.append((lba, c.data_in))

            async with trio.open_nursery() as n:
                n.start_soon(read, 0)
                await trio.testing.wait_all_tasks_blocked()
                for lba in range(1, 11):
                    n.start_soon(read, lba)
                await trio.testing.wait_all_tasks_blocked()
                # all ten answered by the handler, none visible to the kernel before the first
                assert handler.statistics()["completed"] == 10 and done == []
                src.gate.set()
            assert sorted(done) == [(lba, data[lba * 512 : (lba + 1) * 512]) for lba in range(11)]

    run(main)


def test_unmap_and_write_same_then_read_zeros():
    async def main():
        size = 1 << 20
        data = random.Random(6).randbytes(size)
        src = MemorySource(data)
        model = bytearray(data)
        async with serve_emulated(src) as (emu, _):
            descs = [(10, 20), (100, 1), (500, 300)]
            body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in descs)
            params = struct.pack(">HH4x", 6 + len(body), len(body)) + body
            c = await emu.submit(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, len(params), 0]), params)
            assert c.status == GOOD, c
            for lba, n in descs:
                model[lba * 512 : (lba + n) * 512] = bytes(n * 512)
            c = await emu.submit(struct.pack(">BBQIBB", 0x93, 0x08, 1000, 24, 0, 0), bytes(512))  # WS16 + UNMAP
            assert c.status == GOOD
            model[1000 * 512 : 1024 * 512] = bytes(24 * 512)
            c = await emu.submit(struct.pack(">BBQIBB", 0x93, 0x09, 1200, 8, 0, 0))  # NDOB: no data-out
            assert c.status == GOOD
            model[1200 * 512 : 1208 * 512] = bytes(8 * 512)
            c = await emu.submit(struct.pack(">BBIBHB", 0x41, 0, 1500, 0, 16, 0), b"\xab" * 512)  # plain WS10
            assert c.status == GOOD
            model[1500 * 512 : 1516 * 512] = b"\xab" * (16 * 512)
            whole = b"".join([(await emu.submit(read16(lba, 512))).data_in for lba in range(0, size // 512, 512)])
            assert whole == bytes(model)
            assert whole[10 * 512 : 30 * 512] == bytes(20 * 512)

    run(main)


def test_read_only_source_gives_data_protect():
    async def main():
        data = random.Random(7).randbytes(1 << 20)
        src = MemorySource(data, read_only=True)
        async with serve_emulated(src) as (emu, _):
            c = await emu.submit(write10(0, 1), bytes(512))
            assert key_asc(c) == (7, 0x27, 0)
            c = await emu.submit(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), bytes(24))
            assert key_asc(c) == (7, 0x27, 0)
            c = await emu.submit(bytes([0x1A, 0, 0x3F, 0, 255, 0]))
            assert c.data_in[2] & 0x80  # WP in MODE SENSE
            c = await emu.submit(read10(0, 8))
            assert c.data_in == data[:4096]
            assert bytes(src.data) == data

    run(main)


def test_data_area_exhaustion_waits_and_recovers():
    async def main():
        data = random.Random(8).randbytes(2 << 20)
        src = MemorySource(data)
        async with serve_emulated(src, data_size=128 << 10, max_inflight=4) as (emu, _):
            async def read(lba):
                c = await emu.submit(read16(lba, 128))  # 64 KiB each, two fit in the data area
                assert c.data_in == data[lba * 512 : (lba + 128) * 512]

            async with trio.open_nursery() as n:
                for lba in range(0, 4096, 128):
                    n.start_soon(read, lba)
            assert emu.stats["waits_for_space"] > 0
            big = await emu.submit(read16(0, 512))  # 256 KiB: bigger than the whole data area
            assert not big.queued and key_asc(big) == (5, 0x24, 0)

    run(main)


CDB = st.tuples(st.integers(0, 255), st.binary(max_size=31), st.integers(1, 32)).map(
    lambda t: (bytes([t[0]]) + t[1])[: t[2]])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=st.lists(st.tuples(CDB, st.one_of(st.none(), st.binary(max_size=9000)), st.integers(0, 9000)),
                         min_size=1, max_size=12),
       read_only=st.booleans())
def test_random_cdbs_through_the_ring(commands, read_only):
    async def main():
        src = MemorySource(1 << 20, read_only=read_only)
        async with serve_emulated(src, cmdr_size=1024, data_size=64 << 10) as (emu, handler):
            async def one(cdb, data_out, data_in_length):
                if data_out is not None:
                    c = await emu.submit(cdb, data_out)
                else:
                    c = await emu.submit(cdb, data_in_length=data_in_length)
                assert c.status in (GOOD, CHECK_CONDITION) and not c.unknown_op
                if c.status == CHECK_CONDITION and c.queued:
                    assert c.sense[0] == 0x70 and len(c.sense) == 18 and c.data_in == b""
                if data_out is None:
                    assert len(c.data_in) <= data_in_length

            async with trio.open_nursery() as n:
                for cdb, data_out, data_in_length in commands:
                    n.start_soon(one, cdb, data_out, data_in_length)
            assert handler.statistics()["completed"] == sum(1 for _ in commands) - emu.stats["refused"]

    run(main)


def test_emulator_catches_a_tail_past_the_head():
    async def main():
        async with KernelEmulator.open(cmdr_size=1024) as emu:
            struct.pack_into("=I", emu.mem, R.MB_CMD_TAIL, 64)
            try:
                emu.handle_completions()
            except AssertionError as exc:
                assert "past cmd_head" in str(exc)
            else:
                raise AssertionError("a tail beyond the head went unnoticed")
            assert CMDR_OFF == R.MAILBOX_SIZE

    run(main)


class InPlaceSource(MemorySource):
    """A MemorySource that reads in place like MergedDevice does, counting both read paths."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = self.reads_into = 0

    async def read(self, offset, length):
        self.reads += 1
        return await super().read(offset, length)

    async def read_into(self, offset, buf):
        self.reads_into += 1
        data = await super().read(offset, len(buf))
        buf[: len(data)] = data
        return len(data)


def test_reads_go_straight_into_the_data_area_when_it_is_one_piece():
    """Issue 14, item 5: a READ whose data-in buffer is contiguous in the data area is read into it
    in place (``read_into``), with no bytes object in between; a scattered buffer falls back to
    read + scatter. Either way the initiator gets the right bytes, over stale data-area contents.
    Broken on purpose once (the handler passing no data view): the in-place counts stayed 0, red."""
    async def main():
        data = random.Random(11).randbytes(4 << 20)
        # first-fit allocation like the kernel's: every buffer is one run of blocks
        src = InPlaceSource(data)
        async with serve_emulated(src, scatter=False) as (emu, handler):
            for i in range(50):
                lba, blocks = (i * 613) % 8000, 1 + (i * 7) % 256
                c = await emu.submit(read16(lba, blocks))
                assert c.status == GOOD and c.data_in == data[lba * 512 : (lba + blocks) * 512]
            assert src.reads_into == 50 and src.reads == 0
            assert handler.statistics()["inplace_reads"] == 50
        # random block picks: some buffers are scattered over the data area and take the copy path
        src = InPlaceSource(data)
        async with serve_emulated(src, scatter=True, seed=3) as (emu, handler):
            for i in range(50):
                lba, blocks = (i * 613) % 8000, 1 + (i * 7) % 16  # one 4 KiB data block, or two
                c = await emu.submit(read16(lba, blocks))
                assert c.status == GOOD and c.data_in == data[lba * 512 : (lba + blocks) * 512]
            assert src.reads_into > 0 and src.reads > 0 and src.reads_into + src.reads == 50
            assert handler.statistics()["inplace_reads"] == src.reads_into

    run(main)
