#!/usr/bin/env python3
"""Benchmark `lazyfs index` (issue 17): index size and build time, and cold start through it (one run).

Image: an ordinary 3-layer gzip OCI image of host trees (--trees; default the Python
stdlib, Perl, and /etc + zoneinfo), or with --debian the Debian bookworm minbase root in
three layers (``debian_three_layers``: the root without /usr/share, /usr/share, a change
layer), pushed byte for byte to a local docker-registry.

* build: `lazyfs index` vs `lazyfs convert --no-cache` vs `umoci unpack` of the same
  image (page cache dropped before each); index bytes vs image bytes;
* cold start: a fresh daemon and cache, `lazyfs mount` then a workload (list the tree,
  read --files files spread over it), through a `FaultProxy` sharing --mbit of
  bandwidth and adding --rtt per request (loopback, no netns: the proxy shapes),
  for (1) the ordinary image through its index, (2) the converted image, (3) the
  full pull: every layer blob fetched through the same proxy, then `umoci unpack`.
  Bytes fetched are counted at the proxy.

Usage: scripts/bench/index.py [--workdir DIR] [--debian] [--mbit 100] [--rtt 0 0.02] [--files 300] [--rounds 1]
                              [--span-size 256K] [--json FILE]
Needs root, umoci, docker-registry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.support.ociimages import debian_three_layers, run, tar_tree, umoci_unpack, write_image  # noqa: E402
from tests.support.proxy import FaultProxy  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402

from benchlib import drop_caches, print_results  # noqa: E402  (this folder: sys.path[0] when run)

DEFAULT_TREES = ["/usr/lib/python3.11", "/usr/share/perl:/usr/lib/x86_64-linux-gnu/perl-base", "/etc:/usr/share/zoneinfo"]


def lazyfs(config: str, *args: str, json_out: bool = True) -> tuple[dict | str, float]:
    drop_caches()
    t = time.perf_counter()
    out = run([sys.executable, "-m", "lazyfs.cli", *args, *(["--json"] if json_out else []), "--config", config],
              timeout=3600, cwd=ROOT)
    seconds = time.perf_counter() - t
    return (json.loads(out) if json_out else out), seconds


def make_tars(work: str, trees: list[str]) -> list[str]:
    tars = []
    for i, spec in enumerate(trees):
        staging = os.path.join(work, f"tree{i}")
        for src in spec.split(":"):
            dst = os.path.join(staging, src.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copytree(src, dst, symlinks=True, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        tars.append(tar_tree(staging, os.path.join(work, f"layer{i}.tar")))
        shutil.rmtree(staging)
    return tars


def push_layout(registry: str, layout: str, tag: str, ref: str) -> None:
    """The layout's image into the registry byte for byte (lazyfs's registry client)."""
    import trio

    from lazyfs.config import Config, RegistrySettings
    from lazyfs.format.reference import parse_reference
    from lazyfs.image.layout import OciLayout
    from lazyfs.image.remote import ImageOpener

    src = OciLayout(layout)
    data, desc = src.read_manifest(tag)
    doc = json.loads(data)
    parsed = parse_reference(ref)

    async def push():
        async with ImageOpener(Config(registries=(RegistrySettings(registry, plain_http=True),))) as opener:
            for d in [doc["config"], *doc["layers"]]:
                await opener.client.push_blob(parsed.repo(), src.blob_path(d["digest"]), d["digest"])
            await opener.client.put_manifest(parsed, data, desc.media_type)

    trio.run(push)
    return doc


def workload(root: str, files: int) -> int:
    """List the whole tree, then read *files* regular files picked evenly (seeded); bytes read."""
    paths = []
    for dirpath, _, names in os.walk(root):
        paths += [os.path.join(dirpath, n) for n in names if os.path.isfile(os.path.join(dirpath, n))
                  and not os.path.islink(os.path.join(dirpath, n))]
    paths.sort()
    pick = random.Random(17).sample(paths, min(files, len(paths)))
    total = 0
    for p in pick:
        with open(p, "rb") as f:
            total += len(f.read())
    return total


def config_file(work: str, name: str, proxy_port: int, ledger_from: str | None = None) -> str:
    base = os.path.join(work, name)
    os.makedirs(base, exist_ok=True)
    if ledger_from:
        shutil.copytree(os.path.join(ledger_from, "convert", "converted"),
                        os.path.join(base, "cache", "convert", "converted"))
    path = os.path.join(base, "config.json")
    with open(path, "w") as f:
        json.dump({"run_dir": f"{base}/run", "state_dir": f"{base}/state", "cache_root": f"{base}/cache",
                   "writable_root": f"{base}/writable", "trace_record_seconds": 0, "trace_replay": False,
                   "registries": [{"host": f"127.0.0.1:{proxy_port}", "plain_http": True}]}, f)
    return path


def stop_daemon(run_dir: str) -> None:
    """Stop the daemon this run started for *run_dir* (its pid from the singleton lock), bounded."""
    from lazyfs.serve.singleton import owner_pid

    pid = owner_pid(run_dir)
    if not pid:
        return
    os.kill(pid, 15)
    for _ in range(100):
        if owner_pid(run_dir) is None:
            return
        time.sleep(0.1)


def cold_lazy(work: str, name: str, ref: str, proxy: FaultProxy, files: int, ledger_from: str | None) -> dict:
    config = config_file(work, name, proxy.port, ledger_from)
    target = os.path.join(work, name, "mnt")
    os.makedirs(target)
    proxy.reset_counters()
    drop_caches()
    t = time.perf_counter()
    out, _ = lazyfs(config, "mount", ref, target)
    mounted = time.perf_counter() - t
    try:
        read = workload(target, files)
        total = time.perf_counter() - t
        gets = proxy.requests("GET")
        fetched = sum(r.body_bytes for r in gets)
        ranged = [r.body_bytes for r in gets if r.range is not None]
        stats, _ = lazyfs(config, "stats", target)
        sched = stats["scheduler"]
        counts = {"demand_misses": stats.get("demand_misses"), "device_read_calls": stats["device"].get("reads"),
                  **{k: sched.get(k) for k in ("ranged_gets", "prefetched", "chain_spans", "window_reads",
                                               "decode_hops", "wasted_bytes")}}
    finally:
        run([sys.executable, "-m", "lazyfs.cli", "umount", target, "--config", config], cwd=ROOT)
        stop_daemon(os.path.join(work, name, "run"))
    return {"seconds": round(total, 3), "mount_seconds": round(mounted, 3), "bytes_fetched": fetched,
            "requests": len(gets), "mean_range_bytes": round(sum(ranged) / max(1, len(ranged))),
            "bytes_read": read, "via": out.get("via", ""), "attach_seconds": out.get("seconds"), "daemon": counts}


def cold_full(work: str, layout_doc: dict, repo: str, proxy: FaultProxy, files: int) -> dict:
    """Every blob through the proxy, then umoci unpack, then the same workload."""
    import urllib.request

    dest = os.path.join(work, "full")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.join(dest, "blobs", "sha256"))
    proxy.reset_counters()
    drop_caches()
    t = time.perf_counter()
    for d in [layout_doc["config"], *layout_doc["layers"]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.port}/v2/{repo}/blobs/{d['digest']}") as r, \
                open(os.path.join(dest, "blobs", "sha256", d["digest"].split(":")[1]), "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    manifest = json.dumps(layout_doc, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(manifest).hexdigest()
    with open(os.path.join(dest, "blobs", "sha256", digest), "wb") as f:
        f.write(manifest)
    with open(os.path.join(dest, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   "digest": f"sha256:{digest}", "size": len(manifest),
                   "annotations": {"org.opencontainers.image.ref.name": "v"}}]}, f)
    rootfs = umoci_unpack(dest, "v", os.path.join(work, "full-bundle"))
    read = workload(rootfs, files)
    total = time.perf_counter() - t
    fetched = sum(r.body_bytes for r in proxy.requests("GET"))
    shutil.rmtree(os.path.join(work, "full-bundle"), ignore_errors=True)
    return {"seconds": round(total, 3), "bytes_fetched": fetched, "bytes_read": read}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir")
    parser.add_argument("--trees", nargs="+", default=DEFAULT_TREES, help="one layer per entry (paths joined by :)")
    parser.add_argument("--debian", action="store_true", help="the 3-layer Debian minbase image instead of --trees")
    parser.add_argument("--mbit", type=float, default=100)
    parser.add_argument("--rtt", type=float, nargs="+", default=[0.0, 0.02])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--span-size", default="256K", help="passed to lazyfs index")
    parser.add_argument("--rounds", type=int, default=1, help="cold starts per RTT, the kinds interleaved")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    work = args.workdir or tempfile.mkdtemp(prefix="lazyfs-bench-index-", dir="/var/tmp")
    results: dict = {"trees": ["debian-minbase (3 layers)"] if args.debian else args.trees, "files": args.files,
                     "span_size": args.span_size}
    try:
        tars = debian_three_layers(work)[0] if args.debian else make_tars(work, args.trees)
        layout = os.path.join(work, "image")
        write_image(layout, "v", tars, compression="gzip")
        results["tar_bytes"] = sum(os.path.getsize(t) for t in tars)
        with running_registry(os.path.join(work, "registry")) as reg:
            ref = f"{reg.registry}/bench/app:v"
            doc = push_layout(reg.registry, layout, "v", ref)
            results["image_bytes"] = sum(d["size"] for d in doc["layers"]) + doc["config"]["size"]
            build = config_file(work, "build", reg.port)
            with open(build) as f:
                cfg = json.load(f)
            cfg["registries"] = [{"host": reg.registry, "plain_http": True}]
            with open(build, "w") as f:
                json.dump(cfg, f)
            summary, index_s = lazyfs(build, "index", ref, "--span-size", args.span_size)
            converted, convert_s = lazyfs(build, "convert", ref, f"{reg.registry}/bench/app:lazyfs", "--no-cache")
            drop_caches()
            t = time.perf_counter()
            umoci_unpack(layout, "v", os.path.join(work, "bundle"))
            umoci_s = time.perf_counter() - t
            shutil.rmtree(os.path.join(work, "bundle"), ignore_errors=True)
            results["build"] = {
                "index_s": round(index_s, 2), "index_in_process_s": summary["build_seconds"],
                "convert_s": round(convert_s, 2), "umoci_unpack_s": round(umoci_s, 2),
                "index_over_convert": round(index_s / convert_s, 2), "index_over_umoci": round(index_s / umoci_s, 2),
                "index_bytes": summary["index_bytes"], "image_bytes": results["image_bytes"],
                "index_ratio": round(summary["index_bytes"] / results["image_bytes"], 4),
                "converted_bytes": converted["image_bytes"],
                "layers": summary["layers"],
            }
            results["cold"] = []
            for rtt, round_ in [(rtt, r) for r in range(args.rounds) for rtt in args.rtt]:
                with FaultProxy.running_in_thread(reg.port) as proxy:
                    proxy.faults.bandwidth = args.mbit * 1e6 / 8
                    proxy.faults.latency = rtt
                    via = f"127.0.0.1:{proxy.port}/bench/app"
                    tag = f"rtt{int(rtt * 1000)}-{round_}"
                    row = {"mbit": args.mbit, "rtt_s": rtt, "round": round_,
                           "index": cold_lazy(work, f"index-{tag}", f"{via}:v", proxy, args.files, f"{work}/build/cache"),
                           "converted": cold_lazy(work, f"conv-{tag}", f"{via}:lazyfs", proxy, args.files, None),
                           "full_pull": cold_full(work, doc, "bench/app", proxy, args.files)}
                    row["index_over_converted"] = round(row["index"]["seconds"] / row["converted"]["seconds"], 2)
                    row["index_over_full"] = round(row["index"]["seconds"] / row["full_pull"]["seconds"], 2)
                    row["index_fetched_fraction"] = round(row["index"]["bytes_fetched"] / results["image_bytes"], 3)
                    results["cold"].append(row)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
