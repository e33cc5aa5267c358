#!/usr/bin/env python3
"""Benchmark warm reads from the disk cache with the page cache dropped (issue 14 goal 2).

A file (half random MiBs, half hex text) in an ext4 image, on the host's disk:
fio sequential 1 MiB and random 4 KiB reads (``--direct=1``, libaio, iodepth 16,
--seconds each), the page cache dropped before every job, on

* local: the same ext4 file on a loop device, attached as `lazyfs mount` attaches
  its file (read-only, direct I/O where accepted), on the same disk (the baseline);
* lazyfs-flat: `lazyfs mount` of the image (flat layer files on, ``fuse_threads = 0``: the trio thread),
  the cache on the same disk, filled by one `dd` of the file before the jobs;
* lazyfs-threads: the same with ``fuse_threads = --threads``: worker threads read the FUSE
  connection and answer reads of blocks in the flat files themselves;
* lazyfs-thr-direct (``--direct-loop``): lazyfs-threads with ``read_only_loop = "direct"``;
* lazyfs-chunks (``--chunks``): the same with ``flat_cache_size = 0``: the chunk-file disk tier
  only (what lazyfs did before the flat files);
* ``-py`` (``--python-too``): each threads target again with ``fuse_native_reads = false``: the
  threads answer in Python, not in C (``lazyfs/serve/fusekernel/native/fastread.c``).

The jobs are interleaved: each round runs every job on every target in turn (so load from other
jobs on the machine falls on all of them alike). Prints each target's MB/s and IOPS, the ratio to
local measured in the same round, and the load average.

Usage: scripts/bench/warm_disk.py [--workdir DIR] [--seconds 10] [--size-mib 1024] [--threads 4] [--rounds 2]
                                  [--direct-loop] [--python-too] [--chunks] [--json FILE]
Needs root. Everything it starts (registry, daemons, FUSE, loop devices, mounts) is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import drop_caches  # noqa: E402
from mount import Lazyfs, fio, loop_mount, run  # noqa: E402
from lazyfs.image.local import mkfs_from_dir  # noqa: E402
from lazyfs.serve import system  # noqa: E402
from lazyfs.serve.control import call  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402


def write_file(path: str, mib: int) -> None:
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(os.urandom(1 << 20) if i % 2 == 0 else os.urandom(1 << 19).hex().encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="on the disk to measure (default: under /var/tmp)")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=4, help="fuse_threads of the lazyfs-threads target")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--direct-loop", action="store_true",
                    help="also lazyfs-thr-direct: the threads with read_only_loop = direct (async O_DIRECT reads of the "
                         "FUSE file, so READs reach the daemon in parallel; the default buffered loop reads one at a time)")
    ap.add_argument("--chunks", action="store_true", help="also measure the chunk-file tier (flat_cache_size 0)")
    ap.add_argument("--python-too", action="store_true",
                    help="also each threads target with fuse_native_reads = false (-py): the threads answer in Python")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices, FUSE, drop_caches)")
    work = args.workdir or tempfile.mkdtemp(prefix="lazyfs-warm-disk-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    cli = [sys.executable, "-m", "lazyfs.cli"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    results: dict = {"seconds": args.seconds, "size_mib": args.size_mib, "loadavg_start": os.getloadavg(),
                     "rounds": []}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        reg = stack.enter_context(running_registry(os.path.join(work, "registry")))
        tree = os.path.join(work, "tree")
        os.makedirs(tree)
        write_file(os.path.join(tree, "bigfile"), args.size_mib)
        raw = os.path.join(work, "fio.ext4")
        mkfs_from_dir(tree, raw)
        shutil.rmtree(tree)
        layout = os.path.join(work, "layout")
        run([*cli, "create", f"oci:{layout}:fio", "--from-file", raw], env=env, cwd=ROOT)
        run([*cli, "push", f"oci:{layout}:fio", f"{reg.registry}/bench/fio:v1", "--plain-http", reg.registry],
            env=env, cwd=ROOT)
        targets = {}
        configs = [("lazyfs-flat", {"fuse_threads": 0}), ("lazyfs-threads", {"fuse_threads": args.threads})]
        if args.direct_loop:
            configs.append(("lazyfs-thr-direct", {"fuse_threads": args.threads, "read_only_loop": "direct"}))
        if args.python_too:
            configs += [(f"{name}-py", {**extra, "fuse_native_reads": False})
                        for name, extra in configs if extra.get("fuse_threads")]
        if args.chunks:
            configs.append(("lazyfs-chunks", {"flat_cache_size": 0}))
        for name, extra in configs:
            host = Lazyfs(os.path.join(work, name), reg.registry, trace_record_seconds=0, **extra)
            stack.callback(_close, host)
            mnt = os.path.join(work, name, "mnt")
            mounted = host.mount(f"{reg.registry}/bench/fio:v1", mnt)
            run(["dd", f"if={os.path.join(mnt, 'bigfile')}", "of=/dev/null", "bs=4M"])  # fill the cache
            targets[name] = (os.path.join(mnt, "bigfile"), mounted["loop"], host)
        local_dev = stack.enter_context(loop_mount(raw, os.path.join(work, "local-mnt")))
        targets = {"local": (os.path.join(work, "local-mnt", "bigfile"), local_dev, None), **targets}
        print(f"warm reads from disk, page cache dropped before each job; fio {args.seconds} s, iodepth 16, "
              f"--direct=1, {args.size_mib} MiB file, fuse_threads={args.threads}", flush=True)
        for name, (path, dev, _) in targets.items():
            results[name] = {"loop_direct_io": system.loop_direct_io(dev)}
        for r in range(args.rounds):
            out: dict = {"loadavg": os.getloadavg()}
            for kind, rw, bs in (("seq", "read", "1M"), ("rand", "randread", "4k")):
                for name, (path, _, host) in targets.items():
                    drop_caches()
                    pid = host.pid() if host is not None else None
                    cpu, fuse = _cpu_seconds(pid), _fuse_reads(host)
                    job = out.setdefault(name, {})[kind] = fio(path, rw, bs, args.seconds)
                    ios = job["iops"] * args.seconds
                    extra = ""
                    if pid is not None and ios:
                        job["daemon_cpu_us_per_io"] = (_cpu_seconds(pid) - cpu) / ios * 1e6
                        reads, nbytes = (a - b for a, b in zip(_fuse_reads(host), fuse))
                        job["daemon_reads_per_io"] = reads / ios
                        job["daemon_kib_per_read"] = nbytes / max(reads, 1) / 1024
                        extra = (f"  daemon: {job['daemon_cpu_us_per_io']:5.1f} us CPU, "
                                 f"{job['daemon_reads_per_io']:.2f} READs of {job['daemon_kib_per_read']:.0f} KiB per IO")
                    print(f"  round {r + 1} {name:14s} {kind:4s} {job['MBps']:9.1f} MB/s {job['iops']:10.0f} IOPS{extra}",
                          flush=True)
            for name in targets:
                if name != "local":
                    for kind in ("seq", "rand"):
                        out[f"{kind}_{name}_vs_local"] = out[name][kind]["MBps"] / out["local"][kind]["MBps"]
                    print(f"  round {r + 1} {name} / local: seq {out[f'seq_{name}_vs_local']:.2f}x, "
                          f"rand {out[f'rand_{name}_vs_local']:.2f}x", flush=True)
            out["loadavg_end"] = os.getloadavg()
            print(f"  round {r + 1} load average {out['loadavg'][0]:.1f} -> {out['loadavg_end'][0]:.1f}", flush=True)
            results["rounds"].append(out)
        for name, (_, _, host) in targets.items():
            if host is not None:
                results[name]["stats"] = host.stats(os.path.join(work, name, "mnt"))
                fuse = results[name]["fuse_stats"] = call(host.socket, "fuse-stats", timeout=30)
                print(f"  {name}: READs {fuse['reads']}, answered in worker threads {fuse.get('local_reads', 0)} "
                      f"(at most {fuse.get('local_reads_peak', 0)} at once in Python; {fuse.get('native_reads', 0)} in C)",
                      flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process *pid* (all its threads), seconds; 0 without one."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fuse_reads(host: Lazyfs | None) -> tuple[int, int]:
    """READ requests the daemon answered so far, and their bytes (all exports)."""
    if host is None:
        return 0, 0
    st = call(host.socket, "fuse-stats", timeout=30)
    return st["reads"], st["bytes_read"]


def _close(host: Lazyfs) -> None:
    try:
        host.close()
    except subprocess.TimeoutExpired as exc:  # `losetup -a` can hang on another job's device
        print(f"  cleanup of {host.base}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
