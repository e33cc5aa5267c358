#!/usr/bin/env python3
"""Benchmark `lazyfs mount` (issue 5): cold start over a shaped link, warm I/O, daemon memory.

(a) Cold start of a Debian bookworm minbase rootfs (debootstrap, cached as a
    tarball under /var/cache/lazyfs-bench/) from a local docker-registry, seen
    from a client network namespace across a veth pair shaped with ``tc tbf``
    (--mbit, default 100) with ``FaultProxy`` adding --rtt (default 20 ms) per
    request (see benchnet.py):
    * lazy: ``lazyfs mount`` (CLI, own --config dirs, fresh cache, daemon not
      running) of the lazyfs image, then the startup program in a chroot of
      the mount; then the same again with a fresh cache and the startup trace
      the first run stored (trace prefetch);
    * full: ``skopeo copy`` of an ordinary OCI image (umoci, gzip layer) of the
      same rootfs + ``umoci unpack`` + the same program;
    * lazy, daemon up (with and without trace): the same, but the daemon is
      started (empty cache, nothing attached) before the page cache is dropped,
      as a resident service or snapshotter would be;
    * C peer: the same ext4 (the very file the lazyfs image was made from),
      pushed uncompressed as a blob, read by nbdkit's curl plugin (ranged GETs,
      no cache or readahead filter) through nbdfuse, on a loop device attached
      as `lazyfs mount` attaches its file, then the same program.
    Bytes fetched are counted for every run by the proxy (response bodies), so
    lazyfs and the C peer are measured the same way. Each --rtt value is one
    round of all kinds; ratios are per RTT.
(b) Warm reads of a 1 GiB file (half random, half hex text) in an ext4, all
    data on tmpfs: fio sequential 1 MiB and random 4 KiB reads (--direct=1,
    libaio, iodepth 16, --seconds each) on the lazyfs mount (cache filled by
    one earlier read) vs the same ext4 file on a loop device vs nbdkit (file
    plugin) + nbdfuse + loop (a C peer). Loop devices are attached the way
    `lazyfs mount` attaches its file (read-only, direct I/O where accepted).
(c) Daemon VmRSS with 1 and with 10 images mounted (distinct images: the
    Debian image and 9 images stacked on it, each with one more file).

Usage: scripts/bench/mount.py [--workdir DIR] [--mbit 100] [--rtt 0 0.02] [--repeat 3] [--seconds 20]
                              [--skip-trace] [--cold-only] [--chunk-size BYTES] [--set KEY=JSON ...]
Needs root. Everything it starts (namespaces, veth, relay, proxy, registry,
daemons, FUSE, loop devices, mounts, tmpfs) is stopped or removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
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

from benchlib import detach_loops_under, drop_caches, nbdfuse_file, parse_settings, run_header  # noqa: E402
from benchnet import ShapedLink, relay  # noqa: E402
import httpx  # noqa: E402
from lazyfs.config import Config  # noqa: E402
from lazyfs.errors import LazyfsError  # noqa: E402
from lazyfs.image.local import mkfs_from_dir  # noqa: E402
from lazyfs.serve import system  # noqa: E402
from lazyfs.serve.control import call  # noqa: E402
from tests.support.proxy import FaultProxy  # noqa: E402
from tests.support.registry import running_registry  # noqa: E402

CACHE_DIR = "/var/cache/lazyfs-bench"
ROOTFS_TAR = os.path.join(CACHE_DIR, "bookworm-minbase.tar")
STARTUP = "dpkg -l >/dev/null; perl -e 1; ls -lR /usr >/dev/null; cat /etc/os-release"
STEP_TIMEOUT = 600
ALL_KINDS = ("lazy", "lazy + trace", "lazy, daemon up", "lazy + trace, daemon up", "C peer", "full pull")
# as `lazyfs mount` attaches a read-only image with the default config (read_only_loop)
LAZYFS_LOOP_DIRECT_IO = Config().read_only_loop == "direct"


def run(cmd: list[str], timeout: float = STEP_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def timed(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = run(cmd, **kw)
    return proc, time.perf_counter() - started


def du_bytes(path: str) -> int:
    return int(run(["du", "-sB1", path]).stdout.split()[0])


# ---------------------------------------------------------------- inputs


def apt_mirror() -> str:
    """The Debian mirror apt uses (from /etc/apt/sources.list*), else deb.debian.org."""
    files = ["/etc/apt/sources.list"]
    d = "/etc/apt/sources.list.d"
    if os.path.isdir(d):
        files += [os.path.join(d, f) for f in sorted(os.listdir(d))]
    for path in files:
        try:
            text = open(path).read()
        except OSError:
            continue
        for url in re.findall(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            if url.rstrip("/").endswith("/debian") and "security" not in url:
                return url
    return "http://deb.debian.org/debian"


def debian_rootfs(dest: str) -> None:
    """Unpack the cached minbase rootfs into *dest*, making the cache with debootstrap first if needed."""
    if not os.path.exists(ROOTFS_TAR):
        os.makedirs(CACHE_DIR, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="rootfs-", dir=CACHE_DIR)
        try:
            mirror = apt_mirror()
            print(f"debootstrap --variant=minbase bookworm from {mirror} (once; cached in {ROOTFS_TAR})", flush=True)
            run(["debootstrap", "--variant=minbase", "bookworm", tmp, mirror], timeout=1800)
            run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", tmp, "-cf",
                 ROOTFS_TAR + ".partial", "."])
            os.replace(ROOTFS_TAR + ".partial", ROOTFS_TAR)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(dest)
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", dest, "-xpf", ROOTFS_TAR])


def write_bigfile(path: str, size: int = 1 << 30) -> None:
    """Half random MiBs, half hex text MiBs (zstd stores the latter at about half size)."""
    with open(path, "wb") as f:
        for i in range(size >> 20):
            f.write(os.urandom(1 << 20) if i % 2 == 0 else os.urandom(1 << 19).hex().encode())


# ---------------------------------------------------------------- lazyfs plumbing


class Lazyfs:
    """One lazyfs host: its own config and dirs; CLI calls optionally inside a network namespace."""

    def __init__(self, base: str, registry: str, prefix: list[str] = (), **settings) -> None:
        self.base = base
        self.prefix = list(prefix)
        os.makedirs(base)
        self.doc = {"run_dir": os.path.join(base, "run"), "state_dir": os.path.join(base, "state"),
                    "cache_root": os.path.join(base, "cache"), "writable_root": os.path.join(base, "writable"),
                    "registries": [{"host": registry, "plain_http": True}], "log_level": "warning", **settings}
        self.config = os.path.join(base, "config.json")
        with open(self.config, "w") as f:
            json.dump(self.doc, f)
        self.socket = os.path.join(self.doc["run_dir"], "lazyfs.sock")
        self.targets: list[str] = []

    def cli(self, *args: str, prefix: bool = True) -> str:
        env = {**os.environ, "PYTHONPATH": ROOT}
        cmd = [*(self.prefix if prefix else []), sys.executable, "-m", "lazyfs.cli", *args, "--config", self.config]
        return run(cmd, env=env, cwd=ROOT).stdout

    def start_daemon(self) -> None:
        """Start the daemon (in the namespace of the prefix) without attaching anything."""
        env = {**os.environ, "PYTHONPATH": ROOT}
        code = ("import sys; from lazyfs.config import load_config; from lazyfs.serve.mount import ensure_daemon; "
                "ensure_daemon(load_config(sys.argv[1]), sys.argv[1])")
        run([*self.prefix, sys.executable, "-c", code, self.config], env=env, cwd=ROOT)

    def mount(self, ref: str, target: str) -> dict:
        os.makedirs(target, exist_ok=True)
        self.targets.append(target)
        return json.loads(self.cli("mount", ref, target, "--json"))

    def stats(self, target: str) -> dict:
        return json.loads(self.cli("stats", target, "--json", prefix=False))

    def pid(self) -> int | None:
        try:
            return call(self.socket, "ping", timeout=5)["pid"]
        except (LazyfsError, OSError):
            return None

    def close(self) -> None:
        """Unmount everything, stop the daemon (bounded), detach leftovers."""
        for target in reversed(self.targets):
            if system.is_mountpoint(target) or os.path.islink(os.path.join(target, "disk.img")):
                try:
                    self.cli("umount", target, prefix=False)
                except RuntimeError:
                    subprocess.run(["umount", "-l", target], timeout=60)
        self.targets.clear()
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(LazyfsError, OSError):
                call(self.socket, "stop", timeout=10)
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.1)
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)
        detach_loops_under(self.base)  # its exported files and hydrated local files
        export = os.path.join(self.doc["run_dir"], "export")
        if system.is_mountpoint(export):
            subprocess.run(["umount", "-l", export], timeout=60)


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# ---------------------------------------------------------------- (a) cold start


def chroot_startup(root: str) -> tuple[str, float]:
    proc, seconds = timed(["chroot", root, "/bin/sh", "-c", STARTUP])
    if "bookworm" not in proc.stdout:
        raise RuntimeError(f"the startup program in {root} printed {proc.stdout!r}")
    return proc.stdout, seconds


def proxy_counts(proxy: FaultProxy) -> tuple[int, int]:
    st = proxy.statistics()
    return st.body_bytes_to_client, st.requests


def lazy_cold_start(host: Lazyfs, ref: str, target: str, finish_trace: bool, daemon_up: bool = False) -> dict:
    if daemon_up:  # a resident daemon (as under a snapshotter): started, then the page cache dropped
        host.start_daemon()
    drop_caches()
    started = time.perf_counter()
    mounted = host.mount(ref, target)
    mount_s = time.perf_counter() - started
    _, program_s = chroot_startup(target)
    total = time.perf_counter() - started
    stats = host.stats(target)
    trace = stats.get("trace", {})
    if finish_trace:
        trace = call(host.socket, "trace-finish", name=stats["name"], timeout=120)
    sched = stats["scheduler"]
    return {"seconds": total, "mount_seconds": mount_s, "daemon_reported_attach_s": mounted.get("seconds"),
            "program_seconds": program_s, "bytes_read": stats["device"]["bytes_read"],
            "bytes_fetched": sched["bytes_fetched"], "ranged_gets": sched["ranged_gets"],
            "demand_misses": stats["demand_misses"], "wasted_bytes": sched["wasted_bytes"],
            "readahead_chunks": sched["prefetched"], "trace": trace}


def push_raw_blob(registry: str, repo: str, path: str) -> str:
    """Upload *path* as one blob of *repo* (monolithic upload); return its digest."""
    digest = "sha256:" + run(["sha256sum", path]).stdout.split()[0]
    base = f"http://{registry}"
    with httpx.Client(timeout=600) as client:
        started = client.post(f"{base}/v2/{repo}/blobs/uploads/")
        started.raise_for_status()
        location = started.headers["location"]
        location = location if location.startswith("http") else base + location
        with open(path, "rb") as f:
            sep = "&" if "?" in location else "?"  # the location carries the upload's state
            done = client.put(f"{location}{sep}digest={digest}", content=f,
                              headers={"content-type": "application/octet-stream"})
        done.raise_for_status()
    return digest


def c_peer_start(prefix: list[str], url: str, work: str) -> dict:
    """nbdkit curl (ranged GETs of the raw ext4) + nbdfuse + loop + mount + the program (C peer)."""
    os.makedirs(work)
    drop_caches()
    started = time.perf_counter()
    try:
        with nbdfuse_file("", os.path.join(work, "nbdfuse"), plugin=("curl", f"url={url}"),
                          prefix=tuple(prefix)) as nbd_file, \
                loop_mount(nbd_file, os.path.join(work, "mnt"), direct_io=LAZYFS_LOOP_DIRECT_IO):
            mount_s = time.perf_counter() - started
            _, program_s = chroot_startup(os.path.join(work, "mnt"))
            total = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"seconds": total, "mount_seconds": mount_s, "program_seconds": program_s}


def full_pull_start(prefix: list[str], registry: str, work: str) -> dict:
    """skopeo copy + umoci unpack + the program, in fresh directories under *work* (removed after)."""
    pulled, bundle = os.path.join(work, "pulled"), os.path.join(work, "bundle")
    os.makedirs(work)
    drop_caches()
    try:
        _, copy_s = timed([*prefix, "skopeo", "copy", "--src-tls-verify=false",
                           f"docker://{registry}/bench/debian:oci", f"oci:{pulled}:debian"])
        _, unpack_s = timed(["umoci", "unpack", "--image", f"{pulled}:debian", bundle])
        _, program_s = chroot_startup(os.path.join(bundle, "rootfs"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"seconds": copy_s + unpack_s + program_s, "copy_seconds": copy_s, "unpack_seconds": unpack_s,
            "program_seconds": program_s}


def oci_layer_bytes(layout: str, tag: str) -> int:
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    with open(os.path.join(layout, "blobs", *desc["digest"].split(":"))) as f:
        manifest = json.load(f)
    return sum(layer["size"] for layer in manifest["layers"])


# ---------------------------------------------------------------- (b) warm fio


def fio(path: str, rw: str, bs: str, seconds: int) -> dict:
    out = run(["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
               "--ioengine=libaio", "--iodepth=16", "--readonly", "--time_based", f"--runtime={seconds}",
               "--output-format=json"], timeout=seconds + 120).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"MBps": job["bw_bytes"] / 1e6, "iops": job["iops"]}


@contextlib.contextmanager
def loop_mount(path: str, target: str, direct_io: bool | None = None):
    """Attach *path* read-only and mount its ext4 at *target*; yields the loop device. By default
    as `lazyfs mount` attaches (direct I/O if accepted); with *direct_io* True or False, exactly
    that, with lazyfs's readahead."""
    os.makedirs(target, exist_ok=True)
    if direct_io is None:
        dev = trio.run(system.losetup_attach, path, True)
    else:
        dev = run(["losetup", "--show", "-f", "-r", *(["--direct-io=on"] if direct_io else []), path]).stdout.strip()
    try:
        if direct_io is not None:
            run(["blockdev", "--setra", str(system.READAHEAD_SECTORS), dev])
        run(["mount", "-t", "ext4", "-o", "ro,noload", dev, target])
        try:
            yield dev
        finally:
            subprocess.run(["umount", target], timeout=60)
    finally:
        trio.run(system.losetup_detach, dev)


