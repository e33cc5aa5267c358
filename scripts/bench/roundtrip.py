#!/usr/bin/env python3
"""Where a warm 4 KiB read's time goes, hop by hop (issue 14: the buffered route, page cache dropped).

The FUSE threads answer a READ of a flat-file block in C in 5-15 us of daemon CPU, yet a read
through the buffered loop with the page cache dropped takes several times a local one. This
benchmark takes that read apart. One image with a
--size MiB file (half random, half hex text), pushed to a local docker-registry and mounted with
`lazyfs mount` (default config: buffered loop), its device read once so every block is in the flat
cache. Then fio, random 4 KiB reads, **queue depth 1** (psync), each target for --seconds, the page
cache dropped before each job:

* ``disk``: the raw ext4 image file on the same disk, O_DIRECT: one disk read;
* ``flat``: the image's flat cache file (what the daemon preads), O_DIRECT: the same;
* ``fuse-hot``: the FUSE-exported disk.img, O_DIRECT (every read is a FUSE READ), with the flat
  file read into the page cache first: one FUSE round trip plus the daemon's work, no disk;
* ``fuse``: the same with nothing cached: a FUSE round trip plus a disk read;
* ``fuse-buffered``: disk.img read buffered (no O_DIRECT), nothing cached: as the loop reads it;
* ``loop-local``: a local buffered loop device on the raw image (losetup's default), O_DIRECT on
  the device: a loop hop plus a disk read;
* ``loop-lazyfs``: the lazyfs mount's buffered loop device, O_DIRECT on the device: a loop hop, a
  FUSE round trip and a disk read.

Each job stops after --seconds, so it measures the latency of the reads it made: a pass cut short
is no throughput ratio between targets (`warm.py` compares whole passes). The hop costs printed
are differences of mean completion latencies in the same run.

--wake-here: if this kernel has the fuse module parameter ``wake_here``, every FUSE target is run
again with it set (the old value is put back on exit). It is a host-wide kernel setting, so lazyfs
never changes it; this only measures what it would change.

Usage: scripts/bench/roundtrip.py [--workdir DIR (on the disk to measure)] [--size MiB] [--seconds N]
                                  [--wake-here] [--json OUT]
Needs root. Everything it starts (registry, daemon, FUSE, loop devices, mounts) is removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import drop_caches, finish_run, run_header  # noqa: E402
from mount import Lazyfs, loop_mount, run  # noqa: E402
from warm import bigfile_image  # noqa: E402

WAKE_HERE = "/sys/module/fuse/parameters/wake_here"
FUSE_TARGETS = ("fuse-hot", "fuse", "fuse-buffered", "loop-lazyfs")


def fio(path: str, seconds: int, direct: bool) -> dict:
    """Random 4 KiB reads of *path*, one at a time, for at most *seconds*, each block at most once."""
    out = run(["fio", "--name=rt", f"--filename={path}", "--rw=randread", "--bs=4k", f"--direct={int(direct)}",
               "--ioengine=psync", "--readonly", f"--io_size={os.path.getsize(path) if os.path.isfile(path) else 256 << 20}",
               f"--runtime={seconds}", "--output-format=json"], timeout=seconds + 120).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"iops": round(job["iops"]), "mean_us": round(job["clat_ns"]["mean"] / 1000, 1)}


def warm_file(path: str) -> None:
    run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "status=none"])


def measure(targets: dict[str, tuple[str, bool]], names, seconds: int, hot: str) -> dict:
    out = {}
    for name in names:
        path, direct = targets[name]
        drop_caches()
        if name == "fuse-hot":
            warm_file(hot)
        out[name] = fio(path, seconds, direct)
        print(f"  {name:14s} {out[name]['iops']:8d} IOPS  {out[name]['mean_us']:7.1f} us per read", flush=True)
    return out


def hops(r: dict) -> dict:
    """Per-hop costs (us), as differences of mean latencies measured in the same run."""
    h = {"disk read": r["disk"]["mean_us"],
         "FUSE round trip, daemon work included (fuse-hot)": r["fuse-hot"]["mean_us"],
         "loop hop (loop-local - disk)": round(r["loop-local"]["mean_us"] - r["disk"]["mean_us"], 1),
         "lazyfs loop over FUSE buffered read (loop-lazyfs - fuse-buffered)":
             round(r["loop-lazyfs"]["mean_us"] - r["fuse-buffered"]["mean_us"], 1)}
    for k, v in h.items():
        print(f"  {k:70s} {v:7.1f} us", flush=True)
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/var/tmp", help="on the disk to measure (not tmpfs)")
    ap.add_argument("--size", type=int, default=512, help="MiB in the big file")
    ap.add_argument("--seconds", type=int, default=5, help="runtime of each fio job")
    ap.add_argument("--wake-here", action="store_true", help="run the FUSE targets again with fuse.wake_here=Y")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("roundtrip.py needs root (FUSE, loop devices, mounts)")
    work = tempfile.mkdtemp(prefix="lazyfs-bench-rt-", dir=args.workdir)
    results: dict = {**run_header(), "size_mib": args.size, "seconds": args.seconds}
    with contextlib.ExitStack() as stack:
        raw, ref, registry = bigfile_image(stack, work, args.size, "roundtrip")
        host = Lazyfs(os.path.join(work, "lazyfs"), registry, trace_record_seconds=0,
                      hydrated_check_interval=3600)
        stack.callback(host.close)
        mounted = host.mount(ref, os.path.join(work, "lazyfs", "mnt"))
        assert mounted["loop_route"] == "buffered", mounted
        run(["dd", f"if={mounted['loop']}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"])
        flats = glob.glob(os.path.join(work, "lazyfs", "**", "flat", "*.data"), recursive=True)
        flat = max(flats, key=os.path.getsize)
        local = stack.enter_context(loop_mount(raw, os.path.join(work, "mnt-local"), False))
        targets = {"disk": (raw, True), "flat": (flat, True), "fuse-hot": (mounted["path"], True),
                   "fuse": (mounted["path"], True), "fuse-buffered": (mounted["path"], False),
                   "loop-local": (local, True), "loop-lazyfs": (mounted["loop"], True)}
        print(f"random 4 KiB reads, queue depth 1 (psync), page cache dropped, {args.seconds} s each", flush=True)
        qd1 = results["qd1"] = measure(targets, targets, args.seconds, flat)
        results["hops_us"] = hops(qd1)
        if args.wake_here:
            if not os.path.exists(WAKE_HERE):
                print("--wake-here: this kernel's fuse has no wake_here parameter; not run", flush=True)
            else:
                with open(WAKE_HERE) as f:
                    old = f.read().strip()
                stack.callback(lambda: open(WAKE_HERE, "w").write(old))
                with open(WAKE_HERE, "w") as f:
                    f.write("Y")
                print("the same FUSE targets with fuse.wake_here=Y (depth 1)", flush=True)
                results["wake_here"] = measure(targets, FUSE_TARGETS, args.seconds, flat)
    finish_run(results, args.json)


if __name__ == "__main__":
    main()
