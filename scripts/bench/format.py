#!/usr/bin/env python3
"""Benchmark the layer format: create, commit and full-read throughput, and dedup.

Baselines measured in the same run on the same bytes: `zstd -3 -T1` (the
compression lazyfs does, without chunking/hashing) and `cp` (plain copy).
Usage: scripts/bench/format.py [--source DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import drop_caches  # noqa: E402
from lazyfs.device.writable import open_writable  # noqa: E402
from lazyfs.fetch.direct import DirectChunkSource  # noqa: E402
from lazyfs.fetch.directory import DirectoryBackend  # noqa: E402
from lazyfs.image.local import commit_image, create_image, image_info, mkfs_from_dir, new_writable, open_local  # noqa: E402
from lazyfs.image.ref import LocalRef  # noqa: E402


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


async def read_all(ref: LocalRef) -> int:
    image, layout = await open_local(ref)
    device = image.device(DirectChunkSource(DirectoryBackend(layout.path)))
    step, total = 4 << 20, 0
    sem = trio.Semaphore(4)

    async def one(off):
        nonlocal total
        async with sem:
            total += len(await device.read(off, step))

    async with trio.open_nursery() as n:
        for off in range(0, image.virtual_size, step):
            await sem.acquire()
            sem.release()
            n.start_soon(one, off)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", default="/usr/share/doc", help="directory tree to build the ext4 image from")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="lazyfs-bench-", dir=args.workdir)
    try:
        tree = os.path.join(work, "tree")
        shutil.copytree(args.source, tree, symlinks=True)
        raw = os.path.join(work, "disk.ext4")
        mkfs_from_dir(tree, raw)
        used = int(subprocess.run(["du", "-B1", raw], capture_output=True, text=True).stdout.split()[0])
        size = os.path.getsize(raw)
        print(f"ext4 image: {size / 1e6:.0f} MB virtual, {used / 1e6:.0f} MB allocated (from {args.source})")

        drop_caches()
        _, t_cp = timed(subprocess.run, ["cp", "--sparse=always", raw, os.path.join(work, "copy.img")])
        drop_caches()
        _, t_zstd = timed(subprocess.run, ["zstd", "-q", "-3", "-T1", "-f", raw, "-o", os.path.join(work, "copy.zst")])
        zst_size = os.path.getsize(os.path.join(work, "copy.zst"))
        drop_caches()
        ref = LocalRef(os.path.join(work, "layout"), "a")
        summary, t_create = timed(trio.run, lambda: create_image(ref, from_file=raw))
        drop_caches()
        _, t_read = timed(trio.run, read_all, ref)
        drop_caches()
        _, t_zstd_d = timed(subprocess.run, ["zstd", "-q", "-d", "-f", os.path.join(work, "copy.zst"), "-o", os.path.join(work, "out.img")])

        # commit: a writable layer with 10% of the used blocks rewritten
        wdir = os.path.join(work, "w")
        trio.run(new_writable, ref, wdir, "log")
        layer = open_writable(wdir)
        with open(raw, "rb") as f:
            for off in range(0, size, 10 * (1 << 20)):
                data = os.pread(f.fileno(), 1 << 20, off)
                layer.write_blocks(off // 4096, bytes(reversed(data)))
        layer.flush()
        layer.close()
        commit_summary, t_commit = timed(trio.run, lambda: commit_image(ref, wdir, LocalRef(os.path.join(work, "layout"), "c")))

        # dedup: the same tree plus one file, as a layer over the first image
        with open(os.path.join(tree, "one-more-file.txt"), "w") as f:
            f.write("hello, dedup\n" * 1000)
        raw2 = os.path.join(work, "disk2.ext4")
        mkfs_from_dir(tree, raw2, size)
        ref2 = LocalRef(os.path.join(work, "layout"), "b")
        diff = trio.run(lambda: create_image(ref2, from_file=raw2, base=ref))
        alone = trio.run(lambda: create_image(LocalRef(os.path.join(work, "layout2"), "b"), from_file=raw2))
        info = trio.run(image_info, ref)

        mb = used / 1e6
        rows = {
            "create MB/s": mb / t_create, "cp MB/s": mb / t_cp, "zstd -3 MB/s": mb / t_zstd,
            "create / zstd": t_zstd / t_create, "create / cp": t_cp / t_create,
            "full read MB/s": mb / t_read, "zstd -d MB/s": mb / t_zstd_d, "read / zstd -d": t_zstd_d / t_read,
            "commit MB/s (raw written)": commit_summary["raw_bytes"] / 1e6 / t_commit,
            "stored / allocated": info["stored_bytes"] / used, "zstd file / allocated": zst_size / used,
            "image B alone stored MB": alone["stored_bytes"] / 1e6,
            "image B over A stored MB": diff["stored_bytes"] / 1e6,
            "dedup saving (B over A vs alone)": 1 - diff["stored_bytes"] / max(1, alone["stored_bytes"]),
        }
        for k, v in rows.items():
            print(f"{k:38s} {v:10.3f}")
        print(json.dumps({"machine": os.uname().nodename, "cores": os.cpu_count(), **rows}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
