#!/usr/bin/env python3
"""What moving writable-layer I/O off the event loop costs and buys (issue 13, item 4).

One sparse writable layer on the work directory's disk, under a MergedDevice, in one trio run.
Two ways of doing the same 4 KiB random writes, each followed by a flush every ``--batch``
writes (fdatasync of the data, then a journal batch and its fdatasync):

* ``inline``: ``layer.write_blocks`` and ``layer.flush`` called on the event loop: what
  ``MergedDevice.write`` did before (the baseline);
* ``worker thread``: ``MergedDevice.write`` / ``flush``, which now run them in a worker thread.

For each, a ticker task on the same loop sleeps 1 ms at a time and records by how much each
wake-up came late: the longest and p99 lateness are how long every other image on the daemon
could not be served. Reads: 4 KiB reads of written (cached) blocks through the device, inline
with RWF_NOWAIT (the new hot path) against the same forced through a worker thread, and
``os.pread`` as the floor.

Usage: scripts/bench/loop_offload.py [--workdir /var/tmp/lazyfs-bench-offload] [--writes 3000] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time

import trio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lazyfs.device.merged import MergedDevice  # noqa: E402
from lazyfs.device.writable import create_writable  # noqa: E402

BS = 4096
SIZE = 256 << 20


class Ticker:
    """Wakes every *period* seconds and records how late each wake-up was."""

    def __init__(self, period: float = 0.001) -> None:
        self.period, self.late = period, []

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            before = time.perf_counter()
            await trio.sleep(self.period)
            self.late.append(max(0.0, time.perf_counter() - before - self.period))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def writes(device: MergedDevice, inline: bool, n: int, batch: int, seed: int) -> dict:
    rng = random.Random(seed)
    layer = device.writable
    ticker = Ticker()
    latencies = []
    async with trio.open_nursery() as nursery:
        await nursery.start(ticker.run)
        start = time.perf_counter()
        for i in range(n):
            block, data = rng.randrange(SIZE // BS), rng.randbytes(BS)
            t = time.perf_counter()
            if inline:
                layer.write_blocks(block, data)
                if (i + 1) % batch == 0:
                    layer.flush()
                await trio.lowlevel.checkpoint()
            else:
                await device.write(block * BS, data)
                if (i + 1) % batch == 0:
                    await device.flush()
            latencies.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return {"ops": n / elapsed, "p50": statistics.median(latencies), "stall_max": max(ticker.late),
            "stall_p99": _pct(ticker.late, 0.99), "ticks": len(ticker.late) / elapsed}


async def reads(device: MergedDevice, thread: bool, n: int, seed: int) -> float:
    rng = random.Random(seed)
    device.writable._nowait = not thread
    blocks = [rng.randrange(SIZE // BS) for _ in range(n)]
    for block in blocks:  # written (so DATA) and in the page cache
        await device.write(block * BS, b"r" * BS)
    start = time.perf_counter()
    for block in blocks:
        await device.read(block * BS, BS)
    device.writable._nowait = True
    return n / (time.perf_counter() - start)


def pread_floor(path: str, n: int, seed: int) -> float:
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for _ in range(n):
            os.pread(fd, BS, rng.randrange(SIZE // BS) * BS)
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)


async def main(args) -> None:
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    try:
        device = MergedDevice([], None, create_writable(os.path.join(args.workdir, "layer"), "sparse", SIZE), SIZE)
        rows = {}
        for rnd in range(args.repeat):  # alternate, so drift in the machine's load hits both
            for inline in (True, False) if rnd % 2 == 0 else (False, True):
                got = await writes(device, inline, args.writes, args.batch, seed=rnd)
                rows.setdefault(inline, []).append(got)
        await device.flush()
        read_rows: dict[str, list[float]] = {"nowait": [], "thread": [], "floor": []}
        data_file = os.path.join(args.workdir, "layer", "data")
        for rnd in range(args.repeat):  # rotating order, as for the writes
            order = ["nowait", "thread", "floor"][rnd % 3:] + ["nowait", "thread", "floor"][:rnd % 3]
            for what in order:
                if what == "floor":
                    read_rows[what].append(pread_floor(data_file, args.reads, 10 + rnd))
                else:
                    read_rows[what].append(await reads(device, what == "thread", args.reads, 10 + rnd))
        nowait, threaded, floor = (statistics.median(read_rows[k]) for k in ("nowait", "thread", "floor"))
        await device.aclose()
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)

    def med(inline: bool, key: str) -> float:
        return statistics.median(r[key] for r in rows[inline])

    print(f"{args.writes} random 4 KiB writes, a flush every {args.batch}, {args.repeat} rounds (medians)")
    print("| path | writes/s | write p50 | loop stall max | loop stall p99 | 1 ms ticks/s of another task |")
    print("|---|---|---|---|---|---|")
    for inline, name in ((True, "inline on the loop (before; baseline)"), (False, "worker thread (now)")):
        print(f"| {name} | {med(inline, 'ops'):,.0f} ({med(inline, 'ops') / med(True, 'ops'):.2f}×) "
              f"| {med(inline, 'p50') * 1e3:.3f} ms | {med(inline, 'stall_max') * 1e3:.1f} ms "
              f"| {med(inline, 'stall_p99') * 1e3:.2f} ms | {med(inline, 'ticks'):,.0f} |")
    print(f"\n{args.reads} cached 4 KiB reads of the writable layer through the device, {args.repeat} rounds (medians)")
    print("| path | reads/s | vs os.pread |")
    print("|---|---|---|")
    for name, value in (("os.pread (floor)", floor), ("inline, RWF_NOWAIT (now)", nowait),
                        ("worker thread", threaded)):
        print(f"| {name} | {value:,.0f} | {value / floor:.2f}× |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/var/tmp/lazyfs-bench-offload")
    parser.add_argument("--writes", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    trio.run(main, parser.parse_args())
