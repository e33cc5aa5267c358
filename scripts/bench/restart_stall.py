#!/usr/bin/env python3
"""Benchmark live restart (issue 13): a reader's longest stall while the daemon is `kill -9`ed and restarted.

A reader (tests/support/reader.py) checksums every file of a loop-mounted ext4 served by lazyfs
from a local docker-registry, dropping each file's pages first. The image is mounted --writable:
its loop device uses O_DIRECT, so every pass reaches the daemon (a read-only mount's buffered loop
serves re-reads from the kernel's page cache, docs/warm.md, and would hide the gap).
While it runs, the daemon is killed with SIGKILL and a new `lazyfs daemon` started --restarts
times (default 20). The new daemon takes the FUSE connection over from the fd keeper. For each
restart, the stall is the longest single file read that overlapped the gap (kill to one second
after the new daemon answers). The baseline is the same measure over windows of the same length
without any restart, taken in the same run. Every read must succeed with the right checksum, or the
benchmark fails.

Usage: scripts/bench/restart_stall.py [--restarts 20] [--workdir DIR]
Needs root. Everything it starts (registry, daemons, keeper, FUSE, loop devices, mounts) is
stopped or removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import trio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lazyfs.config import Config, RegistrySettings  # noqa: E402
from lazyfs.format.reference import parse_reference  # noqa: E402
from lazyfs.image.local import create_image  # noqa: E402
from lazyfs.image.ref import LocalRef  # noqa: E402
from lazyfs.image.remote import ImageOpener, push_image  # noqa: E402
from lazyfs.serve.control import call  # noqa: E402
from tests.image.test_local import make_busybox_tree  # noqa: E402
from tests.serve.test_live_restart import checksums  # noqa: E402
from tests.support.cleanup import release_under  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402

READER = os.path.join(ROOT, "tests", "support", "reader.py")


def lazyfs(config: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", config], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"lazyfs {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def wait_ping(sock: str, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            call(sock, "ping", timeout=5)
            return time.monotonic()
        except Exception:
            time.sleep(0.01)
    raise RuntimeError("the daemon did not come back")


def reads(log: str) -> list[tuple[float, float]]:
    with open(log) as f:
        return [tuple(map(float, line.split())) for line in f if line.strip()]


def longest_overlapping(all_reads, start: float, end: float) -> float:
    return max((d for s, d in all_reads if s < end and s + d > start), default=0.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    tmp = args.workdir or tempfile.mkdtemp(prefix="lazyfs-restart-")
    os.makedirs(tmp, exist_ok=True)
    with running_registry(os.path.join(tmp, "registry")) as registry:
        src = os.path.join(tmp, "src")
        make_busybox_tree(src)
        local = LocalRef(os.path.join(tmp, "layout"), "v1")
        trio.run(lambda: create_image(local, from_dir=src))
        ref = f"{registry.registry}/bench/restart:v1"

        async def push():
            async with ImageOpener(Config(registries=(RegistrySettings(registry.registry, plain_http=True),))) as o:
                await push_image(o, local, parse_reference(ref))

        trio.run(push)
        doc = {"run_dir": f"{tmp}/run", "state_dir": f"{tmp}/state", "cache_root": f"{tmp}/cache",
               "writable_root": f"{tmp}/writable", "trace_record_seconds": 0,
               "registries": [{"host": registry.registry, "plain_http": True}]}
        config = os.path.join(tmp, "config.json")
        with open(config, "w") as f:
            json.dump(doc, f)
        sock = os.path.join(doc["run_dir"], "lazyfs.sock")
        target = os.path.join(tmp, "mnt")
        os.makedirs(target, exist_ok=True)
        reader = None
        daemons: list[subprocess.Popen] = []
        try:
            lazyfs(config, "mount", ref, target, "--writable")
            with open(os.path.join(tmp, "expected.json"), "w") as f:
                json.dump(checksums(src), f)
            log = os.path.join(tmp, "reads.log")
            stop = os.path.join(tmp, "stop")
            reader = subprocess.Popen([sys.executable, READER, target, os.path.join(tmp, "expected.json"),
                                       os.path.join(tmp, "progress.json"), stop, "--log", log],
                                      stderr=subprocess.PIPE, text=True)
            time.sleep(3)  # first passes: chunks fetched, steady state
            gaps, windows = [], []
            for i in range(args.restarts):
                time.sleep(1.0)
                pid = call(sock, "ping", timeout=10)["pid"]
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                with open(os.path.join(tmp, "daemon.log"), "ab") as out:
                    daemons.append(subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "daemon", "--config", config],
                                                    cwd=ROOT, stdout=out, stderr=out, start_new_session=True))
                back = wait_ping(sock)
                windows.append((killed, back + 1.0))
                gaps.append(back - killed)
                if reader.poll() is not None:
                    raise RuntimeError(f"the reader failed: {reader.stderr.read()}")
            time.sleep(1.0)
            quiet_from = time.monotonic()
            time.sleep(max(10.0, sum(e - s for s, e in windows) / 2))  # the baseline's windows, no restart
            quiet_to = time.monotonic()
            open(stop, "w").close()
            reader.wait(timeout=300)
            if reader.returncode != 0:
                raise RuntimeError(f"the reader failed ({reader.returncode}): {reader.stderr.read()}")
            all_reads = reads(log)
            stalls = [longest_overlapping(all_reads, s, e) for s, e in windows]
            width = statistics.median(e - s for s, e in windows)
            base = []
            t = quiet_from
            while t + width <= quiet_to:
                base.append(longest_overlapping(all_reads, t, t + width))
                t += width
            passes = json.load(open(os.path.join(tmp, "progress.json")))["passes"]
            fuse = call(sock, "fuse-stats", timeout=10)
            result = {
                "restarts": args.restarts, "reader_passes": passes, "reads": len(all_reads), "read_errors": 0,
                "stall_p50_s": round(statistics.median(stalls), 3), "stall_max_s": round(max(stalls), 3),
                "daemon_back_p50_s": round(statistics.median(gaps), 3), "daemon_back_max_s": round(max(gaps), 3),
                "baseline_windows": len(base),
                "baseline_p50_s": round(statistics.median(base), 4) if base else None,
                "baseline_max_s": round(max(base), 4) if base else None,
                "resent_requests_last_daemon": fuse["resent_requests"],
            }
            if base:
                result["stall_p50_vs_baseline_p50"] = round(result["stall_p50_s"] / max(result["baseline_p50_s"], 1e-6), 1)
            print(json.dumps(result, indent=1))
            lazyfs(config, "umount", target)
        finally:
            if reader is not None and reader.poll() is None:
                reader.kill()
            release_under(tmp, sock)
            for d in daemons:
                try:
                    d.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    d.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
