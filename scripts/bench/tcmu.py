#!/usr/bin/env python3
"""TCMU front end throughput through the emulated kernel ring, against a MemorySource.

Measures 4 KiB random reads (IOPS) and 1 MiB sequential reads (MB/s) issued by
many concurrent "initiator" tasks, each command going through the full path:
emulated kernel queues the entry -> handler parses it -> SCSI decode -> source
read -> scatter into the data area -> completion -> emulated kernel gathers.
Both sides run in this one Python process, so the figures are a floor for the
handler's cost per command, not what a real kernel would see.

    python3 scripts/bench/tcmu.py [--seconds 8] [--size-mib 256] [--depth 32]
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time

import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from lazyfs.testing.memory import MemorySource  # noqa: E402
from lazyfs.testing.tcmu_kernel import serve_emulated  # noqa: E402

BLOCK = 512


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


async def run_load(emu, size: int, io_bytes: int, sequential: bool, seconds: float, depth: int) -> tuple[int, float]:
    """Issue reads of *io_bytes* for *seconds* with *depth* in flight; returns (commands, elapsed)."""
    blocks = io_bytes // BLOCK
    slots = size // io_bytes
    done = 0
    cursor = 0
    deadline = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        nonlocal done, cursor
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            if sequential:
                slot, cursor = cursor, (cursor + 1) % slots
            else:
                slot = rng.randrange(slots)
            c = await emu.submit(read16(slot * blocks, blocks))
            if c.status != 0 or len(c.data_in) != io_bytes:
                raise RuntimeError(f"read failed: {c}")
            done += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(depth):
            nursery.start_soon(worker, i)
    return done, time.perf_counter() - start


async def main(args: argparse.Namespace) -> None:
    size = args.size_mib << 20
    src = MemorySource(os.urandom(size))
    results = []
    with trio.fail_after(args.seconds * 4 + 30):
        async with serve_emulated(src, data_size=128 << 20, max_inflight=args.depth) as (emu, handler):
            for label, io_bytes, sequential in (("4 KiB random read", 4096, False),
                                                ("1 MiB sequential read", 1 << 20, True)):
                n, elapsed = await run_load(emu, size, io_bytes, sequential, args.seconds, args.depth)
                results.append((label, n / elapsed, n * io_bytes / elapsed / 1e6, n))
            stats = handler.statistics()
    print(f"TCMU emulated ring, MemorySource {args.size_mib} MiB, queue depth {args.depth}, "
          f"{args.seconds:.0f} s per test")
    for label, iops, mbps, n in results:
        print(f"  {label:24s} {iops:10.0f} IOPS {mbps:10.1f} MB/s  ({n} commands)")
    print(f"  handler: {stats['completed']} commands, {stats['notifies']} notifications, "
          f"{stats['events']} events")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each test")
    parser.add_argument("--size-mib", type=int, default=256, help="device size")
    parser.add_argument("--depth", type=int, default=32, help="commands in flight")
    trio.run(main, parser.parse_args())
