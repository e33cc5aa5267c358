"""A new owner takes a TCMU ring over from a dead one (a daemon restart with the uio fd kept).

Against the emulated kernel (tests/support/tcmu_kernel.py): a first handler takes commands off
the ring and dies (its task is cancelled: it writes nothing more, like ``kill -9``) with some of
them unanswered; a second handler over the same region (a new Uio on the same "device") must
answer every one of them, with the right data, and leave the ring drained.

Broken on purpose once (2026-12-06): with restartable rings completing out of order again
(``and not restartable`` removed from the OOOC default in ``Ring.__init__`` and the ValueError
dropped), ``test_commands_the_dead_owner_left_are_served`` went red: the answers of the fast
commands were written into the blocked command's slot, so its request was gone from the ring and
the new owner served the fast commands' stale requests again (the emulated kernel raised
RingViolation: unknown cmd_id).
"""

from __future__ import annotations

import random
import struct

import pytest
import trio

from lazyfs.serve.tcmu import ring as R
from lazyfs.serve.tcmu.handler import TcmuHandler
from lazyfs.serve.tcmu.scsi import DeviceInfo
from tests.support.memory import MemorySource
from tests.support.tcmu_kernel import CMDR_OFF, KernelEmulator

BLOCK = 512


def read10(lba, blocks):
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


class GatedSource(MemorySource):
    """Reads of offset 0 wait for ``gate`` (a cold chunk the registry has not sent yet)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.gate = trio.Event()

    async def read(self, offset: int, length: int) -> bytes:
        if offset == 0:
            await self.gate.wait()
        return await super().read(offset, length)


def run(main, timeout=60):
    """trio.run with a deadline: a lost command fails the test instead of hanging it."""
    async def bounded():
        with trio.fail_after(timeout):
            await main()

    trio.run(bounded)


async def wait_until(predicate) -> None:
    while not predicate():
        await trio.sleep(0.001)


async def start_handler(nursery, emu, src) -> tuple[TcmuHandler, trio.CancelScope]:
    uio = emu.open_uio()
    handler = TcmuHandler(src, uio, DeviceInfo.for_source(src, "takeover"), restartable=True)
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        try:
            with scope:
                await handler.run(task_status=task_status)
        finally:
            uio.close()

    await nursery.start(run)
    return handler, scope


def test_restartable_rings_complete_in_order():
    emu = KernelEmulator()
    try:
        ring = R.Ring(emu.mem, restartable=True)
        assert not ring.out_of_order and emu.flags & R.CAP_OOOC
        ring.release()
        with pytest.raises(ValueError):
            R.Ring(emu.mem, restartable=True, out_of_order=True)
    finally:
        emu.close()


def test_commands_the_dead_owner_left_are_served():
    data = random.Random(7).randbytes(4 << 20)

    async def main():
        src = GatedSource(data)
        async with KernelEmulator.open() as emu:
            async with trio.open_nursery() as nursery:
                first, first_scope = await start_handler(nursery, emu, src)
                results = {}

                async def submit(lba, blocks):
                    results[lba] = await emu.submit(read10(lba, blocks))

                # the first command waits for a "cold chunk"; the 6 after it are answered, but in
                # order the tail cannot pass the first: their answers sit ahead of the tail
                nursery.start_soon(submit, 0, 8)
                await wait_until(lambda: first.statistics()["commands"] == 1)
                for lba in (64, 128, 256, 1024, 2048, 4096):
                    nursery.start_soon(submit, lba, 16)
                await wait_until(lambda: first.statistics()["completed"] == 6)
                assert first.ring.inflight == 1
                first_scope.cancel()  # the daemon dies: nothing more is written to the ring
                await wait_until(lambda: first_scope.cancelled_caught)
                src.gate.set()

                second, second_scope = await start_handler(nursery, emu, src)
                await wait_until(lambda: len(results) == 7)
                for lba, done in results.items():
                    length = 8 * BLOCK if lba == 0 else 16 * BLOCK
                    assert done.status == 0 and done.data_in == data[lba * BLOCK : lba * BLOCK + length], lba
                stats = second.statistics()
                # only the unanswered command was served again; the 6 answers were passed on as written
                assert stats["commands"] == 1 and stats["taken_over"] == {"answered": 6, "busy": 0}
                # and the ring goes on
                await submit(77, 4)
                assert results[77].data_in == data[77 * BLOCK : 81 * BLOCK]
                second_scope.cancel()
            emu.check_idle()

    run(main)


def test_a_torn_answer_is_answered_busy():
    """The owner died while writing a response: the request in that slot is garbled, so the new
    owner answers it BUSY (the initiator's SCSI layer sends the command again) and goes on."""
    data = random.Random(8).randbytes(1 << 20)

    async def main():
        src = GatedSource(data)
        async with KernelEmulator.open() as emu:
            async with trio.open_nursery() as nursery:
                first, first_scope = await start_handler(nursery, emu, src)
                results = {}

                async def submit(lba, blocks):
                    results[lba] = await emu.submit(read10(lba, blocks))

                nursery.start_soon(submit, 0, 8)
                await wait_until(lambda: first.statistics()["commands"] == 1)
                first_scope.cancel()
                await wait_until(lambda: first_scope.cancelled_caught)
                # what a kill between the first and the last store of a response leaves
                base = CMDR_OFF + struct.unpack_from("=I", emu.mem, R.MB_CMD_TAIL)[0]
                emu.mem[base + R.HDR_UFLAGS] = R.UFLAG_ANSWERING
                emu.mem[base + R.RSP_SCSI_STATUS : base + R.RSP_SENSE_BUFFER + 16] = bytes(24)
                src.gate.set()
                second, second_scope = await start_handler(nursery, emu, src)
                await wait_until(lambda: 0 in results)
                assert results[0].status == R.STATUS_BUSY
                assert second.statistics()["taken_over"] == {"answered": 0, "busy": 1}
                await submit(0, 8)  # the retry
                assert results[0].status == 0 and results[0].data_in == data[: 8 * BLOCK]
                second_scope.cancel()
            emu.check_idle()

    run(main)
