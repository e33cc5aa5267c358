#!/usr/bin/env python3
"""Re-measure LOOP_CHANGE_FD (ioctl 0x4C06) under a mounted ext4, under load (issue 14 item 3).

Could a running container move from the FUSE-exported disk.img to a local file of identical
bytes by swapping its loop device's backing file? Each round: a small ext4 (files of random
bytes) on a read-only *buffered* loop device (as `lazyfs mount` attaches read-only images),
mounted ``ro,noload``; a reader thread checksums every file in a loop, dropping each file's
pages first so its reads reach the loop device; after --before seconds the loop's backing
file is swapped (LOOP_CHANGE_FD) for an identical copy; the reader runs --after seconds more.
Counted per round: whether the ioctl succeeded, reader errors (and their errno) and wrong
bytes after the swap, a kernel log line saying the ext4 was shut down, and whether the loop
device itself (read with O_DIRECT) still returns the file's bytes.

Backings: ``file`` (a plain file) and ``fuse`` (the same file exported by nbdfuse, a FUSE
file like lazyfs' disk.img). Needs root. Prints a summary and writes --json.

Usage: scripts/bench/loop_change_fd.py [--rounds 20] [--backing file,fuse] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import nbdfuse_file  # noqa: E402

LOOP_CHANGE_FD = 0x4C06


def run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120, **kw).stdout


def make_image(work: str) -> tuple[str, dict[str, str]]:
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    rng = random.Random(14)
    sums = {}
    for i in range(64):
        data = rng.randbytes(rng.randrange(4096, 1 << 20))
        with open(os.path.join(tree, f"f{i:02d}"), "wb") as f:
            f.write(data)
        sums[f"f{i:02d}"] = hashlib.sha256(data).hexdigest()
    image = os.path.join(work, "a.img")
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, image, "96M"])
    return image, sums


class Reader(threading.Thread):
    """Checksums every file under *mnt* in a loop; counts errors and wrong bytes (bounded: stops on request)."""

    def __init__(self, mnt: str, sums: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.mnt, self.sums = mnt, sums
        self.stop = threading.Event()
        self.swapped_at: float | None = None
        self.passes = self.errors_before = self.errors_after = self.wrong_before = self.wrong_after = 0
        self.errnos: set[str] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, want in self.sums.items():
                try:
                    fd = os.open(os.path.join(self.mnt, name), os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the read reach the loop
                        h = hashlib.sha256()
                        while chunk := os.read(fd, 1 << 20):
                            h.update(chunk)
                    finally:
                        os.close(fd)
                    if h.hexdigest() != want:
                        if self.swapped_at is not None:  # judged when the read ended
                            self.wrong_after += 1
                        else:
                            self.wrong_before += 1
                except OSError as exc:
                    self.errnos.add(errno.errorcode.get(exc.errno, str(exc.errno)))
                    if self.swapped_at is not None:
                        self.errors_after += 1
                    else:
                        self.errors_before += 1
                if self.stop.is_set():
                    return
            self.passes += 1


def kernel_log_lines() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


def one_round(backing: str, copy: str, image: str, mnt: str, sums: dict, before: float, after: float) -> dict:
    dev = run(["losetup", "--show", "-f", "-r", backing]).strip()  # buffered, as lazyfs mounts read-only images
    out: dict = {"device": dev}
    try:
        run(["mount", "-t", "ext4", "-o", "ro,noload", dev, mnt])
        log_before = len(kernel_log_lines())
        reader = Reader(mnt, sums)
        try:
            reader.start()
            time.sleep(before)
            fd = os.open(copy, os.O_RDONLY)
            d = os.open(dev, os.O_RDONLY)
            reader.swapped_at = time.monotonic()
            try:
                fcntl.ioctl(d, LOOP_CHANGE_FD, fd)
                out["ioctl"] = "ok"
            except OSError as exc:
                out["ioctl"] = errno.errorcode.get(exc.errno, str(exc.errno))
            finally:
                os.close(fd)
                os.close(d)
            time.sleep(after)
        finally:
            reader.stop.set()
            reader.join(60)
        with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as f:
            out["backing_after"] = f.read().strip()
        new_log = kernel_log_lines()[log_before:]
        out["ext4_shut_down"] = any("shut down requested" in line and os.path.basename(dev) in line for line in new_log)
        # the block device itself, below the (maybe shut down) file system
        got = subprocess.run(["dd", f"if={dev}", "bs=1M", "iflag=direct", "status=none"], capture_output=True).stdout
        with open(image, "rb") as f:
            out["device_bytes_ok"] = got == f.read()
        out.update(passes=reader.passes, errors_before=reader.errors_before, errors_after=reader.errors_after,
                   wrong_before=reader.wrong_before, wrong_after=reader.wrong_after, errnos=sorted(reader.errnos))
    finally:
        subprocess.run(["umount", mnt], capture_output=True, timeout=60)
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--backing", default="file,fuse")
    ap.add_argument("--before", type=float, default=0.5, help="seconds of reading before the swap")
    ap.add_argument("--after", type=float, default=1.0, help="seconds of reading after the swap")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("loop_change_fd.py needs root (loop devices, mounts)")
    work = tempfile.mkdtemp(prefix="lazyfs-changefd-")
    results: dict = {"kernel": os.uname().release, "rounds": {}}
    try:
        image, sums = make_image(work)
        copy = os.path.join(work, "b.img")
        shutil.copyfile(image, copy)
        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt)
        for backing in args.backing.split(","):
            with contextlib.ExitStack() as stack:
                path = image if backing == "file" else stack.enter_context(nbdfuse_file(image, os.path.join(work, "fuse")))
                rounds = [one_round(path, copy, image, mnt, sums, args.before, args.after) for _ in range(args.rounds)]
            results["rounds"][backing] = rounds
            n = len(rounds)
            summary = {
                "rounds": n,
                "ioctl_ok": sum(r["ioctl"] == "ok" for r in rounds),
                "rounds_with_reader_errors_after": sum(r["errors_after"] > 0 for r in rounds),
                "rounds_with_wrong_bytes": sum(r["wrong_after"] + r["wrong_before"] > 0 for r in rounds),
                "rounds_ext4_shut_down": sum(r["ext4_shut_down"] for r in rounds),
                "rounds_device_bytes_ok": sum(r["device_bytes_ok"] for r in rounds),
                "reader_errors_before_swap": sum(r["errors_before"] for r in rounds),
                "errnos": sorted({e for r in rounds for e in r["errnos"]}),
            }
            results[backing] = summary
            print(f"{backing:5s} backing, kernel {results['kernel']}: " + ", ".join(f"{k} {v}" for k, v in summary.items()),
                  flush=True)
    finally:
        subprocess.run(["umount", os.path.join(work, "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
