#!/usr/bin/env python3
"""The cost of durable writes (issue 13): fio randwrite, 4 KiB blocks, an fsync after every write.

Runs the same fio job (``--rw=randwrite --bs=4k --fsync=1 --ioengine=psync``,
one job, a 256 MiB file laid out first, ``--seconds`` of measurement) on:

* ``lazyfs sparse`` / ``lazyfs log``: a file in the ext4 of a writable
  ``lazyfs mount --writable --kind K`` (FUSE export + loop device), writable
  root and chunk cache on the work directory's disk. Every fsync in the guest
  ext4 becomes flushes of the loop device, each one an fdatasync of the layer's
  data and a journal batch with its own fdatasync;
* ``local file`` (the baseline asked for): a file in the work directory itself,
  on the same disk;
* ``local loop ext4``: the same stack without lazyfs: an ext4 image file in the
  work directory on a loop device (buffered), to separate the cost of a second
  file system from the cost of lazyfs;
* ``FUSE file export``: lazyfs' FUSE front end (ExportFS) exporting a plain
  file, loop device and ext4 on top (tests/serve/fuse_server.py): the FUSE
  plumbing without a writable layer (its flush is one fsync of the file).

Prints IOPS, the fsync latency (p50, p99) and ratios against both local runs,
plus the layer's flush count per fio fsync. --repeat N runs the whole set N
times in rotating order and reports medians.

Usage: scripts/bench/durable_writes.py [--workdir /var/tmp/lazyfs-bench-durable] [--seconds 20] [--repeat 3]
Needs root. Mounts, loop devices and the daemon it starts are removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import trio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lazyfs.image.local import create_image  # noqa: E402
from lazyfs.image.ref import LocalRef  # noqa: E402
from tests.support.cleanup import release_under  # noqa: E402

FILE_SIZE = "256M"
IMAGE_SIZE = 1 << 30


def run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def fio(path: str, seconds: int) -> dict:
    """One randwrite job with an fsync after every 4 KiB write; IOPS and fsync latency."""
    common = ["fio", "--name=durable", f"--filename={path}", f"--size={FILE_SIZE}", "--bs=4k",
              "--ioengine=psync", "--output-format=json"]
    run(common + ["--rw=write", "--fsync=0", "--end_fsync=1"])  # lay the file out: no allocation in the run
    out = json.loads(run(common + ["--rw=randwrite", "--fsync=1", "--time_based", f"--runtime={seconds}",
                                   "--randrepeat=0"]).stdout)
    job = out["jobs"][0]
    sync = job.get("sync", {}).get("lat_ns", {})
    pct = sync.get("percentile", {})
    return {"iops": job["write"]["iops"], "writes": job["write"]["total_ios"],
            "fsync_p50_ms": pct.get("50.000000", 0) / 1e6, "fsync_p99_ms": pct.get("99.000000", 0) / 1e6}


class Lazyfs:
    """A daemon of our own (config under the work directory) and a local image to mount writable."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.config = os.path.join(work, "config.json")
        doc = {"run_dir": os.path.join(work, "run"), "state_dir": os.path.join(work, "state"),
               "cache_root": os.path.join(work, "cache"), "writable_root": os.path.join(work, "writable"),
               "trace_record_seconds": 0}
        with open(self.config, "w") as f:
            json.dump(doc, f)
        self.writable_root = doc["writable_root"]
        self.socket = os.path.join(doc["run_dir"], "lazyfs.sock")
        src = os.path.join(work, "src")
        os.makedirs(src, exist_ok=True)
        with open(os.path.join(src, "README"), "w") as f:
            f.write("durable writes benchmark\n")
        layout = os.path.join(work, "layout")
        if not os.path.exists(layout):
            trio.run(lambda: create_image(LocalRef(layout, "v1"), from_dir=src, size=IMAGE_SIZE))
        self.image = f"oci:{layout}:v1"

    def cli(self, *args: str) -> str:
        return run([sys.executable, "-m", "lazyfs.cli", *args, "--config", self.config], cwd=ROOT).stdout

    def measure(self, kind: str, seconds: int) -> dict:
        target = os.path.join(self.work, f"mnt-{kind}")
        os.makedirs(target, exist_ok=True)
        shutil.rmtree(self.writable_root, ignore_errors=True)  # a new, empty writable layer every run
        self.cli("mount", self.image, target, "--writable", "--kind", kind)
        try:
            before = json.loads(self.cli("stats", target, "--json"))["device"]["writable"]
            result = fio(os.path.join(target, "fio.dat"), seconds)
            after = json.loads(self.cli("stats", target, "--json"))["device"]["writable"]
        finally:
            self.cli("umount", target)
        # the layout phase is in "before"/"after" too; per fio write of the timed phase it is noise
        result["flushes_per_fsync"] = (after["flushes"] - before["flushes"]) / max(1, result["writes"])
        return result


