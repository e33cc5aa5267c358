#!/usr/bin/env python3
"""Warm reads served by the kernel (issue 14 item 3): lazyfs mounts vs a local loop file, one run.

One ext4 image with a --size file (half random, half hex-text MiBs) lives on the disk (not
tmpfs: the page-cache-dropped jobs must read a disk), pushed to a local docker-registry.
fio (libaio, iodepth 16, --direct=1 so ext4's own page cache is bypassed and every read
goes through the loop device) runs sequential 1 MiB and random 4 KiB reads for --seconds
on each target:

* ``local-buffered``: the image file on a loop device attached buffered (losetup's default);
* ``local-direct``: the image file on a loop device attached with direct I/O;
* ``lazyfs-buffered``: ``lazyfs mount`` with the default config (read-only image: buffered
  loop on the FUSE-exported disk.img, keep_cache), the file read once with dd first;
* ``lazyfs-direct``: ``lazyfs mount`` on a second daemon with ``read_only_loop = "direct"``
  (every read reaches the daemon; its FUSE worker threads answer from the flat files, in C),
  the whole device read once first;
* ``lazyfs-hydrated``: after ``hydrate-file``, a second ``lazyfs mount`` of the same image
  (loop with direct I/O on cache_root/hydrated/<manifest>.img; no FUSE).

Two passes: **hot** (each target's file read once just before its jobs; time-based jobs) and
**dropped** (``drop_caches`` before each job, and each job reads every block of the file exactly
once: otherwise a buffered loop's job would be hot after its first pass). A dropped job is the
whole pass, however long it takes (at most --pass-limit s): a pass cut off after --seconds would
compare unlike jobs, since a buffered loop's pass gets faster as its backing file's cache fills
with what was read ahead, and the faster target would reach that part and the slower one not.
Ratios printed against the local loop file measured in
the same run: buffered routes vs ``local-buffered``, the direct and hydrated routes vs
``local-direct`` (the same kind of loop). Goals (issue 14): hot rand ≥ 0.5×, hot seq ≥ 0.8×, dropped ≥ 0.5×.

For the two FUSE targets each job also prints how many READs reached the daemon (``fuse-stats``).
The dropped pass adds, on the two buffered routes, a sparse random job: one 4 KiB block in 16, at
random over the whole file, and the page cache the loop's backing file holds after it (what local
readahead, docs/warm.md §4, costs a sparse reader in memory).

Memory (double caching): after ``drop_caches``, the file is read once through ext4 (``cat``);
``fincore`` then gives the page cache held by the ext4 file and by the loop's backing file,
and /proc/meminfo ``Cached`` the host-wide growth (noisy: other jobs share the machine).

Usage: scripts/bench/warm.py [--workdir DIR (on the disk to measure)] [--size MiB] [--seconds N]
                             [--pass-limit N] [--set KEY=JSON ...] [--json OUT]
Needs root. Everything it starts (registry, daemon, FUSE, loop devices, mounts) is removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import drop_caches, finish_run, parse_settings, push_tree_image, run_header  # noqa: E402
from mount import Lazyfs, loop_mount, run, write_bigfile  # noqa: E402
from lazyfs.serve import system  # noqa: E402
from lazyfs.serve.control import call  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402

JOBS = (("seq", "read", "1M"), ("rand", "randread", "4k"))
SPARSE = 16  # the sparse dropped job reads one block in this many, at random over the whole file


def fio(path: str, rw: str, bs: str, seconds: int, one_pass: bool, fraction: int = 1) -> dict:
    """One fio job on *path*. *one_pass*: read each block exactly once (random order without
    repeats for randread), for at most *seconds*: a page-cache-dropped job must not turn into a
    hot one after its first pass; with *fraction* > 1 only that share of the blocks, spread over
    the whole file. Otherwise time-based, for *seconds*."""
    timing = ([f"--io_size={os.path.getsize(path) // fraction}", f"--runtime={seconds}"] if one_pass
              else ["--time_based", f"--runtime={seconds}"])
    out = run(["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
               "--ioengine=libaio", "--iodepth=16", "--readonly", *timing, "--output-format=json"],
              timeout=seconds + 120).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"MBps": job["bw_bytes"] / 1e6, "iops": job["iops"], "bytes": job["io_bytes"]}


def backing_of(dev: str) -> str:
    with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as f:
        return f.read().strip()


def read_once(path: str) -> None:
    run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "status=none"])


def cached_bytes(path: str) -> int:
    out = run(["fincore", "--bytes", "--noheadings", "--output", "RES", path]).stdout.split()
    return int(out[0]) if out else 0


def meminfo_cached() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_cost(name: str, file: str, dev: str) -> dict:
    """Page cache held after one buffered read of *file* through ext4: by the ext4 file and by
    the loop device's backing file (a second copy if the loop is buffered)."""
    drop_caches()
    before = meminfo_cached()
    read_once_via_cat(file)
    out = {"ext4_file": cached_bytes(file), "loop_backing_file": cached_bytes(backing_of(dev)),
           "meminfo_cached_growth": meminfo_cached() - before}
    print(f"  {name:16s} ext4 file {out['ext4_file'] / 2**20:7.0f} MiB cached, loop backing file "
          f"{out['loop_backing_file'] / 2**20:7.0f} MiB, /proc/meminfo Cached +{out['meminfo_cached_growth'] / 2**20:.0f} MiB",
          flush=True)
    return out


