"""`lazyfs snapshotter` under Debian's real containerd and runc, with `lazyfs rpull` for lazy pulls.

One module-wide environment: a registry (lazyfs images are pulled through a counting proxy),
the snapshotter with its cache root on the test's disk and its writable root on a tmpfs of its
own (the "fast disk"), the lazyfs host daemon it starts, and containerd whose [proxy_plugins]
point at the snapshotter.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.fetch.credentials import Credentials
from lazyfs.fetch.registry import RegistryClient
from lazyfs.format.oci import MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, parse_manifest
from lazyfs.format.ociimage import host_platform
from lazyfs.format.reference import parse_reference
from lazyfs.image.layout import OciLayout
from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.serve import system
from lazyfs.serve.control import call
from lazyfs.serve.snapshotter import api
from tests.support.containerd import (
    SnapshotterProcess,
    oci_image_from_trees,
    push_oci_image,
    running_containerd,
    with_config,
)
from tests.support.cleanup import loop_backing_files
from tests.support.proxy import FaultProxy
from tests.support.registry import registry_fixture
from tests.conftest import require_fuse, require_loop
from tests.image.test_local import make_busybox_tree

pytestmark = [pytest.mark.containerd, pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
registry = registry_fixture()
SCRIPT = "cat /etc/os-release; echo hi > /root/x; cat /root/x"
OS_RELEASE = 'NAME="lazyfs test"\n'
OS_RELEASE_V2 = 'NAME="lazyfs test, second layer"\n'


class Env:
    def __init__(self, tmp, registry, proxy):
        self.tmp, self.registry, self.proxy = tmp, registry, proxy
        self.proxied = f"127.0.0.1:{proxy.port}"
        self.cache_root = str(tmp / "cache-disk" / "snapshotter")
        self.writable_disk = str(tmp / "fast-disk")
        self.writable_root = os.path.join(self.writable_disk, "snapshotter")
        self.config_path = str(tmp / "lazyfs.json")
        self.doc = {"run_dir": str(tmp / "run"), "state_dir": str(tmp / "state"),
                    "cache_root": str(tmp / "cache-disk" / "chunks"), "writable_root": str(tmp / "unused"),
                    "trace_record_seconds": 0, "log_level": "info",
                    "registries": [{"host": registry.registry, "plain_http": True},
                                   {"host": self.proxied, "plain_http": True}]}
        with open(self.config_path, "w") as f:
            json.dump(self.doc, f)
        self.daemon_socket = os.path.join(self.doc["run_dir"], "lazyfs.sock")
        self.snapshotter: SnapshotterProcess | None = None
        self.containerd = None

    def lazyfs(self, *args, check=True, timeout=300):
        proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", self.config_path],
                              capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"lazyfs {' '.join(args)}: {proc.stderr}\nsnapshotter log:\n{self.log_tail()}")
        return proc

    def rpull(self, ref):
        return json.loads(self.lazyfs("rpull", ref, "--address", self.containerd.address, "--json").stdout)

    def ctr(self, *args, **kw):
        return self.containerd.ctr(*args, **kw)

    def log_tail(self, n=40):
        try:
            with open(self.snapshotter.log) as f:
                return "".join(f.readlines()[-n:])
        except (OSError, AttributeError):
            return ""

    def snapshots_api(self, namespace="default"):
        """containerd's snapshot service (as clients see it), through the generated stubs."""
        import grpc

        pb = api.load()
        channel = grpc.insecure_channel("unix:" + self.containerd.address)
        stub = pb.snapshots_grpc.SnapshotsStub(channel)
        md = [("containerd-namespace", namespace)]
        return pb, stub, md, channel

    def usage(self, key):
        pb, stub, md, channel = self.snapshots_api()
        try:
            r = stub.Usage(pb.snapshots.UsageRequest(snapshotter="lazyfs", key=key), metadata=md, timeout=60)
            return r.size, r.inodes
        finally:
            channel.close()

    def container_mounts(self, key):
        pb, stub, md, channel = self.snapshots_api()
        try:
            return stub.Mounts(pb.snapshots.MountsRequest(snapshotter="lazyfs", key=key), metadata=md, timeout=60).mounts
        finally:
            channel.close()

    def wait_for_snapshotter(self):
        """After a restart, containerd reconnects to the proxy plugin with a back-off: wait for it."""
        deadline = time.monotonic() + 60
        while True:
            proc = self.ctr("snapshots", "--snapshotter", "lazyfs", "ls", check=False)
            if proc.returncode == 0 or time.monotonic() > deadline:
                return proc
            time.sleep(0.2)

    def leftovers(self) -> list[str]:
        """Whatever the snapshotter made that still exists: mounts, loop devices, directories."""
        found = [f"mount {m.mountpoint} ({m.source})" for m in system.mounts()
                 if m.mountpoint.startswith((self.cache_root, self.writable_root))]
        found += [f"loop {dev}: {back}" for dev, back in loop_backing_files() if "ctrd-" in back and str(self.tmp) in back]
        for base in (os.path.join(self.cache_root, d) for d in ("snapshots", "mnt", "images")):
            found += [os.path.join(base, e) for e in os.listdir(base)]
        base = os.path.join(self.writable_root, "snapshots")
        found += [os.path.join(base, e) for e in os.listdir(base)]
        try:
            found += [f"attachment {a['name']}" for a in call(self.daemon_socket, "list", timeout=30)]
        except Exception:
            pass
        return found

    def cleanup(self):
        """Cleanup, called on the snapshotter's own socket: containerd 1.6 runs it only after its GC
        and does not offer it to clients."""
        import grpc

        pb = api.load()
        with grpc.insecure_channel("unix:" + self.snapshotter.address) as channel:
            pb.snapshots_grpc.SnapshotsStub(channel).Cleanup(pb.snapshots.CleanupRequest(), timeout=120)


