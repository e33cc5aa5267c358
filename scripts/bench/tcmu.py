#!/usr/bin/env python3
"""TCMU front end throughput through the emulated kernel ring, against a MemorySource.

Measures 4 KiB random reads (IOPS) and 1 MiB sequential reads (MB/s) issued by
many concurrent "initiator" tasks, each command going through the full path:
emulated kernel queues the entry -> handler parses it -> SCSI decode -> source
read -> scatter into the data area -> completion -> emulated kernel gathers.
Both sides run in this one Python process, so the figures are a floor for the
handler's cost per command, not what a real kernel would see.

    python3 scripts/bench/tcmu.py [--seconds 8] [--size-mib 256] [--depth 32]
    python3 scripts/bench/tcmu.py --in-place [--rounds 3]   # reads into the data area vs read + copy
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import subprocess
import sys
import time

import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from lazyfs.device.source import BlockSource  # noqa: E402
from tests.support.memory import MemorySource  # noqa: E402
from tests.support.tcmu_kernel import serve_emulated  # noqa: E402

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


def fuse_load(path: str, size: int, io_bytes: int, sequential: bool, seconds: float, depth: int) -> tuple[int, float]:
    """The same load with pread(O_DIRECT) on the FUSE-exported file, *depth* threads."""
    import concurrent.futures
    import mmap

    slots = size // io_bytes
    deadline = time.perf_counter() + seconds
    counts = [0] * depth
    cursor = [0]

    def worker(i: int) -> None:
        rng = random.Random(i)
        buf = mmap.mmap(-1, io_bytes)  # page-aligned, as O_DIRECT needs
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            while time.perf_counter() < deadline:
                if sequential:
                    slot = cursor[0] = (cursor[0] + 1) % slots
                else:
                    slot = rng.randrange(slots)
                if os.preadv(fd, [buf], slot * io_bytes) != io_bytes:
                    raise RuntimeError("short read")
                counts[i] += 1
        finally:
            os.close(fd)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(depth) as pool:
        list(pool.map(worker, range(depth)))
    return sum(counts), time.perf_counter() - start


async def bench_image(work: str, size: int):
    """A lazyfs image in *work* (half incompressible, half text: chunks that really decompress) and a
    Config whose directories are all under *work*; returns ``(ref, config)``."""
    from lazyfs.config import Config
    from lazyfs.image.local import create_image
    from lazyfs.image.ref import LocalRef

    raw = os.path.join(work, "disk.raw")
    with open(raw, "wb") as f:
        for i in range(size // (2 << 20)):
            text = (b"lazyfs block %08d " % i) * ((1 << 20) // 22)
            f.write(os.urandom(1 << 20) + text + bytes((1 << 20) - len(text)))
        f.truncate(size)
    ref = LocalRef(os.path.join(work, "layout"), "bench")
    await create_image(ref, from_file=raw)
    config = Config(cache_root=os.path.join(work, "cache"), writable_root=os.path.join(work, "w"),
                    run_dir=os.path.join(work, "run"), state_dir=os.path.join(work, "state"), trace_record_seconds=0,
                    readahead_chunks=0)
    return ref, config


async def compare_with_fuse(args: argparse.Namespace) -> None:
    """Ring vs FUSE file on the same lazyfs image, cache warm for both."""
    import json
    import tempfile

    from lazyfs.serve.control import call
    from lazyfs.serve.host import Host

    size = args.size_mib << 20
    work = tempfile.mkdtemp(prefix="lazyfs-bench-tcmu-", dir="/var/tmp")
    ref, config = await bench_image(work, size)
    loads = (("4 KiB random read", 4096, False), ("1 MiB sequential read", 1 << 20, True))
    rows = {}
    async with Host.open(config) as host:
        att = await host.attach(str(ref))
        for off in range(0, size, 4 << 20):  # warm the chunk cache
            await att.device.read(off, 4 << 20)
        async with serve_emulated(att.device, data_size=128 << 20, max_inflight=args.depth) as (emu, handler):
            for label, io_bytes, sequential in loads:
                n, elapsed = await run_load(emu, size, io_bytes, sequential, args.seconds, args.depth)
                rows[label] = [n / elapsed]
    cfg = os.path.join(work, "config.json")
    with open(cfg, "w") as f:
        json.dump({k: v for k, v in config.to_json().items() if k in ("cache_root", "writable_root", "run_dir",
                   "state_dir", "trace_record_seconds", "readahead_chunks")}, f)
    lazyfs = [sys.executable, "-m", "lazyfs.cli"]
    export = os.path.join(work, "export")
    subprocess.run(lazyfs + ["export", f"oci:{ref.path}:{ref.tag}", export, "--config", cfg], check=True)
    try:
        disk = os.path.join(export, "disk.img")
        with open(disk, "rb") as f:  # warm
            while f.read(4 << 20):
                pass
        for label, io_bytes, sequential in loads:
            n, elapsed = await trio.to_thread.run_sync(fuse_load, disk, size, io_bytes, sequential, args.seconds,
                                                       min(args.depth, 8))
            rows[label].append(n / elapsed)
    finally:
        subprocess.run(lazyfs + ["umount", export, "--config", cfg])
        call(os.path.join(work, "run", "lazyfs.sock"), "stop")
        subprocess.run(["rm", "-rf", work])
    print(f"same lazyfs image ({args.size_mib} MiB, chunk cache warm), queue depth {args.depth} (FUSE: 8 threads)")
    print(f"  {'load':24s} {'TCMU ring IOPS':>15s} {'FUSE file IOPS':>15s} {'ring/FUSE':>10s}")
    for label, (ring, fuse) in rows.items():
        io = 4096 if "4 KiB" in label else 1 << 20
        print(f"  {label:24s} {ring:15.0f} {fuse:15.0f} {ring / fuse:10.2f}   "
              f"({ring * io / 1e6:.0f} vs {fuse * io / 1e6:.0f} MB/s)")


class CopyingSource(BlockSource):
    """The device behind the ring without its in-place ``read_into``: read, then copy (the old path)."""

    def __init__(self, inner: BlockSource) -> None:
        self.inner, self.size, self.read_only = inner, inner.size, inner.read_only

    async def read(self, offset: int, length: int):
        return await self.inner.read(offset, length)


async def compare_in_place(args: argparse.Namespace) -> None:
    """One lazyfs image (flat files warm) through the ring: reads into the data area vs read + copy."""
    import statistics
    import tempfile

    from lazyfs.serve.host import Host

    size = args.size_mib << 20
    work = tempfile.mkdtemp(prefix="lazyfs-bench-tcmu-", dir="/var/tmp")
    try:
        ref, config = await bench_image(work, size)
        loads = (("4 KiB random read", 4096, False), ("1 MiB sequential read", 1 << 20, True))
        rows: dict[tuple[str, str], list[float]] = {}
        async with Host.open(config) as host:
            att = await host.attach(str(ref))
            for off in range(0, size, 4 << 20):  # every block into the flat files
                await att.device.read(off, 4 << 20)
            for _ in range(args.rounds):  # interleaved, so load on the machine hits both alike
                for mode, src in (("read + copy", CopyingSource(att.device)), ("in place", att.device)):
                    before = att.device.inplace_reads
                    async with serve_emulated(src, data_size=128 << 20, max_inflight=args.depth,
                                              scatter=False) as (emu, _):
                        for label, io_bytes, sequential in loads:
                            n, elapsed = await run_load(emu, size, io_bytes, sequential, args.seconds, args.depth)
                            rows.setdefault((label, mode), []).append(n / elapsed)
                    assert (att.device.inplace_reads > before) == (mode == "in place")
    finally:
        subprocess.run(["rm", "-rf", work])
    print(f"same lazyfs image ({args.size_mib} MiB, flat files warm) through the emulated ring, queue depth "
          f"{args.depth}, {args.rounds} interleaved rounds of {args.seconds:.0f} s, median IOPS; load average "
          f"{os.getloadavg()[0]:.1f}")
    for label, _, _ in loads:
        copy, inplace = statistics.median(rows[(label, "read + copy")]), statistics.median(rows[(label, "in place")])
        print(f"  {label:24s} read + copy {copy:9.0f}   in place {inplace:9.0f}   in place / copy {inplace / copy:5.2f}")


async def main(args: argparse.Namespace) -> None:
    if args.compare_fuse:
        await compare_with_fuse(args)
        return
    if args.in_place:
        await compare_in_place(args)
        return
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
    parser.add_argument("--compare-fuse", action="store_true",
                        help="a lazyfs image through the ring vs the same image's FUSE-exported file")
    parser.add_argument("--in-place", action="store_true",
                        help="a lazyfs image through the ring: reads into the data area vs read + copy")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (--in-place)")
    trio.run(main, parser.parse_args())