def local_file(work: str, seconds: int) -> dict:
    path = os.path.join(work, "local", "fio.dat")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        return fio(path, seconds)
    finally:
        os.unlink(path)


def local_loop(work: str, seconds: int) -> dict:
    image, target = os.path.join(work, "loop.img"), os.path.join(work, "mnt-loop")
    os.makedirs(target, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", image])
    dev = run(["losetup", "-f", "--show", image]).stdout.strip()
    try:
        run(["mount", dev, target])
        try:
            return fio(os.path.join(target, "fio.dat"), seconds)
        finally:
            run(["umount", target])
    finally:
        run(["losetup", "-d", dev])
        os.unlink(image)


def fuse_file(work: str, seconds: int) -> dict:
    """The same stack with lazyfs' FUSE front end exporting a plain file (tests/serve/fuse_server.py):
    what the FUSE and loop plumbing cost, without a writable layer's journal."""
    image, export, target = (os.path.join(work, n) for n in ("fuse-file.img", "fuse-export", "mnt-fuse"))
    for d in (export, target):
        os.makedirs(d, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", image])
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/serve/fuse_server.py"), export,
                               "--export", f"name=f,file={image}"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def command(line: str) -> dict:
        server.stdin.write(line + "\n")
        server.stdin.flush()
        answer = server.stdout.readline()
        if not answer.startswith("ok "):
            raise RuntimeError(f"fuse_server {line}: {answer.strip()}")
        return json.loads(answer[3:])

    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("fuse_server did not start")
        dev = command("attach f")["dev"]
        try:
            run(["mount", dev, target])
            try:
                return fio(os.path.join(target, "fio.dat"), seconds)
            finally:
                run(["umount", target])
        finally:
            command(f"detach {dev}")
    finally:
        server.stdin.close()
        server.wait(timeout=60)
        os.unlink(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/var/tmp/lazyfs-bench-durable")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    device = os.stat(work).st_dev
    lazy = Lazyfs(work)
    runs = {"local file": lambda: local_file(work, args.seconds),
            "local loop ext4": lambda: local_loop(work, args.seconds),
            "FUSE file export": lambda: fuse_file(work, args.seconds),
            "lazyfs sparse": lambda: lazy.measure("sparse", args.seconds),
            "lazyfs log": lambda: lazy.measure("log", args.seconds)}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    try:
        names = list(runs)
        for r in range(args.repeat):
            for name in names[r % len(names):] + names[: r % len(names)]:
                results[name].append(runs[name]())
                print(f"  run {r + 1} {name}: {results[name][-1]['iops']:.0f} IOPS", file=sys.stderr)
    finally:
        release_under(work, lazy.socket)
    assert os.stat(work).st_dev == device
    src = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE", "--target", work], capture_output=True, text=True).stdout
    print(f"\nfio randwrite bs=4k fsync=1 psync, {FILE_SIZE} file, {args.seconds} s x {args.repeat} (medians); "
          f"work dir {work} on {src.strip()}; {time.strftime('%Y-%m-%d')}")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    base, loop = med["local file"]["iops"], med["local loop ext4"]["iops"]
    fuse = med["FUSE file export"]["iops"]
    print("| run | IOPS (median) | IOPS (min–max) | fsync p50 | fsync p99 | vs local file | vs local loop ext4 | "
          "vs FUSE file export | layer flushes per fsync |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in med.items():
        flushes = f"{m['flushes_per_fsync']:.2f}" if "flushes_per_fsync" in m else "—"
        spread = f"{min(r['iops'] for r in results[name]):.0f}–{max(r['iops'] for r in results[name]):.0f}"
        print(f"| {name} | {m['iops']:.0f} | {spread} | {m['fsync_p50_ms']:.2f} ms | {m['fsync_p99_ms']:.2f} ms | "
              f"{m['iops'] / base:.2f}× | {m['iops'] / loop:.2f}× | {m['iops'] / fuse:.2f}× | {flushes} |")


if __name__ == "__main__":
    main()