def _find(root: str, name: str) -> list[str]:
    """Files called *name* under *root*, not crossing into other file systems (the lazyfs mounts)."""
    out = []
    dev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
        out += [os.path.join(dirpath, f) for f in filenames if f == name]
    return out


@pytest.fixture(scope="module")
def env(registry, tmp_path_factory):
    require_fuse()
    require_loop()
    tmp = tmp_path_factory.mktemp("ctrd")
    with FaultProxy.running_in_thread(registry.port) as proxy:
        e = Env(tmp, registry, proxy)
        os.makedirs(e.writable_disk)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "lazyfs-fast-disk", e.writable_disk], check=True)
        try:
            _images(e)
            os.makedirs(tmp / "sn")
            e.snapshotter = SnapshotterProcess(str(tmp / "sn" / "snapshotter.sock"), e.cache_root, e.writable_root,
                                               config_path=e.config_path).start()
            try:
                with running_containerd(str(tmp / "containerd"), {"lazyfs": e.snapshotter.address}) as ctrd:
                    e.containerd = ctrd
                    yield e
            finally:
                e.snapshotter.stop()
                try:
                    call(e.daemon_socket, "stop", timeout=30)
                except Exception:
                    pass
                deadline = time.monotonic() + 30
                while os.path.exists(e.daemon_socket) and time.monotonic() < deadline:
                    time.sleep(0.1)
        finally:
            # the loops first: once their export is unmounted (lazily, here or by a daemon that found
            # it dead) their backing path is /ctrd-TAG-N/disk.img, no longer under tmp; TAG is this
            # snapshotter root's own (detaching a mounted loop clears it when its file system goes)
            ours = "/ctrd-" + hashlib.sha256(e.cache_root.encode()).hexdigest()[:8] + "-"
            loops = [dev for dev, back in loop_backing_files() if str(tmp) in back or back.startswith(ours)]
            for dev in loops:
                subprocess.run(["losetup", "-d", dev], check=False)
            for m in sorted(system.mounts(), key=lambda m: -len(m.mountpoint)):
                if m.mountpoint.startswith(str(tmp) + "/") and m.mountpoint != e.writable_disk:
                    subprocess.run(["umount", "-l", m.mountpoint], check=False)
            subprocess.run(["umount", "-l", e.writable_disk], check=False)


