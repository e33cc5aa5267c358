#!/usr/bin/env python3
"""Benchmark the containerd path (issue 8): time to the first output of ``ctr run``, lazyfs vs overlayfs.

One run. The same Debian root filesystem (debootstrap minbase, cached under /var/cache) becomes
(a) an ordinary OCI image (one gzip tar layer) and (b) a lazyfs image (`lazyfs create --from-dir`);
both go to one local docker-registry. containerd, ``ctr``, ``lazyfs rpull``, the snapshotter and
its daemon run in a client network namespace whose only way to the registry is a veth pair shaped
with ``tc tbf`` (benchnet.py), through a counting ``FaultProxy`` on the registry's side.

For each variant, cold (fresh containerd root, snapshotter root and chunk cache; page cache dropped;
the services — containerd, and for lazyfs the host daemon and the snapshotter — already running):

* lazyfs: ``lazyfs rpull REF`` then ``ctr run --snapshotter lazyfs REF ...``;
* overlayfs: ``ctr image pull --snapshotter overlayfs REF`` then ``ctr run --snapshotter overlayfs REF ...``;

timing pull, first line of output, and exit of a startup-like command (os-release, dpkg's database,
perl, ``ls -lR /usr``), and counting the bytes the registry sent.

Usage: scripts/bench/containerd.py [--mbit 100] [--latency 0] [--rootfs-tar PATH] [--workdir DIR] [--json OUT]
Needs root. Everything it starts is stopped, and everything it mounts unmounted, on exit.
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
import time

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

from benchnet import ShapedLink, relay  # noqa: E402
from lazyfs.config import Config, RegistrySettings  # noqa: E402
from lazyfs.fetch.credentials import Credentials  # noqa: E402
from lazyfs.fetch.registry import RegistryClient  # noqa: E402
from lazyfs.format.reference import parse_reference  # noqa: E402
from lazyfs.image.local import create_image  # noqa: E402
from lazyfs.image.ref import LocalRef  # noqa: E402
from lazyfs.image.remote import ImageOpener, push_image  # noqa: E402
from lazyfs.serve import system  # noqa: E402
from lazyfs.serve.control import call  # noqa: E402
from tests.support.containerd import (  # noqa: E402
    SnapshotterProcess,
    oci_image_from_trees,
    push_oci_image,
    running_containerd,
)
from tests.support.proxy import FaultProxy  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402

ROOTFS_TARS = ("/var/cache/lazyfs-bench/bookworm-minbase.tar", "/var/cache/lazyfs-demo/debian-minbase.tar")
WORKLOAD = ("head -n1 /etc/os-release; dpkg -l | wc -l; perl -e 'print qq(perl ok\\n)'; "
            "ls -lR /usr > /dev/null; echo done")


def rootfs(tar: str | None, into: str) -> None:
    """The Debian tree: from a cached tar (or debootstrap, which needs the Debian mirror)."""
    tar = tar or next((t for t in ROOTFS_TARS if os.path.exists(t)), None)
    os.makedirs(into)
    if tar is None:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", into, "http://deb.debian.org/debian"],
                       check=True, capture_output=True)
    else:
        subprocess.run(["tar", "-C", into, "-xf", tar], check=True)
    os.makedirs(os.path.join(into, "root"), exist_ok=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed_run(command: list[str], timeout: float = 900.0) -> tuple[float, float, str]:
    """Run *command*; (seconds to its first line of output, seconds to its exit, output)."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line = proc.stdout.readline()
    first = time.monotonic() - start
    rest, err = proc.communicate(timeout=timeout)
    done = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}: {err}")
    return first, done, first_line + rest


