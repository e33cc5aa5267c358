#!/usr/bin/env python3
"""A fleet on one machine: N lazyfs hosts in R racks, a cache tier or mirror per rack, one origin.

    scripts/bench/fleet.py --hosts N --racks R --json FILE [--tier cache|mirror] [--image debian|small]
                           [--baseline] [--background] [--host-mbit 1000] [--origin-mbit 1000]
                           [--rack-mbit 10000] [--origin-rtt 0.02]

Topology (every address is in network namespaces this script creates and deletes):

    h1 .. hN (10.77.2.i)      each its own netns, lazyfs daemon, config, cache, FUSE export, loop mount
        |  tbf --host-mbit
    core netns: one bridge  ----  r1 .. rR (10.77.1.k): the rack's tier, tbf --rack-mbit
        |  tbf --origin-mbit
    o (10.77.0.2): the origin, docker-registry behind a userspace proxy that adds --origin-rtt per
                   request (no netem here) and counts what the origin sends

Hosts are assigned to racks in contiguous blocks. Each host's hosts.toml lists its rack's tier
first (pull and resolve), then the origin. ``--tier cache`` is nginx proxy_cache with slice
(scripts/cache-tier.sh): ranged GETs from a cold cache, one upstream copy per slice.
``--tier mirror`` is docker-registry in pull-through mode (it answers ranges only for blobs it
has stored; see docs/fleet.md for what that costs).

Every host's daemon is started first; then all hosts run, at the same moment, ``lazyfs mount``
of the same image and a workload in a chroot of the mount (start_s: from that moment until the
workload's output is right). Afterwards each mounted tree is compared with the image's source
tree (content, modes, owners, links, xattrs): ``ok`` is true when both are right.
``--baseline`` runs the same fleet again doing ``skopeo copy`` (an ordinary gzip OCI image of
the same tree) through the same, fresh, rack tiers + ``umoci unpack`` + the workload.

The JSON holds hosts[] (name, rack, ok, start_s, ...), origin_egress_bytes (bytes the origin's
interface sent), origin_blob_bytes (blob body bytes the origin sent), image_compressed_bytes,
start_p50_s / start_p99_s, per-rack traffic and byte hit rates, and the machine's CPU use.

Images are built once and kept under /var/cache/lazyfs-fleet (keyed by the source tree and the
lazyfs format code). Everything started (namespaces, processes, mounts, loop devices) is
removed on exit, also after an error or SIGTERM/SIGINT. Needs root. Also a library:
``Fleet`` is what tests/fleet/ drive.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from lazyfs.errors import LazyfsError  # noqa: E402
from lazyfs.serve.control import call  # noqa: E402

PREFIX = "10.77"
ORIGIN_ADDR = f"{PREFIX}.0.2"
REGISTRY_PORT = 5000
CACHE_ROOT = "/var/cache/lazyfs-fleet"
DEBIAN_TARS = ("/var/cache/lazyfs-test/debian-bookworm-minbase.tar", "/var/cache/lazyfs-bench/bookworm-minbase.tar",
               "/var/cache/lazyfs-demo/debian-minbase.tar")
STEP_TIMEOUT = 600
LAZY_TAG, OCI_TAG = "fleet/image:lazy", "fleet/image:oci"


def run(cmd: list[str], timeout: float = STEP_TIMEOUT, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, **kw)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT}


def lazyfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazyfs.cli", *args]


def wait_until(what: str, predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (for 16 values, p99 is the slowest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def cpu_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- processes


class Proc:
    """A process in its own session (so it and its children can be killed together)."""

    def __init__(self, cmd: list[str], log: str, **kw) -> None:
        self.cmd = cmd
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, **kw)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # also children left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def tail(self, n: int = 20) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


# ---------------------------------------------------------------- network


@dataclass
class Node:
    name: str  # netns name
    addr: str
    core_veth: str
    mbit: float

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net={self.path}"]


class Network:
    """A core namespace with a bridge, and nodes (namespaces) hanging off it by shaped veth pairs."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.core = f"{tag}core"
        self.nodes: dict[str, Node] = {}
        self._made: list[str] = []

    def __enter__(self) -> Network:
        try:
            self._netns_add(self.core)
            self._ip("-n", self.core, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.core, "link", "set", "br0", "up")
            self._ip("-n", self.core, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], timeout=60, capture_output=True)
        self._made.clear()

    @staticmethod
    def _ip(*args: str) -> None:
        run(["ip", *args], timeout=60)

    def _netns_add(self, name: str) -> None:
        subprocess.run(["ip", "netns", "del", name], timeout=60, capture_output=True)  # a leftover of a killed run
        self._ip("netns", "add", name)
        self._made.append(name)

    def add(self, short: str, addr: str, mbit: float) -> Node:
        name = f"{self.tag}{short}"
        core_veth = f"v{self.tag}{short}"[:15]
        self._netns_add(name)
        self._ip("-n", self.core, "link", "add", core_veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        self._ip("-n", self.core, "link", "set", core_veth, "master", "br0", "up")
        self._ip("-n", name, "addr", "add", f"{addr}/16", "dev", "eth0")
        self._ip("-n", name, "link", "set", "eth0", "up")
        self._ip("-n", name, "link", "set", "lo", "up")
        burst = max(64 << 10, int(mbit * 1e6 / 8 / 250))  # >= 4 ms of traffic (HZ 250)
        for ns, dev in ((name, "eth0"), (self.core, core_veth)):
            run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                 "burst", str(burst), "latency", "50ms"], timeout=60)
        node = self.nodes[short] = Node(name, addr, core_veth, mbit)
        return node

    def counters(self, node: Node) -> dict[str, int]:
        """Bytes *node* sent and received on its link."""
        out = run(["ip", "-n", node.name, "-j", "-s", "link", "show", "eth0"], timeout=60).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"]}


