#!/usr/bin/env python3
"""Benchmark remote fetching (issue 4): cold sequential read vs curl, and the chunk-size trade-off.

One run, one local docker-registry on 127.0.0.1 (``tests.support.registry``):

* Source: an ext4 image (``mkfs.ext4 -d``) of real binaries and libraries
  (by default /usr/lib/x86_64-linux-gnu, /usr/lib/jvm, /usr/bin, /usr/share —
  as many as make >= --min-bytes of data), hard-linked into a staging tree so
  nothing is copied.
* (a) cold sequential read of the whole device through ``lazyfs.serve.host.Host``
  (a child process, fresh cache dir, default config, 8 concurrent 4 MiB reads)
  vs ``curl`` of the same layer blob from the same registry to /dev/null: on
  loopback, then from a client network namespace across a veth pair shaped
  with ``tc tbf`` (--link-mbit; see benchnet.py). Also the same read from the
  local OCI layout (no network, no cache: the decode ceiling).
* (b) for chunk sizes 64K..1M (image re-created and pushed at each):
  - random 4 KiB reads (same blocks at every size, drawn among data blocks,
    readahead off): bytes fetched / bytes read and ranged GETs;
  - a startup workload: the block reads the kernel issued while ``ls -lR`` and
    reading every 25th file ran on the ext4 — recorded once with nbdkit's log
    filter under nbdfuse + a loop device — replayed against lazyfs (default
    readahead) through ``FaultProxy`` with --rtt of latency per request and
    --startup-mbit of bandwidth,
    concurrently where the kernel had them in flight together: bytes fetched,
    GETs and time.

Usage: scripts/bench/fetch.py [--source DIR ...] [--workdir DIR] [--reads 2000] [--rtt 0.02]
                              [--startup-mbit 100] [--link-mbit 1000,250] [--no-sequential]
(--reads 0 --no-sequential: only the startup replay, e.g. at another --rtt / --startup-mbit.)
Needs root (loop devices, FUSE). Everything it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchlib import nbdfuse_file, run_header  # noqa: E402
from benchnet import ShapedLink, relay  # noqa: E402
from mount import loop_mount  # noqa: E402
from lazyfs.config import Config, RegistrySettings  # noqa: E402
from lazyfs.device.index import MergedIndex  # noqa: E402
from lazyfs.fetch.direct import DirectChunkSource  # noqa: E402
from lazyfs.fetch.directory import DirectoryBackend  # noqa: E402
from lazyfs.format.reference import parse_reference  # noqa: E402
from lazyfs.image.local import create_image, mkfs_from_dir, open_local  # noqa: E402
from lazyfs.image.ref import LocalRef  # noqa: E402
from lazyfs.image.remote import ImageOpener, push_image  # noqa: E402
from lazyfs.serve.host import Host  # noqa: E402
from tests.support.proxy import FaultProxy  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402

DEFAULT_SOURCES = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/jvm", "/usr/bin", "/usr/share", "/usr/lib"]
CHUNK_SIZES = [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]
READ_SIZE = 4 << 20
READ_WINDOW = 8
STARTUP_EVERY_NTH_FILE = 25
STEP_TIMEOUT = 300  # seconds any one measured step may take
PROFILE_DIR = ""  # --profile DIR: py-spy records each sequential child there


def run(cmd: list[str], timeout: float = STEP_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, timeout=timeout, **kw)


def du_bytes(path: str) -> int:
    return int(subprocess.run(["du", "-sB1", path], capture_output=True, text=True, timeout=600).stdout.split()[0])


def stage_tree(sources: list[str], tree: str, min_bytes: int) -> list[str]:
    """Hard-link source trees under *tree* until they hold >= *min_bytes* (no data is copied)."""
    os.makedirs(tree)
    used, total = [], 0
    for src in sources:
        if total >= min_bytes:
            break
        if not os.path.isdir(src) or any(src.startswith(u + "/") or u.startswith(src + "/") for u in used):
            continue
        dst = os.path.join(tree, src.strip("/").replace("/", "_"))
        run(["cp", "-al", src, dst], timeout=600)
        used.append(src)
        total += du_bytes(dst)
    if total < min_bytes:
        raise SystemExit(f"only {total / 1e9:.2f} GB in {used}; give more --source trees")
    return used


# ---------------------------------------------------------------- the startup trace (nbdkit log)


def startup_commands(mnt: str) -> str:
    """``ls -lR`` of the whole tree, then read every Nth regular file (sorted paths)."""
    return (f"ls -lR {mnt} >/dev/null && find {mnt} -type f | LC_ALL=C sort | "
            f"awk 'NR % {STARTUP_EVERY_NTH_FILE} == 0' | xargs -d '\\n' cat >/dev/null")


def record_startup_trace(raw: str, work: str) -> list[list[tuple[int, int]]]:
    """Run the startup workload on *raw* served by nbdkit (log filter) + nbdfuse + loop; return its reads.

    Reads are grouped into batches: a batch is a maximal run of reads that
    overlapped in time at nbdkit (the kernel had them in flight together).
    """
    fusedir, mnt, log = os.path.join(work, "nbd"), os.path.join(work, "nbd-mnt"), os.path.join(work, "nbdkit.log")
    os.makedirs(mnt)
    # attached exactly as `lazyfs mount` attaches its exported file (read-only, direct I/O)
    with nbdfuse_file(raw, fusedir, filters=("--filter=log",), plugin_args=(f"logfile={log}",)) as nbd_file, \
            loop_mount(nbd_file, mnt):
        run(["sh", "-c", startup_commands(mnt)], timeout=600)
    return parse_nbdkit_log(log)


_START = re.compile(r"connection=\d+ Read id=(\d+) offset=0x([0-9a-f]+) count=0x([0-9a-f]+)")
_END = re.compile(r"connection=\d+ \.\.\.Read id=(\d+)")


def parse_nbdkit_log(path: str) -> list[list[tuple[int, int]]]:
    batches: list[list[tuple[int, int]]] = []
    in_flight: set[str] = set()
    with open(path) as f:
        for line in f:
            m = _START.search(line)
            if m:
                if not in_flight:
                    batches.append([])
                in_flight.add(m.group(1))
                batches[-1].append((int(m.group(2), 16), int(m.group(3), 16)))
                continue
            m = _END.search(line)
            if m:
                in_flight.discard(m.group(1))
    return batches


# ---------------------------------------------------------------- lazyfs measurements


def host_config(work: str, registry: str, **overrides) -> Config:
    cache = tempfile.mkdtemp(prefix="cache-", dir=work)
    return dataclasses.replace(
        Config(run_dir=os.path.join(work, "run"), state_dir=os.path.join(work, "state"), cache_root=cache,
               writable_root=os.path.join(work, "writable"), cache_size=64 << 30, trace_record_seconds=0,
               trace_replay=False, registries=(RegistrySettings(registry, plain_http=True),)),
        **overrides)


def with_fresh_cache(fn, config: Config, *args) -> dict:
    """``trio.run(fn, config, *args)``, then delete the cache it filled."""
    try:
        return trio.run(fn, config, *args)
    finally:
        shutil.rmtree(config.cache_root, ignore_errors=True)


async def settle(host: Host, timeout: float = 60) -> None:
    """Wait (bounded) until no fetch is queued or running (readahead included)."""
    with trio.move_on_after(timeout):
        while host.scheduler.statistics()["in_flight"]:
            await trio.sleep(0.01)


def fetch_counts(host: Host) -> dict:
    st = host.scheduler.statistics()
    flat = host.flat.statistics() if host.flat is not None else {}
    return {"bytes_fetched": st["bytes_fetched"], "ranged_gets": st["ranged_gets"], "fetches": st["fetches"],
            "decode_hops": st.get("decode_hops"),  # the disk writes of the cold read, per tier:
            "chunk_file_bytes": st["cache"]["bytes_written"], "flat_bytes": flat.get("bytes_written", 0)}


async def sequential_read(config: Config, ref: str) -> dict:
    async with Host.open(config) as host:
        att = await host.attach(ref)
        device = att.device
        total = 0
        started = time.perf_counter()
        sem = trio.Semaphore(READ_WINDOW)

        async def one(offset: int) -> None:
            nonlocal total
            try:
                n = len(await device.read(offset, READ_SIZE))
                total += n  # not `total += len(await ...)`: that reads total before the await
            finally:
                sem.release()

        async with trio.open_nursery() as nursery:
            for offset in range(0, device.size, READ_SIZE):
                await sem.acquire()
                nursery.start_soon(one, offset)
        seconds = time.perf_counter() - started
        await settle(host)
        return {"seconds": seconds, "bytes_read": total, **fetch_counts(host)}


async def local_read(ref: LocalRef) -> dict:
    image, layout = await open_local(ref)
    device = image.device(DirectChunkSource(DirectoryBackend(layout.path)))
    sem = trio.Semaphore(READ_WINDOW)
    started = time.perf_counter()

    async def one(offset: int) -> None:
        try:
            await device.read(offset, READ_SIZE)
        finally:
            sem.release()

    async with trio.open_nursery() as nursery:
        for offset in range(0, image.virtual_size, READ_SIZE):
            await sem.acquire()
            nursery.start_soon(one, offset)
    return {"seconds": time.perf_counter() - started}


async def random_reads(config: Config, ref: str, offsets: list[int]) -> dict:
    async with Host.open(dataclasses.replace(config, readahead_chunks=0)) as host:
        att = await host.attach(ref)
        started = time.perf_counter()
        for offset in offsets:
            await att.device.read(offset, 4096)
        seconds = time.perf_counter() - started
        await settle(host)
        return {"seconds": seconds, "bytes_read": 4096 * len(offsets), **fetch_counts(host)}


async def replay_startup(config: Config, ref: str, batches: list[list[tuple[int, int]]]) -> dict:
    async with Host.open(config) as host:
        att = await host.attach(ref)
        started = time.perf_counter()
        for batch in batches:
            async with trio.open_nursery() as nursery:
                for offset, count in batch:
                    nursery.start_soon(att.device.read, offset, count)
        seconds = time.perf_counter() - started
        await settle(host)
        return {"seconds": seconds, **fetch_counts(host)}


def data_blocks(ref: LocalRef) -> list[tuple[int, int]]:
    image, _ = trio.run(open_local, ref)
    index = MergedIndex(image.layers, image.virtual_size // 4096)
    return [(s.start, s.end) for s in index.segments]


def pick_random_blocks(segments: list[tuple[int, int]], n: int, seed: int = 4) -> list[int]:
    """*n* byte offsets of 4 KiB blocks drawn uniformly among data blocks."""
    cumulative, total = [], 0
    for start, end in segments:
        total += end - start
        cumulative.append(total)
    rng = random.Random(seed)
    offsets = []
    for _ in range(n):
        k = rng.randrange(total)
        i = bisect.bisect_right(cumulative, k)
        before = cumulative[i - 1] if i else 0
        offsets.append((segments[i][0] + k - before) * 4096)
    return offsets


def distinct_blocks(batches: list[list[tuple[int, int]]]) -> int:
    blocks = set()
    for batch in batches:
        for offset, count in batch:
            blocks.update(range(offset // 4096, (offset + count + 4095) // 4096))
    return len(blocks)


async def push(registry: str, local: LocalRef, ref: str) -> None:
    async with ImageOpener(Config(registries=(RegistrySettings(registry, plain_http=True),))) as opener:
        await push_image(opener, local, parse_reference(ref))


def curl_blob(url: str, prefix: list[str] = ()) -> float:
    started = time.perf_counter()
    out = run([*prefix, "curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}", url],
              capture_output=True, text=True).stdout
    seconds = time.perf_counter() - started
    if int(out) <= 0:
        raise RuntimeError(f"curl {url} downloaded nothing")
    return seconds


def registry_request_ms(port: int, path: str, blob_size: int, n: int = 200) -> float:
    """Mean time of one 64 KiB ranged GET on a kept-alive connection (the registry's own cost per request)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        started = time.perf_counter()
        for i in range(n):
            offset = (i * 7919 * 65536) % max(1, blob_size - 65536)
            conn.request("GET", path, headers={"Range": f"bytes={offset}-{offset + 65535}"})
            response = conn.getresponse()
            response.read()
            if response.status != 206:
                raise RuntimeError(f"ranged GET of {path}: HTTP {response.status}")
        return (time.perf_counter() - started) / n * 1000
    finally:
        conn.close()


def child_sequential(prefix: list[str], registry: str, ref: str, work: str, tree: str | None = None) -> dict:
    """``sequential_read`` in a child process (in the client namespace when *prefix* says so), with the
    lazyfs of source tree *tree* (another checkout gives a before/after in the same run)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}  # as the daemon runs (lazyfs/serve/malloc.py)
    if tree is None:  # this tree's daemon also sets MALLOC_TRIM_THRESHOLD_ (a baseline tree runs as it did)
        env["MALLOC_TRIM_THRESHOLD_"] = str(64 << 20)
    script = os.path.abspath(__file__) if tree is None else os.path.join(tree, "scripts", "bench", "fetch.py")
    profile = []
    if PROFILE_DIR:  # --profile: py-spy samples the child (collapsed stacks, threads apart, idle excluded)
        name = f"{'base' if tree else 'this'}-{len(os.listdir(PROFILE_DIR))}.txt"
        profile = [shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-r", "250", "-f", "raw", "--threads", "-o", os.path.join(PROFILE_DIR, name), "--"]
    out = run([*prefix, *profile, sys.executable, script, "--child-sequential", registry, ref, work],
              capture_output=True, text=True, env=env).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", action="append", help="directory tree(s) for the ext4 image (repeatable)")
    ap.add_argument("--min-bytes", type=int, default=1_200_000_000, help="least data in the image")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reads", type=int, default=2000, help="random 4 KiB reads per chunk size")
    ap.add_argument("--rtt", type=float, default=0.02, help="latency the proxy adds per request (s)")
    ap.add_argument("--startup-mbit", type=float, default=100, help="bandwidth of the startup replay (0: unlimited)")
    ap.add_argument("--link-mbit", type=lambda t: [int(x) for x in t.split(",") if x], default=[1000, 250],
                    help="shaped links to repeat (a) on, Mbit/s, comma-separated ('' for none)")
    ap.add_argument("--no-sequential", action="store_true", help="skip (a); only the chunk-size study")
    ap.add_argument("--no-chunk-sizes", action="store_true", help="skip (b) and its startup trace; only (a)")
    ap.add_argument("--baseline-tree", default=None,
                    help="another lazyfs checkout (e.g. main) whose sequential read runs too, in the same run")
    ap.add_argument("--repeat", type=int, default=1, help="sequential reads per tree and link (alternating; best kept)")
    ap.add_argument("--profile", default="", metavar="DIR",
                    help="record a py-spy profile (collapsed stacks) of each sequential read child into DIR")
    ap.add_argument("--child-sequential", nargs=3, metavar=("REGISTRY", "REF", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = os.path.abspath(args.profile) if args.profile else ""
    if PROFILE_DIR:
        os.makedirs(PROFILE_DIR, exist_ok=True)
    if args.child_sequential:
        registry, ref, work = args.child_sequential
        print(json.dumps(with_fresh_cache(sequential_read, host_config(work, registry), ref)))
        return
    if os.geteuid() != 0:
        raise SystemExit("fetch.py needs root (loop devices, FUSE)")
    began = time.monotonic()
    work = tempfile.mkdtemp(prefix="lazyfs-bench-fetch-", dir=args.workdir)
    results: dict = run_header()
    try:
        tree = os.path.join(work, "tree")
        used = stage_tree(args.source or DEFAULT_SOURCES, tree, args.min_bytes)
        raw = os.path.join(work, "disk.ext4")
        mkfs_from_dir(tree, raw)
        allocated = du_bytes(raw)
        results["source"] = {"trees": used, "virtual": os.path.getsize(raw), "allocated": allocated}
        print(f"ext4 of {', '.join(used)}: {os.path.getsize(raw) / 1e9:.2f} GB virtual, "
              f"{allocated / 1e9:.2f} GB allocated", flush=True)

        batches = [] if args.no_chunk_sizes else record_startup_trace(raw, work)
        trace_reads = sum(len(b) for b in batches)
        trace_bytes = sum(c for b in batches for _, c in b)
        trace_distinct = distinct_blocks(batches) * 4096
        results["startup_trace"] = {"reads": trace_reads, "batches": len(batches), "bytes": trace_bytes,
                                    "distinct_bytes": trace_distinct}
        print(f"startup trace: {trace_reads} reads in {len(batches)} concurrent batches, {human(trace_bytes)} "
              f"({human(trace_distinct)} distinct)", flush=True)

        with running_registry(os.path.join(work, "registry")) as reg:
            images: dict[int, tuple[LocalRef, str, dict]] = {}

            def make(chunk_size: int) -> tuple[LocalRef, str, dict]:
                local = LocalRef(os.path.join(work, f"layout-{chunk_size >> 10}k"), "v1")
                summary = trio.run(lambda: create_image(local, from_file=raw, chunk_size=chunk_size))
                ref = f"{reg.registry}/bench/fetch:{chunk_size >> 10}k"
                trio.run(push, reg.registry, local, ref)
                images[chunk_size] = (local, ref, summary)
                return images[chunk_size]

            # (a) cold sequential read vs curl of the blob: on loopback, then across a shaped link
            local, ref, summary = make(256 << 10)
            blob_size = summary["layer_size"]
            blob_path = f"/v2/bench/fetch/blobs/{summary['layer']}"
            if not args.no_sequential:
                curl_blob(f"{reg.url}{blob_path}")  # warm the registry's page cache, as lazyfs' reads will find it
                loc = trio.run(local_read, local)
                print(f"\n(a) cold sequential read: {human(os.path.getsize(raw))} device, {human(allocated)} data, "
                      f"{human(blob_size)} blob; local layout, no network or cache: "
                      f"{blob_size / loc['seconds'] / 1e6:.0f} MB/s of blob ({loc['seconds']:.2f} s)")
                print(f"  {'link':>9} {'curl MB/s':>10} {'lazyfs MB/s':>12} {'lazyfs/curl':>12} {'GETs':>6}", flush=True)
                results["sequential"] = {"blob_bytes": blob_size, "local_layout_seconds": loc["seconds"], "links": []}
                for mbit in [0] + args.link_mbit:
                    with contextlib.ExitStack() as stack:
                        prefix, registry = [], reg.registry
                        if mbit:
                            link = stack.enter_context(ShapedLink(mbit))
                            registry = stack.enter_context(relay(link, reg.port))
                            prefix = link.nsenter("client")
                        curl_s = [curl_blob(f"http://{registry}{blob_path}", prefix)]
                        # --repeat: this tree and the baseline alternate (ABBA...), each keeps its fastest
                        # run, so a load change on a shared machine hits both alike
                        runs, base_runs = [], []
                        for r in range(args.repeat):
                            order = [None, args.baseline_tree] if r % 2 == 0 else [args.baseline_tree, None]
                            for tree in order:
                                if tree is None:
                                    runs.append(child_sequential(prefix, registry, ref.replace(reg.registry, registry), work))
                                elif args.baseline_tree:
                                    base_runs.append(child_sequential(prefix, registry, ref.replace(reg.registry, registry),
                                                                      work, tree))
                        seq = min(runs, key=lambda x: x["seconds"])
                        seq["all_seconds"] = [x["seconds"] for x in runs]
                        base = min(base_runs, key=lambda x: x["seconds"]) if base_runs else None
                        if base is not None:
                            base["all_seconds"] = [x["seconds"] for x in base_runs]
                            print(f"  {'':>9} runs (s): this {[round(x, 2) for x in seq['all_seconds']]}, "
                                  f"baseline {[round(x, 2) for x in base['all_seconds']]}", flush=True)
                        curl_s.append(curl_blob(f"http://{registry}{blob_path}", prefix))
                    row = {"link_mbit": mbit or None, "curl_seconds": curl_s, "lazyfs": seq,
                           "curl_MBps": blob_size / min(curl_s) / 1e6,
                           "lazyfs_MBps": seq["bytes_fetched"] / seq["seconds"] / 1e6,
                           "ratio": min(curl_s) / seq["seconds"]}
                    if base is not None:
                        row["baseline"] = base
                        row["baseline_ratio"] = min(curl_s) / base["seconds"]
                        print(f"  {'':>9} baseline tree {args.baseline_tree}: {base['bytes_fetched'] / base['seconds'] / 1e6:.1f} MB/s, "
                              f"{row['baseline_ratio']:.2f}x of curl", flush=True)
                    results["sequential"]["links"].append(row)
                    print(f"  {(str(mbit) + ' Mbit') if mbit else 'loopback':>9} {row['curl_MBps']:>10.1f} "
                          f"{row['lazyfs_MBps']:>12.1f} {row['ratio']:>11.2f}x {seq['ranged_gets']:>6}", flush=True)

            # (b) chunk sizes: random reads and the startup workload
            if args.no_chunk_sizes:
                _report(results, began)
                return
            results["registry_ms_per_request"] = registry_request_ms(reg.port, blob_path, blob_size)
            offsets = pick_random_blocks(data_blocks(local), args.reads)
            rows = []
            print(f"\n(b) per chunk size: {args.reads} random 4 KiB reads (readahead off); startup replay at "
                  f"{args.rtt * 1000:.0f} ms per request, {args.startup_mbit:g} Mbit/s (default readahead)")
            print(f"  {'chunk':>6} {'stored':>9} {'rand fetched/read':>17} {'rand GETs':>9} "
                  f"{'start fetched':>13} {'fetched/distinct':>16} {'start GETs':>10} {'start s':>8}", flush=True)
            for chunk_size in CHUNK_SIZES:
                local_cs, ref_cs, summary_cs = images.get(chunk_size) or make(chunk_size)
                rnd = (with_fresh_cache(random_reads, host_config(work, reg.registry), ref_cs, offsets) if offsets
                       else {"seconds": 0.0, "bytes_read": 0, "bytes_fetched": 0, "ranged_gets": 0, "fetches": 0})
                with FaultProxy.running_in_thread(reg.port) as proxy:
                    proxy.faults.latency = args.rtt
                    proxy.faults.bandwidth = args.startup_mbit * 1e6 / 8 if args.startup_mbit else None
                    proxied = f"{proxy.host}:{proxy.port}"
                    startup = with_fresh_cache(replay_startup, host_config(work, proxied),
                                       ref_cs.replace(reg.registry, proxied), batches)
                    startup["proxy_requests"] = proxy.statistics().requests
                row = {"chunk_size": chunk_size, "stored_bytes": summary_cs["layer_size"],
                       "random": rnd, "random_amplification": rnd["bytes_fetched"] / max(1, rnd["bytes_read"]),
                       "random_ms_per_miss": rnd["seconds"] / max(1, rnd["fetches"]) * 1000,
                       "startup": startup, "startup_amplification": startup["bytes_fetched"] / trace_distinct}
                rows.append(row)
                print(f"  {chunk_size >> 10:>5}K {human(summary_cs['layer_size']):>9} "
                      f"{row['random_amplification']:>16.1f}x {rnd['ranged_gets']:>9} "
                      f"{human(startup['bytes_fetched']):>13} {row['startup_amplification']:>15.2f}x "
                      f"{startup['ranged_gets']:>10} {startup['seconds']:>8.2f}", flush=True)
                if chunk_size != 256 << 10:
                    shutil.rmtree(local_cs.path, ignore_errors=True)
            results["chunk_sizes"] = rows
            if args.reads:
                print(f"  serial random misses took {min(r['random_ms_per_miss'] for r in rows):.1f}-"
                      f"{max(r['random_ms_per_miss'] for r in rows):.1f} ms each on loopback; the registry alone takes "
                      f"{results['registry_ms_per_request']:.1f} ms per 64 KiB ranged GET (kept-alive http.client)")
        _report(results, began)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report(results: dict, began: float) -> None:
    results["seconds"] = time.monotonic() - began
    results["loadavg_end"] = os.getloadavg()
    print(f"\ntotal {results['seconds']:.0f} s; load average at start {results['loadavg_start'][0]:.1f}, "
          f"at end {results['loadavg_end'][0]:.1f} (other work on this machine makes numbers noisy)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
