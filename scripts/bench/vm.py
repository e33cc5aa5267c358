#!/usr/bin/env python3
"""Benchmark a VM booting its root disk from lazyfs: guest time to output, and bytes fetched.

One run, same guest kernel and initrd, same ext4 image (a Debian minbase root
filesystem; cached tarball from scripts/demo.sh or debootstrap):
  * baseline: the fully downloaded raw image on local disk, `-drive file=disk.raw`
  * lazyfs:   `lazyfs export` of the same image pushed to a local registry (cold
              cache), `-drive file=DIR/disk.img`; optionally behind a proxy adding RTT.
Usage: scripts/bench/vm.py [--rtt-ms 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lazyfs.config import Config, RegistrySettings  # noqa: E402
from lazyfs.format.reference import parse_reference  # noqa: E402
from lazyfs.image.local import create_image, flatten_image  # noqa: E402
from lazyfs.image.ref import LocalRef  # noqa: E402
from lazyfs.image.remote import ImageOpener, push_image  # noqa: E402
from lazyfs.serve.control import call  # noqa: E402
from tests.support.guest import Drive, prepare_guest  # noqa: E402
from tests.support.proxy import FaultProxy  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402

ROOTFS_TAR = "/var/cache/lazyfs-demo/debian-minbase.tar"
SCRIPT = ("set -e\nmount -t ext4 -o ro,noload /dev/vda /mnt\n"
          "chroot /mnt /bin/sh -c '. /etc/os-release; echo $PRETTY_NAME; dpkg -l | wc -l; ls -lR /usr/share/doc >/dev/null'\n"
          "umount /mnt\n")


def rootfs(work: str) -> str:
    tree = os.path.join(work, "rootfs")
    os.makedirs(tree)
    if not os.path.exists(ROOTFS_TAR):
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", tree, "http://deb.debian.org/debian"],
                       check=True, capture_output=True)
    else:
        with tarfile.open(ROOTFS_TAR) as tar:
            tar.extractall(tree, numeric_owner=True)
    return tree


def lazyfs_cli(config: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", config], check=True,
                          capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time the proxy adds per request")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    guest = prepare_guest()
    work = tempfile.mkdtemp(prefix="lazyfs-bench-vm-", dir="/var/tmp")
    try:
        local = LocalRef(os.path.join(work, "layout"), "debian")
        trio.run(lambda: create_image(local, from_dir=rootfs(work)))
        raw = os.path.join(work, "disk.raw")
        trio.run(flatten_image, local, raw)
        size = os.path.getsize(raw)
        guest.run("true", timeout=120)  # build and cache the initrd outside the measurement
        base = []
        for _ in range(args.runs):
            r = guest.run(SCRIPT, drives=[Drive(raw, read_only=True)], timeout=300)
            assert r.returncode == 0, r.console[-2000:]
            base.append(r.seconds)
        with running_registry(os.path.join(work, "registry")) as reg, \
                FaultProxy.running_in_thread(reg.port) as proxy:
            ref = f"{reg.registry}/bench/debian:1"

            async def push():
                async with ImageOpener(Config(registries=(RegistrySettings(reg.registry, plain_http=True),))) as o:
                    await push_image(o, local, parse_reference(ref))

            trio.run(push)
            proxy.faults.latency = args.rtt_ms / 1000
            via = f"127.0.0.1:{proxy.port}/bench/debian:1"
            lazy, fetched = [], []
            for i in range(args.runs):
                cfg = os.path.join(work, f"config{i}.json")
                run_dir = os.path.join(work, f"run{i}")
                with open(cfg, "w") as f:
                    json.dump({"run_dir": run_dir, "state_dir": os.path.join(work, f"state{i}"),
                               "cache_root": os.path.join(work, f"cache{i}"), "trace_record_seconds": 0,
                               "writable_root": os.path.join(work, f"w{i}"),
                               "registries": [{"host": f"127.0.0.1:{proxy.port}", "plain_http": True}]}, f)
                export = os.path.join(work, f"export{i}")
                started = time.monotonic()
                lazyfs_cli(cfg, "export", via, export)
                try:
                    r = guest.run(SCRIPT, drives=[Drive(os.path.join(export, "disk.img"), read_only=True)], timeout=300)
                    total = time.monotonic() - started
                    assert r.returncode == 0, r.console[-2000:]
                    stats = json.loads(lazyfs_cli(cfg, "stats", "--json"))
                    fetched.append(stats["scheduler"]["bytes_fetched"])
                    lazy.append(total)
                finally:
                    lazyfs_cli(cfg, "umount", export)
                    call(os.path.join(run_dir, "lazyfs.sock"), "stop")
        b, l_ = statistics.median(base), statistics.median(lazy)
        print(f"image: {size / 1e6:.0f} MB ext4 (Debian minbase), proxy RTT {args.rtt_ms:.0f} ms, {args.runs} runs each")
        print(f"local raw file, guest boot + program: {b:.2f} s (median)")
        print(f"lazyfs export (cold cache, export included): {l_:.2f} s (median)   ratio lazyfs/local = {l_ / b:.2f}")
        print(f"bytes fetched: {statistics.median(fetched) / 1e6:.1f} MB = {statistics.median(fetched) / size:.1%} of the image")
        print(json.dumps({"local_s": base, "lazyfs_s": lazy, "fetched": fetched, "size": size, "rtt_ms": args.rtt_ms}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