def _images(e: Env) -> None:
    """An ordinary two-layer OCI image and a lazyfs image of the same busybox tree, in the registry."""
    tree = e.tmp / "tree"
    make_busybox_tree(str(tree))
    os.makedirs(tree / "root")
    (tree / "data" / "unread.bin").write_bytes(os.urandom(4 << 20))  # what a lazy pull never fetches
    top = e.tmp / "top"
    os.makedirs(top / "etc")
    (top / "etc" / "os-release").write_text(OS_RELEASE)
    (tree / "etc" / "os-release").write_text('NAME="the lower layer"\n')  # the upper layer replaces it
    e.oci = oci_image_from_trees([(str(tree), ()), (str(top), ("data/dangling",))])
    e.oci_ref = f"{e.registry.registry}/plain/busybox:1"
    (tree / "etc" / "os-release").write_text(OS_RELEASE)
    local = LocalRef(str(e.tmp / "layout"), "v1")
    trio.run(lambda: create_image(local, from_dir=str(tree), size=96 << 20))
    e.lazy_ref = f"{e.proxied}/lazy/busybox:v1"
    manifest, _ = OciLayout(local.path).read_manifest("v1")
    e.lazy_manifest = parse_manifest(manifest)
    # v2: a second lazyfs layer over v1 (shares v1's layer, so their snapshots share a chain)
    (tree / "etc" / "os-release").write_text(OS_RELEASE_V2)
    local2 = LocalRef(str(e.tmp / "layout"), "v2")
    trio.run(lambda: create_image(local2, from_dir=str(tree), size=96 << 20, base=local))
    e.lazy_ref2 = f"{e.proxied}/lazy/busybox:v2"
    config = Config(registries=(RegistrySettings(e.registry.registry, plain_http=True),))

    async def push():
        async with ImageOpener(config) as opener:
            await push_image(opener, local, parse_reference(f"{e.registry.registry}/lazy/busybox:v1"))
            await push_image(opener, local2, parse_reference(f"{e.registry.registry}/lazy/busybox:v2"))
        client = RegistryClient(e.registry.configs(), Credentials(None))
        try:
            await push_oci_image(client, parse_reference(e.oci_ref), e.oci)
        finally:
            await client.aclose()

    trio.run(push)


def test_ordinary_oci_image_splits_reads_and_writes(env):
    env.ctr("image", "pull", "--plain-http", "--snapshotter", "lazyfs", env.oci_ref)
    layers = os.listdir(os.path.join(env.cache_root, "snapshots"))
    assert len(layers) == 2, layers  # unpacked read-only layers: on the cache root, nothing on the fast disk
    assert os.listdir(os.path.join(env.writable_root, "snapshots")) == []
    try:
        run = env.ctr("run", "--snapshotter", "lazyfs", env.oci_ref, "oci1", "/bin/sh", "-c", SCRIPT + "; ls /data")
        assert run.stdout.startswith(OS_RELEASE + "hi\n"), run.stdout
        assert "dangling" not in run.stdout.split()  # the top layer's whiteout
        written = _find(env.writable_root, "x")
        assert len(written) == 1 and written[0].endswith("/fs/root/x"), written
        with open(written[0]) as f:
            assert f.read() == "hi\n"
        upper = os.path.dirname(os.path.dirname(written[0]))
        assert os.path.isdir(os.path.join(os.path.dirname(upper), "work"))  # overlay's workdir beside it
        assert _find(str(env.tmp), "x") == []  # nowhere else (the fast disk is another file system)
        size, inodes = env.usage("oci1")
        du = subprocess.run(["du", "-s", "--block-size=1", upper], capture_output=True, text=True, check=True)
        assert size == int(du.stdout.split()[0]) and size > 0 and inodes >= 3
    finally:
        env.ctr("containers", "rm", "oci1", check=False)
        env.ctr("images", "rm", "--sync", env.oci_ref, check=False)
    env.cleanup()
    assert env.leftovers() == []