def warm_fio(targets: dict[str, tuple[str, str]], seconds: int) -> dict:
    """fio seq and rand on each target's big file; *targets*: name -> (file, loop device)."""
    out: dict = {}
    for name, (path, dev) in targets.items():
        drop_caches()
        out[name] = {"loop_direct_io": system.loop_direct_io(dev)}
        print(f"  {name}: {dev}, direct I/O {'on' if out[name]['loop_direct_io'] else 'off'}", flush=True)
        for kind, rw, bs in (("seq", "read", "1M"), ("rand", "randread", "4k")):
            out[name][kind] = fio(path, rw, bs, seconds)
            print(f"  {name:10s} {kind:4s} {out[name][kind]['MBps']:9.1f} MB/s {out[name][kind]['iops']:10.0f} IOPS",
                  flush=True)
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--mbit", type=float, default=100, help="shaped link rate, Mbit/s")
    ap.add_argument("--rtt", type=float, nargs="+", default=[0.0, 0.02],
                    help="latency FaultProxy adds per request (s); one round of every kind per value")
    ap.add_argument("--seconds", type=int, default=20, help="runtime of each fio job")
    ap.add_argument("--repeat", type=int, default=3, help="cold-start runs of each kind (medians reported)")
    ap.add_argument("--skip-trace", action="store_true", help="skip the second lazy run with trace prefetch")
    ap.add_argument("--kinds", nargs="+", default=list(ALL_KINDS), choices=ALL_KINDS,
                    help="cold-start kinds to run (ratios need 'full pull' and 'C peer')")
    ap.add_argument("--cold-only", action="store_true", help="only (a): skip warm fio and daemon RSS")
    ap.add_argument("--chunk-size", default="256K", help="chunk size of the lazyfs image (lazyfs create)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="a lazyfs config setting for the cold-start hosts, e.g. readahead_chunks=0")
    args = ap.parse_args()
    overrides = parse_settings(args.set)
    if os.geteuid() != 0:
        raise SystemExit("mount.py needs root (namespaces, FUSE, loop devices, chroot)")
    began = time.monotonic()
    work = tempfile.mkdtemp(prefix="lazyfs-bench-mount-", dir=args.workdir)
    results: dict = run_header()
    lazyfs_cli = [sys.executable, "-m", "lazyfs.cli"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        rootfs = os.path.join(work, "rootfs")
        debian_rootfs(rootfs)
        rootfs_bytes = du_bytes(rootfs)
        reg = stack.enter_context(running_registry(os.path.join(work, "registry")))
        plain = ["--plain-http", reg.registry]

        # the two images of the same rootfs, pushed on loopback (not through the shaped link)
        # (the ext4 `lazyfs create --from-dir` would make, kept: the C peer reads the same bytes)
        layout = os.path.join(work, "lazy-layout")
        raw_ext4 = os.path.join(work, "debian.ext4")
        mkfs_from_dir(rootfs, raw_ext4)
        created = json.loads(run([*lazyfs_cli, "create", f"oci:{layout}:debian", "--from-file", raw_ext4,
                                  "--chunk-size", args.chunk_size, "--json"], env=env, cwd=ROOT).stdout)
        run([*lazyfs_cli, "push", f"oci:{layout}:debian", f"{reg.registry}/bench/debian:lazy", *plain],
            env=env, cwd=ROOT)
        raw_digest = push_raw_blob(reg.registry, "bench/raw", raw_ext4)
        oci = os.path.join(work, "oci-layout")
        run(["umoci", "init", "--layout", oci])
        run(["umoci", "new", "--image", f"{oci}:debian"])
        run(["umoci", "insert", "--image", f"{oci}:debian", rootfs, "/"])
        run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{oci}:debian",
             f"docker://{reg.registry}/bench/debian:oci"])
        sizes = {"rootfs_bytes": rootfs_bytes, "ext4_virtual": created["virtual_size"],
                 "lazyfs_layer_bytes": created["layer_size"], "oci_layer_bytes": oci_layer_bytes(oci, "debian")}
        results["images"] = sizes
        print(f"Debian bookworm minbase: rootfs {rootfs_bytes / 1e6:.0f} MB; lazyfs layer "
              f"{sizes['lazyfs_layer_bytes'] / 1e6:.0f} MB; OCI gzip layer {sizes['oci_layer_bytes'] / 1e6:.0f} MB",
              flush=True)

        # (a) cold start across the shaped link
        print(f"\n(a) cold start over {args.mbit:g} Mbit/s; program: {STARTUP}; lazy config {overrides}",
              flush=True)
        with contextlib.ExitStack() as net:
            link = net.enter_context(ShapedLink(args.mbit))
            proxy = net.enter_context(FaultProxy.running_in_thread(reg.port))
            far = net.enter_context(relay(link, proxy.port))
            client = link.nsenter("client")
            ref = f"{far}/bench/debian:lazy"
            raw_url = f"http://{far}/v2/bench/raw/blobs/{raw_digest}"
            kinds = [k for k in ALL_KINDS if k in args.kinds and not (args.skip_trace and k == "lazy + trace")]
            results["cold"] = {}
            for rtt_i, rtt in enumerate(args.rtt):
                proxy.faults.latency = rtt
                print(f"  RTT {rtt * 1000:.0f} ms per request", flush=True)
                cold: dict[str, list[dict]] = {k: [] for k in kinds}
                for r in range(args.repeat):  # interleaved, so load from other work spreads over all kinds
                    for kind in kinds:
                        before = proxy_counts(proxy)
                        if kind == "full pull":
                            c = full_pull_start(client, far, os.path.join(work, f"full{r}"))
                            detail = (f"skopeo copy {c['copy_seconds']:.2f} s, umoci unpack {c['unpack_seconds']:.2f} s, "
                                      f"program {c['program_seconds']:.2f} s")
                        elif kind == "C peer":
                            c = c_peer_start(client, raw_url, os.path.join(work, f"cpeer{r}"))
                            detail = f"mount {c['mount_seconds']:.2f} s, program {c['program_seconds']:.2f} s"
                        else:
                            # The very first plain run records the startup trace (stored as a referrer when
                            # it ends); plain runs never replay one, trace runs always do.
                            replay = "trace" in kind
                            daemon_up = "daemon up" in kind
                            first = kind == "lazy" and r == 0 and rtt_i == 0
                            base = os.path.join(work, f"cold-{rtt_i}-{r}-{'trace' if replay else 'plain'}"
                                                f"{'-up' if daemon_up else ''}")
                            host = Lazyfs(base, far, client, trace_replay=replay,
                                          trace_record_seconds=300 if first else 0, trace_publish=first, **overrides)
                            net.callback(host.close)
                            c = lazy_cold_start(host, ref, os.path.join(base, "mnt"), finish_trace=first,
                                                daemon_up=daemon_up)
                            host.close()
                            detail = (f"mount {c['mount_seconds']:.2f} s, program {c['program_seconds']:.2f} s; "
                                      f"{c['ranged_gets']} ranged GETs, {c['demand_misses']} misses, "
                                      f"{c['readahead_chunks']} prefetched; device read {c['bytes_read'] / 1e6:.1f} MB")
                        after = proxy_counts(proxy)
                        c["proxy_bytes"], c["proxy_requests"] = after[0] - before[0], after[1] - before[1]
                        print(f"  {kind:13s} {c['seconds']:6.2f} s; fetched {c['proxy_bytes'] / 1e6:.1f} MB in "
                              f"{c['proxy_requests']} requests ({detail})", flush=True)
                        cold[kind].append(c)
                summary = {k: {key: statistics.median(c[key] for c in runs) for key in runs[0]
                               if isinstance(runs[0][key], (int, float))} for k, runs in cold.items()}
                print(f"  medians of {args.repeat} at RTT {rtt * 1000:.0f} ms: "
                      + "; ".join(f"{k} {v['seconds']:.2f} s, {v['proxy_bytes'] / 1e6:.1f} MB" for k, v in summary.items()))
                for kind in kinds:
                    if kind in ("full pull", "C peer"):
                        continue
                    if "full pull" in summary:
                        ratio = summary[kind]["seconds"] / summary["full pull"]["seconds"]
                        summary[kind]["time_vs_full"] = ratio
                        print(f"  {kind} / full pull, time: {ratio:.2f}x")
                    if "C peer" in summary:
                        summary[kind]["bytes_vs_c_peer"] = summary[kind]["proxy_bytes"] / summary["C peer"]["proxy_bytes"]
                        print(f"  {kind} / C peer, bytes fetched: {summary[kind]['bytes_vs_c_peer']:.2f}x")
                results["cold"][f"rtt_{rtt * 1000:.0f}ms"] = {"runs": cold, "median": summary}


        if args.cold_only:
            results["seconds"] = time.monotonic() - began
            results["loadavg_end"] = os.getloadavg()
            print(f"\ntotal {results['seconds']:.0f} s; load average at start {results['loadavg_start'][0]:.1f}, "
                  f"at end {results['loadavg_end'][0]:.1f}")
            print(json.dumps(results))
            return
        # (b) warm fio, everything on tmpfs
        print(f"\n(b) warm reads of a 1 GiB file, fio {args.seconds} s each, iodepth 16, --direct=1", flush=True)
        tmpfs = os.path.join(work, "tmpfs")
        os.makedirs(tmpfs)
        run(["mount", "-t", "tmpfs", "-o", "size=6g", "tmpfs", tmpfs])
        stack.callback(subprocess.run, ["umount", "-l", tmpfs], timeout=60)
        tree = os.path.join(tmpfs, "tree")
        os.makedirs(tree)
        write_bigfile(os.path.join(tree, "bigfile"))
        raw = os.path.join(tmpfs, "fio.ext4")
        mkfs_from_dir(tree, raw)
        shutil.rmtree(tree)
        fio_layout = os.path.join(work, "fio-layout")
        run([*lazyfs_cli, "create", f"oci:{fio_layout}:fio", "--from-file", raw], env=env, cwd=ROOT)
        run([*lazyfs_cli, "push", f"oci:{fio_layout}:fio", f"{reg.registry}/bench/fio:v1", *plain], env=env, cwd=ROOT)
        # default config (256 MiB memory chunk cache: most reads are disk-cache hits), and with a
        # memory cache bigger than the file (every read a memory hit)
        lazy_targets = {}
        for name, extra in (("lazyfs", {}), ("lazyfs-mem", {"memory_cache_size": 2 << 30})):
            host = Lazyfs(os.path.join(work, name), reg.registry, trace_record_seconds=0,
                          cache_root=os.path.join(tmpfs, f"cache-{name}"), **extra)
            stack.callback(host.close)
            mnt = os.path.join(work, name, "mnt")
            mounted = host.mount(f"{reg.registry}/bench/fio:v1", mnt)
            run(["dd", f"if={os.path.join(mnt, 'bigfile')}", "of=/dev/null", "bs=4M"])  # fill the cache
            lazy_targets[name] = (os.path.join(mnt, "bigfile"), mounted["loop"])
        with loop_mount(raw, os.path.join(work, "local-mnt")) as local_dev, \
                nbdfuse_file(raw, os.path.join(work, "nbdfuse")) as nbd_file, \
                loop_mount(nbd_file, os.path.join(work, "nbd-mnt")) as nbd_dev:
            targets = {"local": (os.path.join(work, "local-mnt", "bigfile"), local_dev),
                       "nbdkit": (os.path.join(work, "nbd-mnt", "bigfile"), nbd_dev), **lazy_targets}
            warm = warm_fio(targets, args.seconds)
        for name in lazy_targets:
            for kind in ("seq", "rand"):
                for peer in ("local", "nbdkit"):
                    warm[f"{kind}_{name}_vs_{peer}"] = warm[name][kind]["MBps"] / warm[peer][kind]["MBps"]
                print(f"  {name} / local {kind}: {warm[f'{kind}_{name}_vs_local']:.2f}x; {name} / nbdkit {kind}: "
                      f"{warm[f'{kind}_{name}_vs_nbdkit']:.2f}x")
        results["warm"] = warm

        # (c) daemon RSS with 1 and 10 images mounted
        print("\n(c) daemon RSS", flush=True)
        names = ["debian"]
        for i in range(1, 10):
            variant = os.path.join(work, f"variant{i}")
            run(["cp", "-al", rootfs, variant])
            with open(os.path.join(variant, "etc", "bench-image"), "w") as f:
                f.write(f"variant {i}\n")
            run([*lazyfs_cli, "create", f"oci:{layout}:v{i}", "--from-dir", variant, "--base", f"oci:{layout}:debian",
                 "--size", str(created["virtual_size"])], env=env, cwd=ROOT)
            shutil.rmtree(variant)
            run([*lazyfs_cli, "push", f"oci:{layout}:v{i}", f"{reg.registry}/bench/debian:v{i}", *plain],
                env=env, cwd=ROOT)
            names.append(f"v{i}")
        rss_host = Lazyfs(os.path.join(work, "rss"), reg.registry, trace_record_seconds=0)
        stack.callback(rss_host.close)
        rss = {}
        for i, tag in enumerate(["lazy"] + names[1:]):
            target = os.path.join(work, "rss", f"mnt{i}")
            rss_host.mount(f"{reg.registry}/bench/debian:{tag}", target)
            run(["ls", "-lR", target])
            if i in (0, 9):
                key = "one_image" if i == 0 else "ten_images"
                host_stats = call(rss_host.socket, "stats", timeout=30)
                rss[key] = {"vm_rss": vm_rss(rss_host.pid()), "attachments": len(host_stats["attachments"]),
                            "memory_cache_bytes": host_stats["scheduler"]["cache"]["memory_bytes"]}
                rss[key]["rss_minus_cache"] = rss[key]["vm_rss"] - rss[key]["memory_cache_bytes"]
                print(f"  {rss[key]['attachments']:2d} image(s) mounted: VmRSS {rss[key]['vm_rss'] / 2**20:.0f} MiB, "
                      f"of which memory chunk cache {rss[key]['memory_cache_bytes'] / 2**20:.0f} MiB", flush=True)
        rss["per_extra_image"] = (rss["ten_images"]["vm_rss"] - rss["one_image"]["vm_rss"]) / 9
        rss["per_extra_image_minus_cache"] = (rss["ten_images"]["rss_minus_cache"] - rss["one_image"]["rss_minus_cache"]) / 9
        print(f"  per extra image: {rss['per_extra_image'] / 2**20:.1f} MiB VmRSS, "
              f"{rss['per_extra_image_minus_cache'] / 2**20:.1f} MiB without the chunk cache's growth", flush=True)
        results["rss"] = rss
        rss_host.close()
        results["seconds"] = time.monotonic() - began
        results["loadavg_end"] = os.getloadavg()
        print(f"\ntotal {results['seconds']:.0f} s; load average at start {results['loadavg_start'][0]:.1f}, "
              f"at end {results['loadavg_end'][0]:.1f} (other work on this machine makes numbers noisy)")
        print(json.dumps(results))


if __name__ == "__main__":
    main()
