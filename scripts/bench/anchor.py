#!/usr/bin/env python3
"""What checking each layer's tail against its meta-digest costs: attach and cold start, with and without.

"Without" is the same code with ``parse_anchored_tail`` replaced by the bare
``parse_tail`` (what lazyfs did before format 2), injected into every lazyfs
process of the run through a ``sitecustomize`` module when
``LAZYFS_BENCH_UNANCHORED=1``; nothing in lazyfs itself knows about it. Runs
alternate between the two, so other load on the machine spreads over both.

(a) attach: ``ImageOpener.open`` of a registry image on loopback (manifest,
    then every layer's tail fetched, checked and parsed), in-process, a fresh
    opener each time, --attach-repeat runs of each; for the Debian bookworm
    minbase image of mount.py and for a metadata-heavy image (a 2 GiB random
    file, 64 KiB chunks, then 3 layers each rewriting a quarter: over 2 MB of
    metadata). Runs go ABBA. Also the check alone: the median time of sha256
    over the image's tails, as a share of the attach.
(b) cold start: mount.py's lazy cold start (``lazyfs mount`` through the CLI,
    fresh cache, daemon not running, then the startup program in a chroot)
    over a link shaped to --mbit with --rtt per request, --repeat runs of each.

Usage: scripts/bench/anchor.py [--workdir DIR] [--mbit 100] [--rtt 0.02] [--repeat 3] [--attach-repeat 15]
Needs root (mount.py's network namespace, FUSE, loop devices, chroot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import trio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchlib import run_header  # noqa: E402
from benchnet import ShapedLink, relay  # noqa: E402
from mount import Lazyfs, debian_rootfs, lazy_cold_start, run  # noqa: E402

from lazyfs.config import Config, RegistrySettings  # noqa: E402
from lazyfs.image.remote import ImageOpener  # noqa: E402
from tests.support.proxy import FaultProxy  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402

SITECUSTOMIZE = '''
import os
if os.environ.get("LAZYFS_BENCH_UNANCHORED") == "1":
    import lazyfs.format.layer as layer
    import lazyfs.image.image as image

    def unanchored(tail, meta_digest, blob_size, *, budget=None, max_virtual_size=layer.MAX_VIRTUAL_SIZE,
                   what="layer", source=""):
        return layer.parse_tail(tail, blob_size, budget=budget, max_virtual_size=max_virtual_size)

    image.parse_anchored_tail = unanchored
'''
MODES = ("anchored", "unanchored")


def set_mode(mode: str) -> None:
    os.environ["LAZYFS_BENCH_UNANCHORED"] = "1" if mode == "unanchored" else "0"


def attach_times(registry: str, ref: str, repeat: int, inject) -> dict[str, list[float]]:
    """Seconds per ``ImageOpener.open`` of *ref*, alternating the two modes."""
    config = Config(registries=(RegistrySettings(registry, plain_http=True),))
    import lazyfs.image.image as image

    anchored = image.parse_anchored_tail
    times: dict[str, list[float]] = {m: [] for m in MODES}

    async def once() -> float:
        async with ImageOpener(config) as opener:
            started = time.perf_counter()
            await opener.open(ref)
            return time.perf_counter() - started

    for r in range(repeat):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:  # ABBA: neither mode always goes first
            image.parse_anchored_tail = anchored if mode == "anchored" else inject
            times[mode].append(trio.run(once))
    image.parse_anchored_tail = anchored
    return times


def digest_seconds(registry: str, ref: str, rounds: int = 200) -> tuple[float, int]:
    """The check itself: median seconds of ``tail_digest`` over every tail of *ref*, and their bytes."""
    from lazyfs.format.layer import tail_digest

    config = Config(registries=(RegistrySettings(registry, plain_http=True),))

    async def tails() -> list[bytes]:
        async with ImageOpener(config) as opener:
            opened = await opener.open(ref)
            return [await opened.backend.read_range(l.digest, l.meta_offset, l.meta_length)
                    for l in opened.image.manifest.layers]

    data = trio.run(tails)
    runs = []
    for _ in range(rounds):
        started = time.perf_counter()
        for tail in data:
            tail_digest(tail)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), sum(len(t) for t in data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--mbit", type=float, default=100)
    ap.add_argument("--rtt", type=float, default=0.02)
    ap.add_argument("--repeat", type=int, default=3, help="cold starts of each mode")
    ap.add_argument("--attach-repeat", type=int, default=15, help="attaches of each mode and image")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("anchor.py needs root")
    work = tempfile.mkdtemp(prefix="lazyfs-bench-anchor-", dir=args.workdir)
    results: dict = {**run_header()}
    hooks = os.path.join(work, "hooks")
    os.makedirs(hooks)
    with open(os.path.join(hooks, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    os.environ["PYTHONPATH"] = os.pathsep.join([hooks, ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cli = [sys.executable, "-m", "lazyfs.cli"]
    env = dict(os.environ)
    namespace: dict = {}
    exec(SITECUSTOMIZE.replace('if os.environ.get("LAZYFS_BENCH_UNANCHORED") == "1":', "if True:"), namespace)
    inject = namespace["unanchored"]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        rootfs = os.path.join(work, "rootfs")
        debian_rootfs(rootfs)
        reg = stack.enter_context(running_registry(os.path.join(work, "registry")))
        plain = ["--plain-http", reg.registry]
        layout = os.path.join(work, "layout")
        run([*cli, "create", f"oci:{layout}:debian", "--from-dir", rootfs], env=env, cwd=ROOT)
        run([*cli, "push", f"oci:{layout}:debian", f"{reg.registry}/bench/debian:lazy", *plain], env=env, cwd=ROOT)
        # metadata-heavy: 2 GiB of random data, 64 KiB chunks, then 3 layers each rewriting a quarter
        heavy = os.path.join(work, "heavy.img")
        with open(heavy, "wb") as f:
            for _ in range(2048):
                f.write(os.urandom(1 << 20))
        run([*cli, "create", f"oci:{layout}:h0", "--from-file", heavy, "--chunk-size", "64K"], env=env, cwd=ROOT)
        for i in range(1, 4):
            with open(heavy, "r+b") as f:
                f.seek((i - 1) * (512 << 20))
                for _ in range(512):
                    f.write(os.urandom(1 << 20))
            run([*cli, "create", f"oci:{layout}:h{i}", "--from-file", heavy, "--base", f"oci:{layout}:h{i - 1}",
                 "--chunk-size", "64K"], env=env, cwd=ROOT)
        os.unlink(heavy)
        run([*cli, "push", f"oci:{layout}:h3", f"{reg.registry}/bench/heavy:4", *plain], env=env, cwd=ROOT)
        info = json.loads(run([*cli, "info", f"oci:{layout}:h3", "--json"], env=env, cwd=ROOT).stdout)
        manifest = json.loads(open(os.path.join(layout, "blobs", *info["manifest"].split(":")), "rb").read())
        tails = sum(int(l["annotations"]["dev.lazyfs.layer.meta-length"]) for l in manifest["layers"])
        results["heavy_image"] = {"layers": len(info["layers"]), "chunks": sum(l["chunks"] for l in info["layers"]),
                                  "metadata_bytes": tails}

        print("(a) attach: ImageOpener.open on loopback, in-process", flush=True)
        attach = {}
        for name, ref in (("debian", f"{reg.registry}/bench/debian:lazy"), ("heavy", f"{reg.registry}/bench/heavy:4")):
            times = attach_times(reg.registry, ref, args.attach_repeat, inject)
            med = {m: statistics.median(t) for m, t in times.items()}
            check, tail_bytes = digest_seconds(reg.registry, ref)
            attach[name] = {"runs": times, "median": med, "ratio": med["anchored"] / med["unanchored"],
                            "check_seconds": check, "tail_bytes": tail_bytes,
                            "check_share": check / med["unanchored"]}
            print(f"  {name:7s} anchored {med['anchored'] * 1000:.1f} ms (min {min(times['anchored']) * 1000:.1f}), "
                  f"unanchored {med['unanchored'] * 1000:.1f} ms (min {min(times['unanchored']) * 1000:.1f}): "
                  f"{attach[name]['ratio']:.3f}x; the check alone: sha256 of {tail_bytes} bytes of tails "
                  f"{check * 1000:.2f} ms = {attach[name]['check_share']:.2%} of the attach", flush=True)
        results["attach"] = attach
        debian_check = attach["debian"]["check_seconds"]

        print(f"(b) cold start over {args.mbit:g} Mbit/s + {args.rtt * 1000:.0f} ms per request", flush=True)
        cold: dict[str, list[dict]] = {m: [] for m in MODES}
        with contextlib.ExitStack() as net:
            link = net.enter_context(ShapedLink(args.mbit))
            proxy = net.enter_context(FaultProxy.running_in_thread(reg.port))
            proxy.faults.latency = args.rtt
            far = net.enter_context(relay(link, proxy.port))
            client = link.nsenter("client")
            for r in range(args.repeat):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    set_mode(mode)
                    base = os.path.join(work, f"cold-{r}-{mode}")
                    host = Lazyfs(base, far, client, trace_replay=False, trace_record_seconds=0)
                    net.callback(host.close)
                    c = lazy_cold_start(host, f"{far}/bench/debian:lazy", os.path.join(base, "mnt"), False)
                    host.close()
                    cold[mode].append(c)
                    print(f"  {mode:10s} {c['seconds']:6.2f} s (mount {c['mount_seconds']:.2f} s, program "
                          f"{c['program_seconds']:.2f} s)", flush=True)
        set_mode("anchored")
        med = {m: {k: statistics.median(c[k] for c in runs) for k in ("seconds", "mount_seconds")}
               for m, runs in cold.items()}
        results["cold"] = {"runs": cold, "median": med,
                           "ratio": med["anchored"]["seconds"] / med["unanchored"]["seconds"],
                           "mount_ratio": med["anchored"]["mount_seconds"] / med["unanchored"]["mount_seconds"],
                           "check_share": debian_check / med["unanchored"]["seconds"]}
        print(f"  medians: anchored {med['anchored']['seconds']:.2f} s (mount {med['anchored']['mount_seconds']:.2f} s),"
              f" unanchored {med['unanchored']['seconds']:.2f} s (mount {med['unanchored']['mount_seconds']:.2f} s):"
              f" cold start {results['cold']['ratio']:.3f}x, mount {results['cold']['mount_ratio']:.3f}x; the check alone "
              f"{results['cold']['check_share']:.4%} of the cold start", flush=True)
    results["loadavg_end"] = os.getloadavg()
    out = os.path.join(args.workdir or tempfile.gettempdir(), "lazyfs-bench-anchor.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
