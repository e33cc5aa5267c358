#!/usr/bin/env python3
"""FUSE passthrough of a hydrated image (issue 14 item 3): the exported disk.img, one run.

One ext4 image with a --size file (half random, half hex-text MiBs) is pushed to a local
docker-registry and exported twice by one daemon (``lazyfs export``): every chunk is read once
(disk cache full), then ``hydrate-file`` passes the first export through to the hydrated file.
fio (libaio, iodepth 16) then reads the exported file itself (what qemu ``-drive``, a loop
device or cat open), sequential 1 MiB and random 4 KiB, on three targets:

* ``local``: the hydrated file itself (cache_root/hydrated/<manifest>.img): the baseline;
* ``passthrough``: the first export's disk.img (FOPEN_PASSTHROUGH: the kernel reads the
  hydrated file, no request reaches the daemon);
* ``fuse``: the second export's disk.img, not passed through (every read the page cache
  misses goes to the daemon; keep_cache keeps what it read).

Three passes: **hot** (buffered fio, the target read once just before; time-based jobs),
**dropped** (buffered fio, ``drop_caches`` before each job, each block read at most once) and
**direct** (``--direct=1``, as qemu cache=none or a direct-I/O loop read; time-based). Ratios
against ``local`` in the same pass. The daemon's READ count shows passthrough sent none.

Usage: scripts/bench/passthrough.py [--workdir DIR (on the disk to measure)] [--size MiB] [--seconds N] [--json OUT]
Needs root. Everything it starts (registry, daemon, FUSE) is removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mount import Lazyfs, drop_caches, run, write_bigfile  # noqa: E402
from lazyfs.image.local import mkfs_from_dir  # noqa: E402
from lazyfs.serve.control import call  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402

JOBS = (("seq", "read", "1M"), ("rand", "randread", "4k"))
MODES = ("hot", "dropped", "direct")


def fio(path: str, rw: str, bs: str, seconds: int, *, direct: bool, one_pass: bool) -> dict:
    timing = ([f"--io_size={os.path.getsize(path)}", f"--runtime={seconds}"] if one_pass
              else ["--time_based", f"--runtime={seconds}"])
    out = run(["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--direct={int(direct)}",
               # --invalidate=0: fio would otherwise drop the file's cache first (the hot pass would be
               # cold for the local file, yet not for the passthrough one: fadvise on the FUSE file
               # does not reach the backing file's cache); the dropped pass drops every cache itself
               "--ioengine=libaio", "--iodepth=16", "--readonly", "--invalidate=0", *timing, "--output-format=json"],
              timeout=seconds + 120).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"MBps": job["bw_bytes"] / 1e6, "iops": job["iops"], "bytes": job["io_bytes"]}


def daemon_reads(sock: str, name: str) -> int:
    return call(sock, "fuse-stats", timeout=30)["exports"][name]["reads"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/var/tmp", help="on the disk to measure (not tmpfs)")
    ap.add_argument("--size", type=int, default=512, help="MiB in the big file")
    ap.add_argument("--seconds", type=int, default=5, help="runtime of each fio job")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("passthrough.py needs root (FUSE, mounts)")
    work = tempfile.mkdtemp(prefix="lazyfs-bench-pt-", dir=args.workdir)
    results: dict = {"date": time.strftime("%Y-%m-%d"),
                     "machine": f"{os.uname().nodename}, {os.cpu_count()} cores, {os.uname().release}",
                     "loadavg_start": os.getloadavg(), "size_mib": args.size, "seconds": args.seconds}
    lazyfs_cli = [sys.executable, "-m", "lazyfs.cli"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        tree = os.path.join(work, "tree")
        os.makedirs(tree)
        write_bigfile(os.path.join(tree, "bigfile"), args.size << 20)
        raw = os.path.join(work, "local.ext4")
        mkfs_from_dir(tree, raw)
        shutil.rmtree(tree)
        reg = stack.enter_context(running_registry(os.path.join(work, "registry")))
        layout = os.path.join(work, "layout")
        run([*lazyfs_cli, "create", f"oci:{layout}:pt", "--from-file", raw], env=env, cwd=ROOT)
        os.unlink(raw)
        ref = f"{reg.registry}/bench/pt:v1"
        run([*lazyfs_cli, "push", f"oci:{layout}:pt", ref, "--plain-http", reg.registry], env=env, cwd=ROOT)
        host = Lazyfs(os.path.join(work, "lazyfs"), reg.registry, trace_record_seconds=0,
                      hydrated_check_interval=3600)  # passthrough only where the benchmark asks
        stack.callback(host.close)
        files = {}
        for which in ("passthrough", "fuse"):
            target = os.path.join(work, "lazyfs", f"export-{which}")
            os.makedirs(target)
            host.targets.append(target)
            files[which] = host.cli("export", ref, target).strip()
        names = {a["name"]: a for a in call(host.socket, "list", timeout=30)}
        by_path = {os.path.realpath(a["path"]): n for n, a in names.items()}
        export_name = {which: by_path[os.path.realpath(path)] for which, path in files.items()}
        run(["dd", f"if={files['fuse']}", "of=/dev/null", "bs=4M", "status=none"], timeout=1800)  # every chunk local
        built = call(host.socket, "hydrate-file", name=export_name["passthrough"], timeout=600)
        assert built["path"] and built["passthrough"], built
        files["local"] = built["path"]
        stats = call(host.socket, "fuse-stats", timeout=30)["exports"]
        assert stats[export_name["passthrough"]]["passthrough"] and not stats[export_name["fuse"]]["passthrough"]
        order = ("local", "passthrough", "fuse")
        for mode in MODES:
            print(f"\n{mode}: fio --ioengine=libaio --iodepth=16 --direct={int(mode == 'direct')}, "
                  f"{args.seconds} s per job", flush=True)
            out = results[mode] = {}
            for which in order:
                path = files[which]
                out[which] = {}
                reads_before = daemon_reads(host.socket, export_name[which]) if which != "local" else 0
                if mode == "hot":
                    drop_caches()  # nobody else's pages: each target warms its own
                    run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "status=none"], timeout=1800)
                for kind, rw, bs in JOBS:
                    if mode == "dropped":
                        drop_caches()
                    out[which][kind] = fio(path, rw, bs, args.seconds, direct=mode == "direct",
                                           one_pass=mode == "dropped")
                    print(f"  {which:12s} {kind:4s} {out[which][kind]['MBps']:9.1f} MB/s "
                          f"{out[which][kind]['iops']:10.0f} IOPS", flush=True)
                if which != "local":
                    out[which]["daemon_reads"] = daemon_reads(host.socket, export_name[which]) - reads_before
                    print(f"  {which:12s} READ requests reaching the daemon: {out[which]['daemon_reads']}", flush=True)
            for which in ("passthrough", "fuse"):
                ratios = {kind: out[which][kind]["MBps"] / out["local"][kind]["MBps"] for kind, _, _ in JOBS}
                out[f"{which}_vs_local"] = ratios
                print(f"  {which} / local: seq {ratios['seq']:.2f}x, rand {ratios['rand']:.2f}x", flush=True)
        results["loadavg_end"] = os.getloadavg()
        print(f"\nload average {results['loadavg_start'][0]:.2f} at the start, {results['loadavg_end'][0]:.2f} "
              f"at the end (other jobs share this machine)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