def test_rpull_of_a_lazyfs_image_fetches_metadata_only_then_runs(env):
    env.proxy.reset_counters()
    pulled = env.rpull(env.lazy_ref)
    assert pulled["layers"] == len(env.lazy_manifest.layers) and pulled["registered"] == pulled["layers"]
    for layer in env.lazy_manifest.layers:  # layer blobs: only ranged reads of their metadata tails
        for record in env.proxy.requests("GET", layer.digest):
            assert record.range is not None and int(record.range.split("=")[1].split("-")[0]) >= layer.meta_offset, \
                record
    fetched = env.proxy.statistics().body_bytes_to_client
    metadata = sum(l.meta_length for l in env.lazy_manifest.layers) + 32768  # tails (with footers), manifest, config
    assert fetched <= metadata, (fetched, env.proxy.requests())
    assert fetched < sum(l.size for l in env.lazy_manifest.layers) // 10
    snapshots = env.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout
    assert pulled["snapshot"] in snapshots and "Committed" in snapshots
    assert os.listdir(os.path.join(env.cache_root, "snapshots")) == []  # nothing unpacked
    try:
        run = env.ctr("run", "--snapshotter", "lazyfs", env.lazy_ref, "lazy1", "/bin/sh", "-c", SCRIPT)
        assert run.stdout == OS_RELEASE + "hi\n", run.stdout + run.stderr
        written = _find(env.writable_root, "x")
        assert len(written) == 1 and written[0].endswith("/fs/root/x"), written
        assert _find(str(env.tmp), "x") == []  # nowhere else: cache root, chunks, containerd's dirs...
        # the image itself stays as it was: its read-only ext4 has no /root/x
        mnt = [m for m in system.mounts() if m.mountpoint.startswith(os.path.join(env.cache_root, "mnt"))]
        assert len(mnt) == 1 and mnt[0].fstype == "ext4" and mnt[0].source.startswith("/dev/loop")
        assert not os.path.exists(os.path.join(mnt[0].mountpoint, "root", "x"))
        image_bytes = sum(l.size for l in env.lazy_manifest.layers)
        assert env.proxy.statistics().body_bytes_to_client < image_bytes  # lazily: not the whole image
    finally:
        env.ctr("containers", "rm", "lazy1", check=False)
        env.ctr("images", "rm", "--sync", env.lazy_ref, check=False)
    env.cleanup()
    assert env.leftovers() == []


def test_block_mode_keeps_writes_in_a_lazyfs_writable_layer(env, tmp_path):
    env.rpull(env.lazy_ref)
    try:
        run = env.ctr("run", "--snapshotter", "lazyfs", "--snapshotter-label", "containerd.io/snapshot/lazyfs.mode=block",
                      env.lazy_ref, "block1", "/bin/sh", "-c", SCRIPT)
        assert run.stdout == OS_RELEASE + "hi\n", run.stdout + run.stderr
        (mount,) = env.container_mounts("block1")
        assert mount.type == "ext4" and mount.source.startswith("/dev/loop")  # a block device, as Kata wants
        layers = [os.path.join(env.writable_root, "snapshots", d, "layer")
                  for d in os.listdir(os.path.join(env.writable_root, "snapshots"))]
        assert len(layers) == 1 and os.path.exists(os.path.join(layers[0], "layer.json")), layers
        assert _find(env.cache_root, "x") == []
        target = tmp_path / "look"
        target.mkdir()
        subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", mount.source, str(target)], check=True)
        try:
            assert (target / "root" / "x").read_text() == "hi\n"
        finally:
            subprocess.run(["umount", str(target)], check=True)
        with pytest.raises(AssertionError, match="block mode"):  # containerd cannot use it as a layer
            env.ctr("snapshots", "--snapshotter", "lazyfs", "commit", "block-commit", "block1")
    finally:
        env.ctr("containers", "rm", "block1", check=False)
        env.ctr("images", "rm", "--sync", env.lazy_ref, check=False)
    env.cleanup()
    assert env.leftovers() == []


