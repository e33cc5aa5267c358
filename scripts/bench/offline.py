#!/usr/bin/env python3
"""Benchmark a daemon restart with the registry unreachable (issue 13 item 5, docs/daemon.md "Offline life").

N images (distinct random content, one per tag) are exported from a local docker-registry, then
the daemon is killed (kill -9) and started again, --repeat times per case:

* kept: the metadata cache in place (this lazyfs): the restore reads manifests and tails from disk;
* baseline: the metadata cache removed before each restart, which is what a daemon without it
  does: every image's restore needs the registry;

each with the registry answering ("up") and with it stopped (SIGSTOP: "down", requests hang as
over a dead link). Reported: seconds from the new daemon's start to its first answer on the
control socket (the restore is done by then), and how many of the N images it restored.
Ratios are kept / baseline, measured in the same run.

Usage: scripts/bench/offline.py [--images 5] [--repeat 3] [--fetch-deadline 5] [--json FILE]
Needs root (FUSE). Everything it starts is stopped and removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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
from lazyfs.errors import LazyfsError  # noqa: E402
from lazyfs.format.reference import parse_reference  # noqa: E402
from lazyfs.image.local import create_image  # noqa: E402
from lazyfs.image.ref import LocalRef  # noqa: E402
from lazyfs.image.remote import ImageOpener, push_image  # noqa: E402
from lazyfs.serve.control import call  # noqa: E402
from tests.support.cleanup import release_under  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402


def lazyfs(config_path: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", config_path], cwd=ROOT,
                          check=True, capture_output=True, text=True, timeout=300).stdout


def start_daemon(config_path: str, socket: str) -> tuple[subprocess.Popen, float]:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "daemon", "--config", config_path], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(6000):  # bounded: 10 minutes
        try:
            if call(socket, "ping", timeout=5)["pid"] == proc.pid:
                return proc, time.monotonic() - started
        except (LazyfsError, OSError):
            pass
        time.sleep(0.01)
    raise RuntimeError("the daemon did not answer")


def kill_daemon(socket: str) -> None:
    pid = call(socket, "ping", timeout=10)["pid"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(1000):
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            return
        time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fetch-deadline", type=float, default=5.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="lazyfs-bench-offline-")
    results: dict[str, dict] = {}
    try:
        with running_registry(os.path.join(tmp, "registry")) as reg:
            doc = {"run_dir": f"{tmp}/run", "state_dir": f"{tmp}/state", "cache_root": f"{tmp}/cache",
                   "writable_root": f"{tmp}/writable", "trace_record_seconds": 0, "registry_probe_interval": 0,
                   "fetch_deadline": args.fetch_deadline, "registries": [{"host": reg.registry, "plain_http": True}]}
            config_path = f"{tmp}/config.json"
            with open(config_path, "w") as f:
                json.dump(doc, f)
            socket = f"{tmp}/run/lazyfs.sock"
            settings = Config(registries=(RegistrySettings(reg.registry, plain_http=True),))

            async def push(i: int) -> str:
                raw = os.path.join(tmp, f"raw{i}")
                with open(raw, "wb") as f:
                    f.write(random.Random(i).randbytes(4 << 20))
                local = LocalRef(os.path.join(tmp, f"layout{i}"), "v1")
                await create_image(local, from_file=raw)
                ref = f"{reg.registry}/bench/offline:{i}"
                async with ImageOpener(settings) as opener:
                    await push_image(opener, local, parse_reference(ref))
                return ref

            refs = [trio.run(push, i) for i in range(args.images)]
            for i, ref in enumerate(refs):
                lazyfs(config_path, "export", ref, f"{tmp}/exp{i}")
            metadata = f"{tmp}/cache/metadata"
            kept_copy = f"{tmp}/metadata-kept"
            shutil.copytree(metadata, kept_copy)
            daemon = None
            for network in ("up", "down"):
                for case in ("kept", "baseline"):
                    times, restored = [], []
                    for _ in range(args.repeat):
                        kill_daemon(socket)
                        shutil.rmtree(metadata, ignore_errors=True)
                        if case == "kept":
                            shutil.copytree(kept_copy, metadata)
                        if network == "down":
                            os.kill(reg.process.pid, signal.SIGSTOP)
                        try:
                            daemon, seconds = start_daemon(config_path, socket)
                            times.append(seconds)
                            restored.append(len(call(socket, "list", timeout=30)))
                        finally:
                            if network == "down":
                                os.kill(reg.process.pid, signal.SIGCONT)
                        if len(call(socket, "list", timeout=30)) < args.images:  # attach again what was lost
                            for i, ref in enumerate(refs):
                                lazyfs(config_path, "umount", f"{tmp}/exp{i}")
                                lazyfs(config_path, "export", ref, f"{tmp}/exp{i}")
                    results[f"{network}/{case}"] = {"seconds_median": round(statistics.median(times), 3),
                                                    "seconds_max": round(max(times), 3),
                                                    "restored_of": [min(restored), args.images]}
                    print(f"registry {network:4} {case:8}: ready in {statistics.median(times):7.3f} s (median of "
                          f"{args.repeat}, max {max(times):.3f}), restored {min(restored)}/{args.images} images",
                          flush=True)
                kept, base = results[f"{network}/kept"], results[f"{network}/baseline"]
                print(f"registry {network:4} ratio kept/baseline: "
                      f"{kept['seconds_median'] / base['seconds_median']:.3f}", flush=True)
            for i in range(args.images):
                lazyfs(config_path, "umount", f"{tmp}/exp{i}")
            call(socket, "stop")
            if daemon is not None:
                daemon.wait(timeout=60)
    finally:
        release_under(tmp, f"{tmp}/run/lazyfs.sock")
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