def measure(variant: str, work: str, link: ShapedLink, proxy: FaultProxy, ref: str, config_path: str) -> dict:
    prefix = tuple(link.nsenter("client"))
    base = os.path.join(work, variant)
    os.makedirs(base)
    sn = None
    daemon_socket = os.path.join(work, "run", "lazyfs.sock")
    try:
        if variant == "lazyfs":
            # the host daemon runs as a service (contrib/containerd/lazyfs.service), as containerd does
            with open(os.path.join(base, "daemon.log"), "ab") as log:
                subprocess.Popen([*prefix, sys.executable, "-m", "lazyfs.cli", "daemon", "--config", config_path],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=os.path.dirname(os.path.dirname(HERE)))
            deadline = time.monotonic() + 60
            while not os.path.exists(daemon_socket) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.makedirs(os.path.join(base, "sn"))
            sn = SnapshotterProcess(os.path.join(base, "sn", "s.sock"), os.path.join(base, "sn", "root"),
                                    os.path.join(base, "sn", "writable"), config_path=config_path,
                                    prefix=prefix).start()
        plugins = {"lazyfs": sn.address} if sn else {}
        with running_containerd(os.path.join(base, "containerd"), plugins, prefix=prefix) as ctrd:
            drop_caches()
            proxy.reset_counters()
            start = time.monotonic()
            if variant == "lazyfs":
                done = subprocess.run([*prefix, sys.executable, "-m", "lazyfs.cli", "rpull", ref, "--address",
                                       ctrd.address, "--config", config_path], capture_output=True, text=True,
                                      cwd=os.path.dirname(os.path.dirname(HERE)))
                if done.returncode != 0:
                    raise RuntimeError(f"lazyfs rpull failed: {done.stderr}")
            else:
                ctrd.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref, timeout=3600)
            pulled = time.monotonic() - start
            first, done, output = timed_run(ctrd.ctr_command("run", "--rm", "--snapshotter",
                                                             "lazyfs" if variant == "lazyfs" else "overlayfs",
                                                             ref, f"bench-{variant}", "/bin/sh", "-c", WORKLOAD))
            stats = proxy.statistics()
            result = {"variant": variant, "pull_s": round(pulled, 3), "run_first_output_s": round(first, 3),
                      "run_exit_s": round(done, 3), "first_output_s": round(pulled + first, 3),
                      "total_s": round(pulled + done, 3), "bytes_from_registry": stats.body_bytes_to_client,
                      "requests": stats.requests, "output": output.strip().splitlines()}
            ctrd.remove_everything()
        return result
    finally:
        if sn is not None:
            sn.stop()
        with contextlib.suppress(Exception):
            call(daemon_socket, "stop", timeout=30)
        deadline = time.monotonic() + 30
        while os.path.exists(daemon_socket) and time.monotonic() < deadline:
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mbit", type=float, default=100.0, help="link rate, each direction (default 100)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request by the proxy")
    parser.add_argument("--rootfs-tar", help="a tar of the root filesystem (default: the cached Debian minbase)")
    parser.add_argument("--workdir", help="keep the work here (default: a temporary directory, removed)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, loop devices, containerd)")
    work = args.workdir or tempfile.mkdtemp(prefix="lazyfs-bench-containerd-")
    os.makedirs(work, exist_ok=True)
    try:
        tree = os.path.join(work, "rootfs")
        rootfs(args.rootfs_tar, tree)
        with contextlib.ExitStack() as stack:
            reg = stack.enter_context(running_registry(os.path.join(work, "registry")))
            proxy = stack.enter_context(FaultProxy.running_in_thread(reg.port))
            proxy.faults.latency = args.latency
            link = stack.enter_context(ShapedLink(args.mbit, tag="c"))
            remote = stack.enter_context(relay(link, proxy.port))
            oci = oci_image_from_trees([(tree, ())], cmd=("/bin/bash",))
            local = LocalRef(os.path.join(work, "layout"), "bookworm")
            created = trio.run(lambda: create_image(local, from_dir=tree))
            lazy_size = sum(os.path.getsize(os.path.join(local.path, "blobs", "sha256", f))
                            for f in os.listdir(os.path.join(local.path, "blobs", "sha256")))

            async def push():
                config = Config(registries=(RegistrySettings(reg.registry, plain_http=True),))
                async with ImageOpener(config) as opener:
                    await push_image(opener, local, parse_reference(f"{reg.registry}/bench/debian:lazyfs"))
                client = RegistryClient(reg.configs(), Credentials(None))
                try:
                    await push_oci_image(client, parse_reference(f"{reg.registry}/bench/debian:oci"), oci)
                finally:
                    await client.aclose()

            trio.run(push)
            config_path = os.path.join(work, "lazyfs.json")
            with open(config_path, "w") as f:
                json.dump({"run_dir": os.path.join(work, "run"), "state_dir": os.path.join(work, "state"),
                           "cache_root": os.path.join(work, "chunks"), "trace_record_seconds": 0,
                           "registries": [{"host": remote, "plain_http": True}]}, f)
            results = [
                measure("overlayfs", work, link, proxy, f"{remote}/bench/debian:oci", config_path),
                measure("lazyfs", work, link, proxy, f"{remote}/bench/debian:lazyfs", config_path),
            ]
        report = {"mbit": args.mbit, "latency_s": args.latency, "workload": WORKLOAD,
                  "oci_image_bytes": oci.blob_bytes, "lazyfs_image_bytes": lazy_size,
                  "lazyfs_virtual_size": created.get("virtual_size"), "results": results}
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        print()
        print("| variant | pull | run: first output | run: exit | first output from start | total | bytes pulled |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['variant']} | {r['pull_s']:.2f} s | {r['run_first_output_s']:.2f} s | {r['run_exit_s']:.2f} s "
                  f"| {r['first_output_s']:.2f} s | {r['total_s']:.2f} s | {r['bytes_from_registry'] / 1e6:.1f} MB |")
        return 0
    finally:
        for m in sorted(system.mounts(), key=lambda m: -len(m.mountpoint)):
            if m.mountpoint.startswith(work + "/"):
                subprocess.run(["umount", "-l", m.mountpoint], check=False)
        for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines():
            if work in line:
                subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