# ---------------------------------------------------------------- images


@dataclass
class FleetImage:
    kind: str
    storage: str  # a docker-registry storage root holding LAZY_TAG and OCI_TAG
    compressed_bytes: int  # the lazyfs image's layer blobs
    oci_compressed_bytes: int  # the gzip OCI image's layers
    virtual_size: int
    tree: dict  # tests.support.trees.describe_tree of the source
    workload: str
    expect: str


def source_tree(kind: str, dest: str) -> None:
    """The root filesystem of image *kind* into *dest*."""
    if kind == "debian":
        tar = next((t for t in DEBIAN_TARS if os.path.exists(t)), None)
        if tar is None:
            from mount import debian_rootfs  # debootstrap once, cached

            debian_rootfs(dest)
            return
        os.makedirs(dest)
        run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", dest, "-xpf", tar])
        return
    from tests.image.test_local import make_busybox_tree

    make_busybox_tree(dest)
    with open(os.path.join(dest, "marker"), "w") as f:
        f.write("lazyfs fleet\n")
    rng = hashlib.sha256(b"lazyfs fleet")
    os.makedirs(os.path.join(dest, "data"), exist_ok=True)
    for i in range(6):  # 48 MiB in 8 MiB files, half random, half text: many chunks, some compressible
        with open(os.path.join(dest, "data", f"file{i}"), "wb") as f:
            for j in range(8):
                rng.update(bytes([i, j]))
                block = hashlib.shake_256(rng.digest()).digest(1 << 20)
                f.write(block if j % 2 == 0 else block[: 1 << 19].hex().encode())


WORKLOADS = {
    "debian": ("dpkg -l >/dev/null; perl -e 1; ls -lR /usr >/dev/null; cat /etc/os-release", "bookworm"),
    "small": ("ls -lR / >/dev/null; head -c 3000000 /data/file2 | wc -c; cat /marker", "lazyfs fleet"),
}