def test_killed_snapshotter_restarts_under_running_containers(env):
    env.rpull(env.lazy_ref)
    env.ctr("image", "pull", "--plain-http", "--snapshotter", "lazyfs", env.oci_ref)
    running = {"lazy-run": env.lazy_ref, "oci-run": env.oci_ref}
    try:
        for cid, ref in running.items():
            env.ctr("run", "-d", "--snapshotter", "lazyfs", ref, cid, "/bin/sh", "-c",
                    "echo started > /root/state; while true; do sleep 1; done")
        env.snapshotter.kill()
        for cid in running:
            assert "RUNNING" in env.ctr("tasks", "ls").stdout
            out = env.ctr("tasks", "exec", "--exec-id", f"e-{cid}", cid, "/bin/sh", "-c",
                          "cat /etc/os-release /root/state; echo more >> /root/state").stdout
            assert out == OS_RELEASE + "started\n", out
        env.snapshotter.start()
        assert env.wait_for_snapshotter().returncode == 0
        for cid, ref in running.items():  # still running, still reading their images
            out = env.ctr("tasks", "exec", "--exec-id", f"f-{cid}", cid, "cat", "/etc/os-release", "/root/state").stdout
            assert out == OS_RELEASE + "started\nmore\n", out
            fresh = env.ctr("run", "--rm", "--snapshotter", "lazyfs", ref, f"new-{cid}", "/bin/sh", "-c", SCRIPT)
            assert fresh.stdout == OS_RELEASE + "hi\n", fresh.stdout
    finally:
        env.containerd.remove_everything()
    env.cleanup()
    assert env.leftovers() == []


