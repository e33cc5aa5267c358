#!/usr/bin/env python3
"""Cost of one hydration progress read (``Hydrator.statistics()``: `lazyfs stats`, /metrics).

Progress is a count the chunk cache's ``watch`` keeps; the baseline, measured in the same run,
is the full recount over the image's chunk list that statistics() used to do on every call.
Synthetic images of --chunks chunks (half of them local, in a memory-only ChunkCache): no disk,
no network, so the numbers are the bookkeeping alone.

Usage: scripts/bench/hydrate_stats.py [--chunks 1000 100000 1000000] [--calls 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import print_results, run_header  # noqa: E402
from lazyfs.fetch.cache import ChunkCache  # noqa: E402
from lazyfs.format.layer import ChunkLocation  # noqa: E402
from lazyfs.serve.hydrate import HydratePolicy, Hydrator  # noqa: E402


def recount(locations, cache) -> tuple[int, int]:
    """The old statistics(): every chunk looked up in the cache."""
    chunks = nbytes = 0
    for loc in locations:
        if loc.digest in cache:
            chunks += 1
            nbytes += loc.compressed_length
    return chunks, nbytes


def per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(n: int, calls: int) -> dict:
    locations = [ChunkLocation(i.to_bytes(32, "big"), "sha256:" + "0" * 64, i * 4096, 4096, 16384, 1)
                 for i in range(n)]
    cache = ChunkCache(None, 0, memory_bytes=1 << 40)
    for loc in locations[::2]:
        cache.admit(loc.digest, b"x")
    started = time.perf_counter()
    hydrator = Hydrator(locations, HydratePolicy(), cache=cache, download=None, default_rate=0, max_range=1 << 20)
    attach_s = time.perf_counter() - started
    stats = hydrator.statistics()
    assert (stats["chunks_local"], stats["bytes_local"]) == recount(locations, cache)
    kept = per_call(hydrator.statistics, calls)
    baseline = per_call(lambda: recount(locations, cache), max(1, min(calls, 20_000_000 // n)))
    for loc in locations[1::2]:  # the rest arrives: each arrival costs one dict lookup per watcher
        cache.admit(loc.digest, b"x")
    assert hydrator.statistics()["hydrated"]
    hydrator.cancel()
    return {"chunks": n, "statistics_us": round(kept * 1e6, 2), "recount_us": round(baseline * 1e6, 2),
            "recount_over_statistics": round(baseline / kept, 1), "count_at_attach_ms": round(attach_s * 1e3, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {**run_header(), "rows": [measure(n, args.calls) for n in args.chunks]}
    results["loadavg_end"] = os.getloadavg()
    for row in results["rows"]:
        print(f"{row['chunks']:>9} chunks: statistics() {row['statistics_us']:>9.2f} us, recount "
              f"{row['recount_us']:>11.2f} us ({row['recount_over_statistics']}x), "
              f"one count at attach {row['count_at_attach_ms']} ms", file=sys.stderr)
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