def image_key(kind: str) -> str:
    h = hashlib.sha256(kind.encode())
    if kind == "debian":
        tar = next((t for t in DEBIAN_TARS if os.path.exists(t)), "debootstrap")
        st = os.stat(tar) if os.path.exists(tar) else None
        h.update(f"{tar}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}".encode())
    for d in ("lazyfs/format", "lazyfs/image"):
        for name in sorted(os.listdir(os.path.join(ROOT, d))):
            if name.endswith(".py"):
                with open(os.path.join(ROOT, d, name), "rb") as f:
                    h.update(name.encode() + f.read())
    with open(os.path.join(HERE, "fleet.py"), "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def prepare_image(kind: str, log: Callable[[str], None] = print) -> FleetImage:
    """Build (once, cached) the lazyfs image and the OCI image of *kind* into a registry storage root."""
    from tests.support.registry import running_registry
    from tests.support.trees import describe_tree

    cached = os.path.join(CACHE_ROOT, f"{kind}-{image_key(kind)}")
    meta_file = os.path.join(cached, "image.pickle")
    if os.path.exists(meta_file):
        with open(meta_file, "rb") as f:
            return FleetImage(**pickle.load(f))  # builtins only: readable whatever module runs this
    log(f"building the {kind} image (once; cached in {cached})")
    os.makedirs(CACHE_ROOT, exist_ok=True)
    shutil.rmtree(cached, ignore_errors=True)
    work = tempfile.mkdtemp(prefix=f"build-{kind}-", dir=CACHE_ROOT)
    try:
        rootfs = os.path.join(work, "rootfs")
        source_tree(kind, rootfs)
        tree = describe_tree(rootfs)
        layout = os.path.join(work, "lazy")
        created = json.loads(run(lazyfs_cmd("create", f"oci:{layout}:img", "--from-dir", rootfs, "--json"),
                                 env=python_env(), cwd=ROOT).stdout)
        oci = os.path.join(work, "oci")
        run(["umoci", "init", "--layout", oci])
        run(["umoci", "new", "--image", f"{oci}:img"])
        run(["umoci", "insert", "--image", f"{oci}:img", rootfs, "/"])
        with running_registry(os.path.join(work, "registry")) as reg:
            run(lazyfs_cmd("push", f"oci:{layout}:img", f"{reg.registry}/{LAZY_TAG}", "--plain-http", reg.registry),
                env=python_env(), cwd=ROOT)
            run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{oci}:img", f"docker://{reg.registry}/{OCI_TAG}"])
            storage = str(reg.root)
        with open(os.path.join(oci, "index.json")) as f:
            desc = json.load(f)["manifests"][0]
        with open(os.path.join(oci, "blobs", *desc["digest"].split(":"))) as f:
            oci_bytes = sum(layer["size"] for layer in json.load(f)["layers"])
        os.makedirs(cached)
        shutil.move(storage, os.path.join(cached, "storage"))
        workload, expect = WORKLOADS[kind]
        image = FleetImage(kind, os.path.join(cached, "storage"), created["layer_size"], oci_bytes,
                           created["virtual_size"], tree, workload, expect)
        with open(meta_file + ".tmp", "wb") as f:
            pickle.dump(dataclasses.asdict(image), f)
        os.replace(meta_file + ".tmp", meta_file)
        return image
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the fleet


@dataclass
class Host:
    index: int
    rack: int
    node: Node
    dir: str
    config: str
    target: str
    socket: str
    daemon: Proc | None = None
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"h{self.index}"


@dataclass
class Rack:
    index: int
    node: Node
    dir: str
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{self.node.addr}:{REGISTRY_PORT}"


class Fleet:
    """The topology of one run; ``with Fleet(...) as fleet`` builds it, leaving removes all of it."""

    def __init__(self, image: FleetImage, hosts: int, racks: int, *, tier: str = "cache", workdir: str | None = None,
                 host_mbit: float = 1000, rack_mbit: float = 10000, origin_mbit: float = 1000,
                 origin_rtt: float = 0.02, background: bool = False, log: Callable[[str], None] = print) -> None:
        if not 1 <= racks <= hosts <= 200 or tier not in ("cache", "mirror"):
            raise ValueError(f"bad fleet: {hosts} hosts, {racks} racks, tier {tier!r}")
        self.image, self.tier, self.background, self.log = image, tier, background, log
        self.n_hosts, self.n_racks = hosts, racks
        self.rates = {"host": host_mbit, "rack": rack_mbit, "origin": origin_mbit}
        self.origin_rtt = origin_rtt
        self.workdir = workdir
        self.tag = f"lzf{os.getpid() % 10000}"
        self.hosts: list[Host] = []
        self.racks: list[Rack] = []
        self._stack = contextlib.ExitStack()
        self._origin_procs: list[Proc] = []
        self._proxy: subprocess.Popen | None = None
        self.origin_name = ""

    # -- lifecycle

    def __enter__(self) -> Fleet:
        try:
            self._build()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _build(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lazyfs-fleet-", dir=self.workdir)
        self._stack.callback(shutil.rmtree, self.dir, True)
        self.net = self._stack.enter_context(Network(self.tag))
        self.origin = self.net.add("o", ORIGIN_ADDR, self.rates["origin"])
        self._start_origin()
        for k in range(self.n_racks):
            node = self.net.add(f"r{k}", f"{PREFIX}.1.{k + 1}", self.rates["rack"])
            rack = Rack(k, node, os.path.join(self.dir, f"rack{k}"))
            os.makedirs(rack.dir)
            self.racks.append(rack)
            self.start_tier(rack)
        self._stack.callback(self._stop_tiers)
        for i in range(self.n_hosts):
            self.add_host(rack=i * self.n_racks // self.n_hosts)

    def _start_origin(self) -> None:
        from tests.support.registry import registry_binary

        odir = os.path.join(self.dir, "origin")
        os.makedirs(odir)
        config = {"version": "0.1", "log": {"level": "error"},
                  "storage": {"filesystem": {"rootdirectory": self.image.storage}, "maintenance": {
                      "uploadpurging": {"enabled": False}, "readonly": {"enabled": True}}},
                  "http": {"addr": f"127.0.0.1:{REGISTRY_PORT + 1}", "secret": "fleet"}}
        with open(os.path.join(odir, "config.yml"), "w") as f:
            json.dump(config, f)
        reg = Proc([*self.origin.nsenter(), registry_binary(), "serve", os.path.join(odir, "config.yml")],
                   os.path.join(odir, "registry.log"))
        self._origin_procs.append(reg)
        self._stack.callback(reg.stop)
        wait_until("the origin registry", lambda: self._http_ok(self.origin, f"http://127.0.0.1:{REGISTRY_PORT + 1}/v2/"),
                   30)
        self._proxy = subprocess.Popen(
            [*self.origin.nsenter(), sys.executable, os.path.abspath(__file__), "origin-proxy", ORIGIN_ADDR,
             str(REGISTRY_PORT + 1), str(self.origin_rtt)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=python_env(), start_new_session=True)
        self._stack.callback(self._stop_proxy)
        line = self._proxy.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"the origin proxy did not start: {line}")
        self.origin_name = f"{ORIGIN_ADDR}:{line[1]}"

    def _stop_proxy(self) -> None:
        if self._proxy is not None and self._proxy.poll() is None:
            with contextlib.suppress(OSError):
                self._proxy.stdin.close()
            try:
                self._proxy.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proxy.pid, signal.SIGKILL)
                self._proxy.wait(10)

    def origin_stats(self) -> dict:
        """What the origin's proxy counted: blob body bytes sent, requests."""
        if self._proxy is None or self._proxy.poll() is not None:
            return self._last_origin_stats
        self._proxy.stdin.write("stats\n")
        self._proxy.stdin.flush()
        self._last_origin_stats = json.loads(self._proxy.stdout.readline())
        return self._last_origin_stats

    _last_origin_stats: dict = {}

    def stop_origin(self) -> None:
        """Stop the origin (registry and proxy): nothing answers on its address any more."""
        self.origin_stats()
        self._stop_proxy()
        for proc in self._origin_procs:
            proc.stop()

    @staticmethod
    def _http_ok(node: Node, url: str) -> bool:
        return subprocess.run([*node.nsenter(), "curl", "-s", "-m", "2", "-o", "/dev/null", url],
                              timeout=30).returncode == 0

    def start_tier(self, rack: Rack) -> None:
        listen = f"{rack.node.addr}:{REGISTRY_PORT}"
        if self.tier == "cache":
            cmd = ["bash", os.path.join(ROOT, "scripts", "cache-tier.sh"), os.path.join(rack.dir, "nginx"), listen,
                   self.origin_name]
        else:
            from tests.support.registry import registry_binary

            config = {"version": "0.1", "log": {"level": "error"}, "proxy": {"remoteurl": f"http://{self.origin_name}"},
                      "storage": {"filesystem": {"rootdirectory": os.path.join(rack.dir, "storage")}},
                      "http": {"addr": listen, "secret": "fleet"}}
            with open(os.path.join(rack.dir, "mirror.yml"), "w") as f:
                json.dump(config, f)
            cmd = [registry_binary(), "serve", os.path.join(rack.dir, "mirror.yml")]
        rack.proc = Proc([*rack.node.nsenter(), *cmd], os.path.join(rack.dir, "tier.log"))
        wait_until(f"rack {rack.index}'s {self.tier}", lambda: self._http_ok(rack.node, f"{rack.url}/v2/")
                   or not rack.proc.alive(), 30)
        if not rack.proc.alive():
            raise RuntimeError(f"rack {rack.index}'s {self.tier} did not start:\n{rack.proc.tail()}")

    def kill_tier(self, rack: Rack) -> None:
        """SIGKILL the rack's tier (nginx master and workers, or the mirror)."""
        rack.proc.kill(signal.SIGKILL)
        rack.proc.popen.wait(30)

    def _stop_tiers(self) -> None:
        for rack in self.racks:
            if rack.proc is not None:
                rack.proc.stop()

    def add_host(self, rack: int) -> Host:
        i = len(self.hosts)
        node = self.net.add(f"h{i}", f"{PREFIX}.2.{i + 1}", self.rates["host"])
        hdir = os.path.join(self.dir, f"h{i}")
        certs = os.path.join(hdir, "certs.d", self.origin_name)
        os.makedirs(certs)
        with open(os.path.join(certs, "hosts.toml"), "w") as f:
            f.write(f'server = "http://{self.origin_name}"\n\n[host."{self.racks[rack].url}"]\n'
                    f'  capabilities = ["pull", "resolve"]\n')
        doc = {"run_dir": os.path.join(hdir, "run"), "state_dir": os.path.join(hdir, "state"),
               "cache_root": os.path.join(hdir, "cache"), "writable_root": os.path.join(hdir, "writable"),
               "hosts_dir": os.path.join(hdir, "certs.d"), "log_level": "warning",
               "trace_record_seconds": 0, "trace_replay": False, "fetch_deadline": 120,
               "background_download": self.background, "background_delay": 0, "background_rate": 200 << 20}
        config = os.path.join(hdir, "config.json")
        with open(config, "w") as f:
            json.dump(doc, f)
        host = Host(i, rack, node, hdir, config, os.path.join(hdir, "mnt"), os.path.join(hdir, "run", "lazyfs.sock"))
        os.makedirs(host.target)
        self.hosts.append(host)
        self._stack.callback(self._release_host, host)
        return host

    def start_daemon(self, host: Host) -> None:
        host.daemon = Proc([*host.node.nsenter(), *lazyfs_cmd("daemon", "--config", host.config)],
                           os.path.join(host.dir, "daemon.log"), env=python_env(),  # malloc: the daemon tunes it itself
                           cwd="/")
        wait_until(f"{host.name}'s daemon", lambda: self._pings(host) or not host.daemon.alive(), 60)
        if not host.daemon.alive():
            raise RuntimeError(f"{host.name}'s daemon did not start:\n{host.daemon.tail()}")

    @staticmethod
    def _pings(host: Host) -> bool:
        try:
            call(host.socket, "ping", timeout=5)
            return True
        except (LazyfsError, OSError):
            return False

    def _release_host(self, host: Host) -> None:
        from lazyfs.serve import system
        from tests.support.cleanup import release_under

        if system.is_mountpoint(host.target):
            run(lazyfs_cmd("umount", host.target, "--config", host.config), env=python_env(), cwd=ROOT, check=False,
                timeout=120)
        release_under(host.dir, host.socket)
        if host.daemon is not None:
            host.daemon.stop()
        release_under(host.dir)

    # -- what the hosts do

    @property
    def ref(self) -> str:
        return f"{self.origin_name}/{LAZY_TAG}"

    def start_host(self, host: Host, started: float, mounted: threading.Event | None = None) -> dict:
        """``lazyfs mount`` + the workload on *host*; times from *started* (perf_counter)."""
        result = host.result = {"name": host.name, "rack": host.rack, "ok": False}
        try:
            run([*host.node.nsenter(), *lazyfs_cmd("mount", self.ref, host.target, "--config", host.config, "--json")],
                env=python_env(), cwd=ROOT)
            result["mount_s"] = time.perf_counter() - started
            if mounted is not None:
                mounted.set()
            out = run(["chroot", host.target, "/bin/sh", "-c", self.image.workload]).stdout
            result["start_s"] = time.perf_counter() - started
            result["workload_ok"] = self.image.expect in out
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result["error"] = str(exc)[-1000:]
        return result

    def check_tree(self, host: Host) -> bool:
        """Whether *host*'s mounted tree equals the image's source tree (reads every file)."""
        from tests.support.trees import describe_tree, tree_differences

        try:
            diffs = tree_differences(self.image.tree, describe_tree(host.target))
        except OSError as exc:
            diffs = [f"reading the tree: {exc}"]
        host.result["tree_ok"] = not diffs
        if diffs:
            host.result["tree_differences"] = diffs[:10]
        host.result["ok"] = bool(host.result.get("workload_ok")) and not diffs
        return host.result["ok"]

    def host_stats(self, host: Host) -> dict:
        stats = call(host.socket, "stats", timeout=60)
        sched = stats["scheduler"]
        sources = {s["host"]: s for s in (stats.get("registry") or {}).get("sources", [])}
        atts = list(stats["attachments"].values())
        return {"bytes_fetched": sched.get("bytes_fetched", 0), "fetch_errors": sched.get("errors", 0),
                "integrity_failures": sched.get("integrity_failures", 0),
                "background": atts[0]["trace"].get("background") if atts else None,
                "sources": {h: {k: s[k] for k in ("state", "bytes", "errors", "requests", "cold")}
                            for h, s in sources.items()}}

    def pull_host(self, host: Host, started: float) -> dict:
        """The baseline: ``skopeo copy`` through the rack's tier + ``umoci unpack`` + the workload."""
        result = host.result = {"name": host.name, "rack": host.rack, "ok": False}
        conf = os.path.join(host.dir, "registries.conf")
        with open(conf, "w") as f:
            f.write(f'[[registry]]\nlocation = "{self.origin_name}"\ninsecure = true\n'
                    f'[[registry.mirror]]\nlocation = "{self.racks[host.rack].node.addr}:{REGISTRY_PORT}"\n'
                    f'insecure = true\n')
        pulled, bundle = os.path.join(host.dir, "pulled"), os.path.join(host.dir, "bundle")
        try:
            # --registries-conf: skopeo 1.9 (Debian 12) ignores CONTAINERS_REGISTRIES_CONF
            run([*host.node.nsenter(), "skopeo", "--registries-conf", conf, "copy", "--src-tls-verify=false",
                 f"docker://{self.origin_name}/{OCI_TAG}", f"oci:{pulled}:img"])
            result["tier_bytes"] = self.net.counters(self.racks[host.rack].node)["tx_bytes"]
            result["pull_s"] = time.perf_counter() - started
            run(["umoci", "unpack", "--image", f"{pulled}:img", bundle])
            out = run(["chroot", os.path.join(bundle, "rootfs"), "/bin/sh", "-c", self.image.workload]).stdout
            result["start_s"] = time.perf_counter() - started
            result["ok"] = result["workload_ok"] = self.image.expect in out
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result["error"] = str(exc)[-1000:]
        finally:
            shutil.rmtree(pulled, ignore_errors=True)
            shutil.rmtree(bundle, ignore_errors=True)
        return result

    def at_once(self, hosts: list[Host], action: Callable[[Host, float], dict],
                during: Callable[[], None] | None = None) -> float:
        """Run *action* on every host at the same moment (threads behind a barrier); *during*
        runs in this thread meanwhile. Returns the wall time."""
        barrier = threading.Barrier(len(hosts) + 1)
        t0: list[float] = []

        def one(host: Host) -> None:
            barrier.wait(60)
            action(host, t0[0])

        threads = [threading.Thread(target=one, args=(h,), daemon=True) for h in hosts]
        for t in threads:
            t.start()
        t0.append(time.perf_counter())
        barrier.wait(60)
        if during is not None:
            during()
        for t in threads:
            t.join(STEP_TIMEOUT * 3)
            if t.is_alive():
                raise RuntimeError("a host did not finish within the step timeout")
        return time.perf_counter() - t0[0]

    def traffic(self) -> dict:
        origin = self.net.counters(self.origin)
        racks = []
        for rack in self.racks:
            c = self.net.counters(rack.node)
            served, fetched = c["tx_bytes"], c["rx_bytes"]
            racks.append({"rack": rack.index, "tier": self.tier, "served_bytes": served, "fetched_bytes": fetched,
                          "byte_hit_rate": round(1 - fetched / served, 4) if served else None})
        return {"origin_egress_bytes": origin["tx_bytes"], "origin_blob_bytes": self.origin_stats().get("blob_bytes"),
                "racks": racks}


def summary(fleet: Fleet, wall: float, cpu: float, before: dict) -> dict:
    traffic = fleet.traffic()
    starts = [h.result["start_s"] for h in fleet.hosts if "start_s" in h.result]
    out = {"hosts": [h.result for h in fleet.hosts], "tier": fleet.tier, "racks_count": fleet.n_racks,
           "origin_egress_bytes": traffic["origin_egress_bytes"] - before["origin_egress_bytes"],
           "origin_blob_bytes": traffic["origin_blob_bytes"], "racks": traffic["racks"],
           "wall_s": round(wall, 3), "cpu_busy_s": round(cpu, 2), "cpus": os.cpu_count(),
           "cpu_utilization": round(cpu / (wall * (os.cpu_count() or 1)), 3) if wall else None}
    if starts:
        out["start_p50_s"] = round(statistics.median(starts), 3)
        out["start_p99_s"] = round(percentile(starts, 99), 3)
    return out


def run_fleet(image: FleetImage, hosts: int, racks: int, *, tier: str, mode: str = "lazy", check_trees: bool = True,
              log: Callable[[str], None] = print, **kw) -> dict:
    """One fleet start (*mode* ``lazy`` or ``pull``), measured; the JSON-ready result."""
    with Fleet(image, hosts, racks, tier=tier, log=log, **kw) as fleet:
        if mode == "lazy":
            for host in fleet.hosts:
                fleet.start_daemon(host)
        before = {"origin_egress_bytes": fleet.net.counters(fleet.origin)["tx_bytes"]}
        fleet.origin_stats()
        cpu0 = cpu_busy_seconds()
        action = fleet.start_host if mode == "lazy" else fleet.pull_host
        wall = fleet.at_once(fleet.hosts, action)
        cpu = cpu_busy_seconds() - cpu0
        result = summary(fleet, wall, cpu, before)
        result["mode"] = mode
        if mode == "lazy":
            for host in fleet.hosts:
                host.result.update(fleet.host_stats(host))
            result["at_start"] = {"origin_egress_bytes": result["origin_egress_bytes"],
                                  "origin_blob_bytes": result["origin_blob_bytes"]}
            if check_trees:  # every host reads its whole tree: the egress bound then covers the whole image
                for host in fleet.hosts:
                    fleet.check_tree(host)
                after = summary(fleet, wall, cpu, before)
                result.update({k: after[k] for k in ("origin_egress_bytes", "origin_blob_bytes", "racks")})
                result["hosts"] = [h.result for h in fleet.hosts]
        return result


# ---------------------------------------------------------------- the origin's proxy (a subprocess in its netns)


def origin_proxy_main(addr: str, upstream_port: int, rtt: float) -> None:
    """A FaultProxy on *addr* adding *rtt* per request to the registry on 127.0.0.1:upstream_port;
    prints ``ready PORT``; answers each ``stats`` line on stdin with a JSON line; exits at EOF."""
    from tests.support.proxy import FaultProxy

    proxy = FaultProxy(upstream_port)
    proxy.host = addr
    proxy.faults.latency = rtt
    ready = threading.Event()
    import trio

    def serve() -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.run)
                ready.set()

        trio.run(main)

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(30)
    print(f"ready {proxy.port}", flush=True)
    for line in sys.stdin:  # bounded by the parent: it closes stdin when done
        if line.strip() == "stats":
            records = proxy.requests()
            blob = sum(r.body_bytes for r in records if "/blobs/" in r.target)
            print(json.dumps({"blob_bytes": blob, "requests": len(records),
                              "body_bytes": proxy.statistics().body_bytes_to_client}), flush=True)


# ---------------------------------------------------------------- command line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, required=True)
    ap.add_argument("--racks", type=int, default=1)
    ap.add_argument("--json", required=True, help="write the result here")
    ap.add_argument("--tier", choices=("cache", "mirror"), default="cache")
    ap.add_argument("--image", choices=("debian", "small"), default="debian")
    ap.add_argument("--baseline", action="store_true", help="also run the fleet doing skopeo copy + umoci unpack")
    ap.add_argument("--background", action="store_true", help="background download on")
    ap.add_argument("--no-tree-check", action="store_true")
    ap.add_argument("--host-mbit", type=float, default=1000)
    ap.add_argument("--rack-mbit", type=float, default=10000)
    ap.add_argument("--origin-mbit", type=float, default=1000)
    ap.add_argument("--origin-rtt", type=float, default=0.02)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("fleet.py needs root (namespaces, FUSE, loop devices, chroot)")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    image = prepare_image(args.image)
    kw = dict(host_mbit=args.host_mbit, rack_mbit=args.rack_mbit, origin_mbit=args.origin_mbit,
              origin_rtt=args.origin_rtt, background=args.background, workdir=args.workdir)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.uname().nodename}, {os.cpu_count()} cores, "
              f"{os.uname().release}", "image": args.image, "image_compressed_bytes": image.compressed_bytes,
              "oci_image_compressed_bytes": image.oci_compressed_bytes, "image_virtual_size": image.virtual_size,
              "settings": {**kw, "hosts": args.hosts, "racks": args.racks, "tier": args.tier}}
    lazy = run_fleet(image, args.hosts, args.racks, tier=args.tier, check_trees=not args.no_tree_check, **kw)
    result.update(lazy)
    per_rack = lazy["origin_egress_bytes"] / args.racks / image.compressed_bytes
    print(f"lazy: {sum(h['ok'] for h in lazy['hosts'])}/{args.hosts} ok; start p50 {lazy.get('start_p50_s')} s, "
          f"p99 {lazy.get('start_p99_s')} s; origin egress {lazy['origin_egress_bytes'] / 1e6:.1f} MB "
          f"({per_rack:.2f}x the image per rack); CPU {lazy['cpu_utilization']:.0%} busy", flush=True)
    if args.baseline:
        pull = run_fleet(image, args.hosts, args.racks, tier=args.tier, mode="pull", **kw)
        result["baseline"] = pull
        per_rack = pull["origin_egress_bytes"] / args.racks / image.oci_compressed_bytes
        print(f"pull: {sum(h['ok'] for h in pull['hosts'])}/{args.hosts} ok; start p50 {pull.get('start_p50_s')} s, "
              f"p99 {pull.get('start_p99_s')} s; origin egress {pull['origin_egress_bytes'] / 1e6:.1f} MB "
              f"({per_rack:.2f}x the OCI image per rack); CPU {pull['cpu_utilization']:.0%} busy", flush=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "origin-proxy":
        origin_proxy_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