def read_once_via_cat(path: str) -> None:
    with open(path, "rb") as f:  # buffered reads through ext4's page cache, as a container reads
        while f.read(1 << 20):
            pass


def bigfile_image(stack: contextlib.ExitStack, work: str, size_mib: int, name: str):
    """An ext4 with one *size_mib* MiB file (half random, half hex text) in the new directory
    *work* (removed on exit), pushed as a lazyfs image to a local registry started for it:
    ``(the raw ext4 file, the image reference, the running registry)``."""
    stack.callback(shutil.rmtree, work, True)
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    write_bigfile(os.path.join(tree, "bigfile"), size_mib << 20)
    reg = stack.enter_context(running_registry(os.path.join(work, "registry")))
    raw, ref = push_tree_image(tree, work, reg.registry, name)
    return raw, ref, reg.registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/var/tmp", help="on the disk to measure (not tmpfs)")
    ap.add_argument("--size", type=int, default=1024, help="MiB in the big file")
    ap.add_argument("--seconds", type=int, default=10, help="runtime of each hot fio job")
    ap.add_argument("--pass-limit", type=int, default=900, help="longest a dropped job's whole pass may take, s")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="a config setting for both daemons, e.g. export_readahead=1048576")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    settings = parse_settings(args.set)
    if os.geteuid() != 0:
        raise SystemExit("warm.py needs root (FUSE, loop devices, mounts)")
    work = tempfile.mkdtemp(prefix="lazyfs-bench-warm-", dir=args.workdir)
    results: dict = {**run_header(), "size_mib": args.size, "seconds": args.seconds, "settings": settings}
    with contextlib.ExitStack() as stack:
        raw, ref, reg = bigfile_image(stack, work, args.size, "warm")
        # a long check interval: the benchmark asks for the hydrated file when it wants it
        host = Lazyfs(os.path.join(work, "lazyfs"), reg, trace_record_seconds=0,
                      hydrated_check_interval=3600, **settings)
        stack.callback(host.close)
        buffered_mnt = os.path.join(work, "lazyfs", "mnt-buffered")
        mounted = host.mount(ref, buffered_mnt)
        assert mounted["loop_route"] == "buffered", mounted
        # fetch every chunk (fills the disk cache): the whole device, not only the file
        run(["dd", f"if={mounted['loop']}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"])
        built = call(host.socket, "hydrate-file", name=mounted["name"], timeout=600)
        assert built["path"], built
        hydrated_mnt = os.path.join(work, "lazyfs", "mnt-hydrated")
        mounted_h = host.mount(ref, hydrated_mnt)
        assert mounted_h["loop_route"] == "hydrated", mounted_h
        # the same image on a daemon of its own whose read-only loop uses direct I/O: every read of the
        # device reaches the daemon (async O_DIRECT reads of disk.img, in parallel), none is cached by
        # the kernel, and its worker threads answer them from the flat files (in C: docs/warm.md §4)
        host_d = Lazyfs(os.path.join(work, "lazyfs-d"), reg, trace_record_seconds=0, read_only_loop="direct",
                        **settings)
        stack.callback(host_d.close)
        direct_mnt = os.path.join(work, "lazyfs-d", "mnt")
        mounted_d = host_d.mount(ref, direct_mnt)
        assert mounted_d["loop_route"] == "direct", mounted_d
        run(["dd", f"if={mounted_d['loop']}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"])
        targets = {"local-buffered": (stack.enter_context(loop_mount(raw, os.path.join(work, "mnt-lb"), False)),
                                      os.path.join(work, "mnt-lb", "bigfile")),
                   "local-direct": (stack.enter_context(loop_mount(raw, os.path.join(work, "mnt-ld"), True)),
                                    os.path.join(work, "mnt-ld", "bigfile")),
                   "lazyfs-buffered": (mounted["loop"], os.path.join(buffered_mnt, "bigfile")),
                   "lazyfs-direct": (mounted_d["loop"], os.path.join(direct_mnt, "bigfile")),
                   "lazyfs-hydrated": (mounted_h["loop"], os.path.join(hydrated_mnt, "bigfile"))}
        sockets = {"lazyfs-buffered": host.socket, "lazyfs-direct": host_d.socket}
        peers = {"local-buffered": "local-buffered", "local-direct": "local-direct",
                 "lazyfs-buffered": "local-buffered", "lazyfs-direct": "local-direct", "lazyfs-hydrated": "local-direct"}
        for name, (dev, _) in targets.items():
            print(f"{name:16s} {dev}: backing {backing_of(dev)}, direct I/O {system.loop_direct_io(dev)}", flush=True)
        for mode in ("hot", "dropped"):
            dropped = mode == "dropped"
            print(f"\n{mode}: fio --direct=1 --ioengine=libaio --iodepth=16, "
                  f"{'one whole pass' if dropped else f'{args.seconds} s'} per job", flush=True)
            out = results[mode] = {}
            for name, (dev, path) in targets.items():
                out[name] = {}
                if mode == "hot":
                    drop_caches()  # nobody else's pages: each target warms its own
                    read_once(path)
                    # fio --direct=1 reads through the loop: warm the loop's backing file too
                    run(["dd", f"if={dev}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"])
                for kind, rw, bs in JOBS:
                    if dropped:
                        drop_caches()
                    sock = sockets.get(name)
                    before = call(sock, "fuse-stats")["reads"] if sock else 0
                    job = out[name][kind] = fio(path, rw, bs, args.pass_limit if dropped else args.seconds,
                                                one_pass=dropped)
                    if sock:  # how many of the job's reads reached the daemon
                        job["fuse_reads"] = call(sock, "fuse-stats")["reads"] - before
                    print(f"  {name:16s} {kind:4s} {job['MBps']:9.1f} MB/s {job['iops']:10.0f} IOPS"
                          + (f" {job['fuse_reads']:10d} FUSE READs" if sock else ""), flush=True)
                if dropped and name in ("local-buffered", "lazyfs-buffered"):
                    # what a sparse reader costs in memory: the loop's backing file cached after it
                    drop_caches()
                    sock = sockets.get(name)
                    before = call(sock, "fuse-stats")["reads"] if sock else 0
                    job = out[name]["sparse"] = fio(path, "randread", "4k", args.pass_limit, True, SPARSE)
                    job["backing_cached"] = cached_bytes(backing_of(dev))
                    if sock:
                        job["fuse_reads"] = call(sock, "fuse-stats")["reads"] - before
                    print(f"  {name:16s} rand 1/{SPARSE} of the blocks {job['MBps']:9.1f} MB/s {job['iops']:10.0f} IOPS, "
                          f"read {job['bytes'] / 2**20:.0f} MiB, loop backing file {job['backing_cached'] / 2**20:.0f} MiB "
                          "cached after" + (f", {job['fuse_reads']} FUSE READs" if sock else ""), flush=True)
            for name, peer in peers.items():
                if name == peer:
                    continue
                ratios = {kind: out[name][kind]["MBps"] / out[peer][kind]["MBps"] for kind, _, _ in JOBS}
                if "sparse" in out[name] and "sparse" in out[peer]:
                    ratios["sparse"] = out[name]["sparse"]["MBps"] / out[peer]["sparse"]["MBps"]
                out[f"{name}_vs_{peer}"] = ratios
                print(f"  {name} / {peer}: seq {ratios['seq']:.2f}x, rand {ratios['rand']:.2f}x"
                      + (f", rand 1/{SPARSE} {ratios['sparse']:.2f}x" if "sparse" in ratios else ""), flush=True)
        print("\nmemory: page cache after one buffered read of the file through ext4", flush=True)
        results["memory"] = {name: memory_cost(name, path, dev) for name, (dev, path) in targets.items()}
    finish_run(results, args.json)


if __name__ == "__main__":
    main()
