#!/usr/bin/env python3
"""Does the buffered loop change the cold path? Bytes fetched and time, buffered vs direct loop.

A read-only loop attached buffered reads the FUSE-exported disk.img through its page cache,
so the kernel's readahead on that file may ask lazyfs for more than ext4 asked the loop for
(the direct-I/O loop passes ext4's requests through as they are). Same image, fresh cache
and fresh daemon per route, page cache dropped: ``lazyfs mount`` with ``read_only_loop``
"direct" and "buffered", then a startup-like workload in the mount (``ls -lR`` and reading
every --every-th file). Printed per route: seconds, bytes the device read (what FUSE asked),
bytes fetched from the registry, demand misses; and buffered / direct ratios.

The image: a copy of /usr/lib/python3* and /usr/share/doc of this host (many small files).
Usage: scripts/bench/loop_cold.py [--repeat 3] [--every 5] [--json OUT]. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import drop_caches, push_tree_image  # noqa: E402
from mount import Lazyfs, run  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402


def workload(root: str, every: int) -> None:
    run(["ls", "-lR", root])
    files = sorted(p for p in glob.glob(os.path.join(root, "**"), recursive=True) if os.path.isfile(p)
                   and not os.path.islink(p))
    for path in files[::every]:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--every", type=int, default=5, help="read every N-th file")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("loop_cold.py needs root")
    work = tempfile.mkdtemp(prefix="lazyfs-bench-loopcold-", dir=args.workdir)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "loadavg_start": os.getloadavg(), "runs": {}}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        tree = os.path.join(work, "tree")
        os.makedirs(tree)
        for src in sorted(glob.glob("/usr/lib/python3*")) + ["/usr/share/doc"]:
            run(["cp", "-a", src, os.path.join(tree, os.path.basename(src))])
        reg = stack.enter_context(running_registry(os.path.join(work, "registry")))
        _, ref = push_tree_image(tree, work, reg.registry, "cold")
        for i in range(args.repeat):
            for route in ("direct", "buffered"):
                host = Lazyfs(os.path.join(work, f"{route}-{i}"), reg.registry, trace_record_seconds=0,
                                  read_only_loop=route, hydrated_max_bytes=0)
                try:
                    target = os.path.join(host.base, "mnt")
                    drop_caches()
                    started = time.perf_counter()
                    mounted = host.mount(ref, target)
                    assert mounted["loop_route"] == route, mounted
                    workload(target, args.every)
                    seconds = time.perf_counter() - started
                    stats = host.stats(target)
                    out = {"seconds": seconds, "device_bytes_read": stats["device"]["bytes_read"],
                           "bytes_fetched": stats["scheduler"]["bytes_fetched"],
                           "demand_misses": stats["demand_misses"]}
                finally:
                    host.close()
                results["runs"].setdefault(route, []).append(out)
                print(f"  {route:8s} run {i}: {out['seconds']:6.2f} s, device read {out['device_bytes_read'] / 1e6:7.1f} MB, "
                      f"fetched {out['bytes_fetched'] / 1e6:7.1f} MB, {out['demand_misses']} demand misses", flush=True)
        med = {route: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for route, runs in results["runs"].items()}
        results["median"] = med
        for k in ("seconds", "device_bytes_read", "bytes_fetched", "demand_misses"):
            print(f"  median {k}: direct {med['direct'][k]:.3g}, buffered {med['buffered'][k]:.3g}, "
                  f"buffered / direct {med['buffered'][k] / med['direct'][k]:.2f}x", flush=True)
        results["loadavg_end"] = os.getloadavg()
        print(f"  load average {results['loadavg_start'][0]:.2f} -> {results['loadavg_end'][0]:.2f} "
              f"(other jobs share this machine)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