def test_rpull_of_an_ordinary_image_without_an_index_falls_back_to_a_plain_pull(env):
    """An ordinary image with no lazyfs index: rpull pulls it the plain way (every layer downloaded
    into containerd's content store and unpacked by containerd's diff service onto ordinary
    snapshots, as `ctr image pull` does), says so in one line on stderr and in ``via``, and the image runs.

    Break test (done by hand, went red): with the CLI's stderr line removed, the one-line assert
    failed; with ``_unpack_layers`` skipped (layers left unregistered), ``ctr run`` failed."""
    proc = env.lazyfs("rpull", env.oci_ref, "--address", env.containerd.address, "--json", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "plain pull" in lines[0] and "no lazyfs index" in lines[0], proc.stderr
    pulled = json.loads(proc.stdout)
    assert pulled["via"].startswith("plain pull"), pulled
    assert (pulled["layers"], pulled["registered"]) == (2, 2)
    assert pulled["bytes_from_registry"] >= sum(len(b) for b in env.oci.layers)
    assert len(os.listdir(os.path.join(env.cache_root, "snapshots"))) == 2  # unpacked layers, as ctr pull's
    try:
        run = env.ctr("run", "--snapshotter", "lazyfs", env.oci_ref, "plain1", "/bin/sh", "-c", SCRIPT + "; ls /data")
        assert run.stdout.startswith(OS_RELEASE + "hi\n"), run.stdout
        assert "dangling" not in run.stdout.split() and "unread.bin" in run.stdout.split()
        again = env.rpull(env.oci_ref)  # the snapshots are there: nothing downloaded again
        assert (again["registered"], again["via"][:10]) == (0, "plain pull"), again
    finally:
        env.ctr("containers", "rm", "plain1", check=False)
        env.ctr("images", "rm", "--sync", env.oci_ref, check=False)
    env.cleanup()
    assert env.leftovers() == []


def test_plain_rpull_refuses_a_layer_that_is_not_its_diff_id(env):
    """An ordinary image whose config names another diff ID for its first layer: the plain pull
    refuses it in one line (containerd's diff service reports what it applied) and leaves no
    image and no snapshot named by the forged chain.

    Break test (done by hand, went red): without the ``applied.digest`` check in
    ``_unpack_layers``, rpull succeeded and committed the layer under the forged chain id. And
    (2026-12-08) with rpull's lease deleted without ``sync`` after the failure: the snapshot it
    had prepared was left (containerd's collector removes it later; this test's containerd runs
    no periodic collection, so that is every time, not once under load as in a CI run)."""
    forged = with_config(env.oci, lambda doc: doc["rootfs"]["diff_ids"].__setitem__(0, "sha256:" + "ab" * 32))
    ref = f"{env.registry.registry}/plain/forged:1"

    async def push():
        client = RegistryClient(env.registry.configs(), Credentials(None))
        try:
            await push_oci_image(client, parse_reference(ref), forged)
        finally:
            await client.aclose()

    trio.run(push)
    proc = env.lazyfs("rpull", ref, "--address", env.containerd.address, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "digest mismatch" in proc.stderr and "ab" * 32 in proc.stderr, proc.stderr
    assert ref not in env.ctr("images", "ls", "-q").stdout
    assert "ab" * 32 not in env.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout
    env.cleanup()
    assert env.leftovers() == []


@pytest.fixture(scope="module")
def multiarch(env):
    """A multi-arch index (linux/amd64, linux/arm64) of two ordinary two-layer images that differ in
    their top layer's /etc/os-release, each platform indexed by `lazyfs index --platform all`."""
    tree = env.tmp / "tree"
    images = {}
    for arch in ("amd64", "arm64"):
        top = env.tmp / f"multi-top-{arch}"
        os.makedirs(top / "etc")
        (top / "etc" / "os-release").write_text(f'NAME="{arch}"\n')
        image = oci_image_from_trees([(str(tree), ()), (str(top), ())])
        images[arch] = with_config(image, lambda doc, arch=arch: doc.update(architecture=arch))
    entries = [{"mediaType": MEDIA_TYPE_MANIFEST, "digest": image.manifest_digest, "size": len(image.manifest),
                "platform": {"os": "linux", "architecture": arch}} for arch, image in images.items()]
    index = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": entries}).encode()
    direct = f"{env.registry.registry}/plain/multi:1"

    async def push():
        client = RegistryClient(env.registry.configs(), Credentials(None))
        try:
            for image in images.values():
                await push_oci_image(client, parse_reference(direct.replace(":1", "@" + image.manifest_digest)), image)
            await client.put_manifest(parse_reference(direct), index, MEDIA_TYPE_INDEX)
        finally:
            await client.aclose()

    trio.run(push)
    summary = json.loads(env.lazyfs("index", direct, "--platform", "all", "--json", timeout=600).stdout)
    return {"ref": f"{env.proxied}/plain/multi:1", "images": images, "index_digest": hashlib.sha256(index).hexdigest(),
            "indexes": {one["platform"]: one["index"] for one in summary["platforms"]}}


def test_rpull_of_a_multi_arch_ordinary_image_picks_this_hosts_manifest_and_its_index(env, multiarch):
    """rpull of a multi-arch index (both platforms indexed) picks this host's manifest (linux/amd64
    here), registers it lazily through that manifest's own index, records the multi-arch index as
    the image in containerd (as containerd's pull does), and `ctr run` sees the amd64 tree.

    Break test (done by hand, went red): with rpull asking ``select_platform`` for linux/arm64
    whatever the host, ``via`` named the arm64 index."""
    if host_platform() != "linux/amd64":
        pytest.skip("the test's images are amd64 (busybox) and arm64")
    amd = multiarch["images"]["amd64"]
    pulled = env.rpull(multiarch["ref"])
    assert pulled["via"].startswith(f"index {multiarch['indexes']['linux/amd64']}"), pulled
    assert (pulled["manifest"], pulled["platform"]) == (amd.manifest_digest, "linux/amd64")
    assert pulled["index"] == "sha256:" + multiarch["index_digest"]
    assert (pulled["layers"], pulled["registered"]) == (2, 2)
    try:
        images = env.ctr("images", "ls").stdout
        assert multiarch["index_digest"] in images, images
        run = env.ctr("run", "--rm", "--snapshotter", "lazyfs", multiarch["ref"], "multi1", "cat", "/etc/os-release")
        assert run.stdout == 'NAME="amd64"\n', run.stdout + run.stderr
        for blob in amd.layers:  # the amd64 blobs: ranged reads of spans only, never whole
            for record in env.proxy.requests("GET", "sha256:" + hashlib.sha256(blob).hexdigest()):
                assert record.range is not None, record
    finally:
        env.ctr("images", "rm", "--sync", multiarch["ref"], check=False)
    env.cleanup()
    assert env.leftovers() == []


def test_rpull_platform_option_picks_another_platform_or_says_there_is_none(env, multiarch):
    """`rpull --platform linux/arm64` registers the arm64 manifest through the arm64 index; a platform
    the index does not list is one line naming the platforms it has, and nothing is pulled.

    Break test (done by hand, went red): with the CLI not passing ``--platform`` on, rpull took the
    host's manifest and ``via`` named the amd64 index."""
    arm = multiarch["images"]["arm64"]
    try:
        proc = env.lazyfs("rpull", multiarch["ref"], "--platform", "linux/arm64", "--address",
                          env.containerd.address, "--json")
        pulled = json.loads(proc.stdout)
        assert pulled["via"].startswith(f"index {multiarch['indexes']['linux/arm64']}"), pulled
        assert (pulled["manifest"], pulled["platform"]) == (arm.manifest_digest, "linux/arm64")
    finally:
        env.ctr("images", "rm", "--sync", multiarch["ref"], check=False)
    proc = env.lazyfs("rpull", multiarch["ref"], "--platform", "linux/s390x", "--address", env.containerd.address,
                      check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "linux/s390x" in proc.stderr and "linux/arm64" in proc.stderr, proc.stderr
    assert multiarch["ref"] not in env.ctr("images", "ls", "-q").stdout
    env.cleanup()
    assert env.leftovers() == []


def test_the_snapshotter_follows_a_multi_arch_tag_to_this_hosts_manifest(env, multiarch):
    """Labels that name a layer of a multi-arch image by tag only (no manifest digest label, as a
    client other than rpull or the CRI plugin may send): the snapshotter follows the index to this
    host's manifest and registers the layer lazily through that manifest's index.

    Break test (done by hand, went red): without the index step in ``LazyImages._fetch_manifest``,
    Prepare made an ordinary active snapshot (a plain pull) instead of answering ALREADY_EXISTS."""
    import grpc

    from lazyfs.serve.snapshotter.lazy import LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_SNAPSHOT_REF

    if host_platform() != "linux/amd64":
        pytest.skip("the test's images are amd64 (busybox) and arm64")
    amd = multiarch["images"]["amd64"]
    chain = json.loads(amd.config)["rootfs"]["diff_ids"][0]  # the bottom layer's chain id is its diff id
    labels = {LABEL_SNAPSHOT_REF: chain, LABEL_IMAGE_REF: multiarch["ref"],
              LABEL_LAYER_DIGEST: "sha256:" + hashlib.sha256(amd.layers[0]).hexdigest()}
    pb, stub, md, channel = env.snapshots_api()
    leases = pb.leases_grpc.LeasesStub(channel)
    leases.Create(pb.leases.CreateRequest(id="multi-tag"), metadata=md, timeout=60)
    try:  # under a lease, whose deletion (sync) has containerd's garbage collector remove the snapshot
        with pytest.raises(grpc.RpcError) as caught:
            stub.Prepare(pb.snapshots.PrepareSnapshotRequest(snapshotter="lazyfs", key="multi-tag " + chain,
                                                             labels=labels),
                         metadata=md + [("containerd-lease", "multi-tag")], timeout=120)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS, caught.value
        assert f"lazily via index {multiarch['indexes']['linux/amd64']}" in env.log_tail(200)
    finally:
        leases.Delete(pb.leases.DeleteRequest(id="multi-tag", sync=True), metadata=md, timeout=120)
        channel.close()
    env.cleanup()
    assert env.leftovers() == []


def test_a_two_layer_lazyfs_image_shares_its_lower_layer_with_the_image_below(env):
    try:
        pulled = env.rpull(env.lazy_ref2)
        assert (pulled["layers"], pulled["registered"]) == (2, 2)
        run = env.ctr("run", "--rm", "--snapshotter", "lazyfs", env.lazy_ref2, "two1", "cat", "/etc/os-release")
        assert run.stdout == OS_RELEASE_V2
        # v1 is v2's lower layer: already there as a snapshot, mounted from v2's metadata
        below = env.rpull(env.lazy_ref)
        assert (below["layers"], below["registered"]) == (1, 0)
        run = env.ctr("run", "--rm", "--snapshotter", "lazyfs", env.lazy_ref, "one1", "cat", "/etc/os-release")
        assert run.stdout == OS_RELEASE
        assert len(os.listdir(os.path.join(env.cache_root, "images"))) == 1
        env.ctr("images", "rm", "--sync", env.lazy_ref2)
        run = env.ctr("run", "--rm", "--snapshotter", "lazyfs", env.lazy_ref, "one2", "cat", "/etc/os-release")
        assert run.stdout == OS_RELEASE  # v1 still works: its snapshot outlived v2's image
    finally:
        env.containerd.remove_everything()
    env.cleanup()
    assert env.leftovers() == []


@pytest.fixture(scope="module")
def indexed(env):
    """An ordinary two-layer gzip image with a lazyfs index (made on this host, so trusted), whose
    lower layer holds 16 MiB of random data that no container reads; pulled through the proxy."""
    tree = env.tmp / "indexed-tree"
    make_busybox_tree(str(tree))
    os.makedirs(tree / "root")
    (tree / "data" / "unread.bin").write_bytes(os.urandom(16 << 20))
    top = env.tmp / "indexed-top"
    os.makedirs(top / "etc")
    (top / "etc" / "os-release").write_text(OS_RELEASE_V2)  # the lower layer has OS_RELEASE
    image = oci_image_from_trees([(str(tree), ()), (str(top), ())])
    direct = f"{env.registry.registry}/plain/indexed:1"

    async def push():
        client = RegistryClient(env.registry.configs(), Credentials(None))
        try:
            await push_oci_image(client, parse_reference(direct), image)
        finally:
            await client.aclose()

    trio.run(push)
    summary = json.loads(env.lazyfs("index", direct, "--json", timeout=600).stdout)
    return {"ref": f"{env.proxied}/plain/indexed:1", "image": image, "index": summary["index"],
            "layer_bytes": sum(len(b) for b in image.layers)}


def test_rpull_and_run_of_an_ordinary_image_through_its_index_fetch_only_what_is_read(env, indexed):
    """`lazyfs rpull` of an ordinary gzip image with a trusted index registers its layers lazily (the
    snapshotter reads them through the index: spans of the original blobs, verified), says so, and
    `ctr run` then fetches a small part of the image (counted at the proxy).

    Break test (done by hand): with ``LazyImages.find`` sending ordinary images straight to the
    "plain pull" answer (``return None``), rpull failed with "did not register layer"; and with
    ``open_registered`` ignoring the prefix (opening the whole index), the snapshot of the lower layer
    alone showed the upper layer's /etc/os-release.
    """
    env.proxy.reset_counters()
    pulled = env.rpull(indexed["ref"])
    assert pulled["via"].startswith(f"index {indexed['index']}"), pulled
    assert (pulled["layers"], pulled["registered"]) == (2, 2)
    assert "lazily via index" in env.log_tail(200)
    try:
        run = env.ctr("run", "--snapshotter", "lazyfs", indexed["ref"], "idx1", "/bin/sh", "-c", SCRIPT)
        assert run.stdout == OS_RELEASE_V2 + "hi\n", run.stdout + run.stderr
        fetched = env.proxy.statistics().body_bytes_to_client
        assert 0 < fetched < indexed["layer_bytes"] // 4, (fetched, indexed["layer_bytes"])
        for blob in indexed["image"].layers:  # the original blobs: ranged reads of spans only, never whole
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            for record in env.proxy.requests("GET", digest):
                assert record.range is not None, record
        written = _find(env.writable_root, "x")
        assert len(written) == 1 and written[0].endswith("/fs/root/x"), written
        assert "ordinary image" in env.log_tail(200)
        # the lower layer alone (a prefix of the index), as a snapshot on top of it sees it
        lowest = json.loads(indexed["image"].config)["rootfs"]["diff_ids"][0]  # its chain id
        env.ctr("snapshots", "--snapshotter", "lazyfs", "prepare", "idx-lower", lowest)
        (mount,) = env.container_mounts("idx-lower")
        target = env.tmp / "idx-lower-mnt"
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", mount.type, "-o", ",".join(mount.options), mount.source, str(target)],
                       check=True)
        try:
            assert (target / "etc" / "os-release").read_text() == OS_RELEASE
            assert os.path.getsize(target / "data" / "unread.bin") == 16 << 20
        finally:
            subprocess.run(["umount", str(target)], check=True)
        env.ctr("snapshots", "--snapshotter", "lazyfs", "rm", "idx-lower")
    finally:
        env.ctr("containers", "rm", "idx1", check=False)
        env.ctr("images", "rm", "--sync", indexed["ref"], check=False)
    env.cleanup()
    assert env.leftovers() == []
