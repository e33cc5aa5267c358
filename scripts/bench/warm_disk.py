#!/usr/bin/env python3
"""Benchmark warm reads from the disk cache with the page cache dropped (issue 14 goal 2).

A file (half random MiBs, half hex text) in an ext4 image, on the host's disk:
fio sequential 1 MiB and random 4 KiB reads (``--direct=1``, libaio, iodepth 16,
--seconds each), the page cache dropped before every job, on

* local: the same ext4 file on a loop device, attached as `lazyfs mount` attaches
  its file (read-only, direct I/O where accepted), on the same disk (the baseline);
* lazyfs-flat: `lazyfs mount` of the image (default config: flat layer files on),
  the cache on the same disk, filled by one `dd` of the file before the jobs;
* lazyfs-chunks: the same with ``flat_cache_size = 0``: the chunk-file disk tier
  only (what lazyfs did before the flat files).

Prints each target's MB/s and IOPS and the ratio to local measured in the same run.

Usage: scripts/bench/warm_disk.py [--workdir DIR] [--seconds 10] [--size-mib 1024]
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
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices, FUSE, drop_caches)")
    work = args.workdir or tempfile.mkdtemp(prefix="lazyfs-warm-disk-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    cli = [sys.executable, "-m", "lazyfs.cli"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    results: dict = {"seconds": args.seconds, "size_mib": args.size_mib}
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
        for name, extra in (("lazyfs-flat", {}), ("lazyfs-chunks", {"flat_cache_size": 0})):
            host = Lazyfs(os.path.join(work, name), reg.registry, trace_record_seconds=0, **extra)
            stack.callback(_close, host)
            mnt = os.path.join(work, name, "mnt")
            mounted = host.mount(f"{reg.registry}/bench/fio:v1", mnt)
            run(["dd", f"if={os.path.join(mnt, 'bigfile')}", "of=/dev/null", "bs=4M"])  # fill the cache
            targets[name] = (os.path.join(mnt, "bigfile"), mounted["loop"], host)
        local_dev = stack.enter_context(loop_mount(raw, os.path.join(work, "local-mnt")))
        targets = {"local": (os.path.join(work, "local-mnt", "bigfile"), local_dev, None), **targets}
        print(f"warm reads from disk, page cache dropped before each job; fio {args.seconds} s, iodepth 16, "
              f"--direct=1, {args.size_mib} MiB file", flush=True)
        for name, (path, dev, _) in targets.items():
            results[name] = {"loop_direct_io": system.loop_direct_io(dev)}
            for kind, rw, bs in (("seq", "read", "1M"), ("rand", "randread", "4k")):
                drop_caches()
                results[name][kind] = fio(path, rw, bs, args.seconds)
                print(f"  {name:14s} {kind:4s} {results[name][kind]['MBps']:9.1f} MB/s "
                      f"{results[name][kind]['iops']:10.0f} IOPS", flush=True)
        for name, (_, _, host) in targets.items():
            if host is not None:
                stats = host.stats(os.path.join(work, name, "mnt"))
                results[name]["stats"] = stats
        for name in targets:
            if name == "local":
                continue
            for kind in ("seq", "rand"):
                ratio = results[name][kind]["MBps"] / results["local"][kind]["MBps"]
                results[f"{kind}_{name}_vs_local"] = ratio
            print(f"  {name} / local: seq {results[f'seq_{name}_vs_local']:.2f}x, "
                  f"rand {results[f'rand_{name}_vs_local']:.2f}x", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)


def _close(host: Lazyfs) -> None:
    try:
        host.close()
    except subprocess.TimeoutExpired as exc:  # `losetup -a` can hang on another job's device
        print(f"  cleanup of {host.base}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
