"""The snapshotter's logic in-process: read/write splitting, lazyfs layers from labels, cleanup after
crashes, and devices restored after a restart. Real overlayfs, FUSE, loop devices and a registry."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time

import pytest
import trio

from lazyfs.config import load_config
from lazyfs.errors import AlreadyExistsError, BusyError
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.serve import system
from lazyfs.serve.control import call
from lazyfs.serve.snapshotter.core import Snapshotter
from lazyfs.serve.snapshotter.lazy import LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_SNAPSHOT_REF
from lazyfs.serve.snapshotter.table import ACTIVE, COMMITTED, LAZYFS
from tests.support.registry import registry_fixture
from tests.image.test_local import make_busybox_tree

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop]
registry = registry_fixture()


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    """A lazyfs image of a busybox tree in the registry: (reference, layer digest)."""
    tmp = tmp_path_factory.mktemp("image")
    make_busybox_tree(str(tmp / "tree"))
    local = LocalRef(str(tmp / "layout"), "v1")
    trio.run(lambda: create_image(local, from_dir=str(tmp / "tree")))
    ref = f"{registry.registry}/core/busybox:v1"
    config_path = tmp / "push.json"
    config_path.write_text(json.dumps({"registries": [{"host": registry.registry, "plain_http": True}]}))

    async def push():
        async with ImageOpener(load_config(str(config_path))) as opener:
            return await push_image(opener, local, parse_reference(ref))

    trio.run(push)
    from lazyfs.image.layout import OciLayout
    from lazyfs.format.oci import parse_manifest

    manifest = parse_manifest(OciLayout(local.path).read_manifest("v1")[0])
    return ref, manifest.layers[0].digest


@pytest.fixture
def sn(registry, tmp_path):
    """A Snapshotter with its writable root on a tmpfs; stops the daemon and unmounts everything after."""
    doc = {"run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state"), "cache_root": str(tmp_path / "chunks"),
           "trace_record_seconds": 0, "registries": [{"host": registry.registry, "plain_http": True}]}
    config_path = tmp_path / "lazyfs.json"
    config_path.write_text(json.dumps(doc))
    fast = tmp_path / "fast"
    fast.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "lazyfs-core-test", str(fast)], check=True)
    made = []

    def make():
        s = Snapshotter(str(tmp_path / "root"), str(fast / "w"), load_config(str(config_path)), str(config_path))
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()
        try:
            call(os.path.join(doc["run_dir"], "lazyfs.sock"), "stop", timeout=30)
        except Exception:
            pass
        deadline = time.monotonic() + 30
        while os.path.exists(os.path.join(doc["run_dir"], "lazyfs.sock")) and time.monotonic() < deadline:
            time.sleep(0.1)
        for m in sorted(system.mounts(), key=lambda m: -len(m.mountpoint)):
            if m.mountpoint.startswith(str(tmp_path) + "/"):
                subprocess.run(["umount", "-l", m.mountpoint], check=False)
        for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines():
            if str(tmp_path) in line:
                subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)


def _mount(mounts, target):
    for m in mounts:
        subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)], check=True)


def test_unpacked_layers_go_to_the_cache_root_and_containers_to_the_writable_root(sn, tmp_path):
    s = sn()
    s.prepare("default/1/extract-123-abc sha256:aa", "", {})
    s.commit("layer", "default/1/extract-123-abc sha256:aa", {})
    mounts = s.prepare("container", "layer", {})
    (layer,) = [x for x in s.store.all() if x.key == "layer"]
    (container,) = [x for x in s.store.all() if x.key == "container"]
    assert s.fs_dir(layer).startswith(s.root + "/") and s.fs_dir(container).startswith(s.writable_root + "/")
    assert mounts[0].type == "overlay" and f"upperdir={s.fs_dir(container)}" in mounts[0].options
    target = tmp_path / "c"
    target.mkdir()
    _mount(mounts, target)
    try:
        (target / "written").write_bytes(b"x" * 100_000)
    finally:
        subprocess.run(["umount", str(target)], check=True)
    size, inodes = s.usage("container")
    assert size >= 100_000 and inodes == 2  # the upper directory and the file
    committed = s.commit("image-of-container", "container", {"k": "v"})  # tmpfs -> cache root: a copy
    assert committed.usage == (size, inodes) and s.usage("image-of-container") == (size, inodes)
    assert os.path.exists(os.path.join(s.fs_dir(committed), "written"))
    assert os.listdir(os.path.join(s.writable_root, "snapshots")) == []
    with pytest.raises(BusyError):
        s.remove("layer")  # it has a child


def test_cleanup_removes_what_a_crash_left_behind(sn, image):
    ref, layer = image
    s = sn()
    target = "sha256:" + "c" * 64
    labels = {LABEL_SNAPSHOT_REF: target, LABEL_IMAGE_REF: ref, LABEL_LAYER_DIGEST: layer}
    with pytest.raises(AlreadyExistsError):
        s.prepare("ns/1/extract-1 " + target, "", labels)
    remote = s.stat(target)
    assert (remote.kind, remote.backend) == (COMMITTED, LAZYFS)
    s.prepare("running", target, {})
    s.prepare("doomed", target, {})
    doomed = s.stat("doomed")
    assert system.is_mountpoint(s.mount_dir(doomed))
    # a crash after the row went, before the device and directories did
    db = sqlite3.connect(os.path.join(s.root, "metadata.db"))
    with db:
        db.execute("DELETE FROM snapshots WHERE key = 'doomed'")
    db.close()
    # and a few more half-done things: directories of uncommitted rows, an image nobody uses
    os.makedirs(os.path.join(s.root, "snapshots", "9999", "fs"))
    os.makedirs(os.path.join(s.writable_root, "snapshots", "9998", "work"))
    os.makedirs(os.path.join(s.root, "images", "0" * 64))
    removed = s.cleanup()
    assert f"device of snapshot #{doomed.id}" in removed
    assert not os.path.exists(s.mount_dir(doomed)) and not os.path.exists(s.snapshot_dir(doomed))
    names = {a["name"] for a in call(s.config.socket_path, "list")}
    assert names == {s.devices.name(s.stat("running").id)}
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert s.devices.name(doomed.id) + "/" not in loops
    assert sorted(os.listdir(os.path.join(s.root, "snapshots"))) == []
    assert os.listdir(os.path.join(s.writable_root, "snapshots")) == [str(s.stat("running").id)]
    assert os.listdir(os.path.join(s.root, "images")) == [remote.extra["layout"].rsplit("/", 1)[1]]
    # what is referenced is untouched and still works
    running = s.stat("running")
    assert os.path.exists(os.path.join(s.mount_dir(running), "bin", "busybox"))
    assert not system.loop_direct_io(running.extra["loop"])  # read-only lazy layer: buffered loop (docs/warm.md)
    s.remove("running")
    s.remove(target)
    s.cleanup()
    assert call(s.config.socket_path, "list") == []
    assert os.listdir(os.path.join(s.root, "mnt")) == [] and os.listdir(os.path.join(s.root, "images")) == []


def test_a_restart_restores_a_lost_device_and_keeps_ids(sn, image, tmp_path):
    ref, layer = image
    s = sn()
    target = "sha256:" + "d" * 64
    with pytest.raises(AlreadyExistsError):
        s.prepare("x", "", {LABEL_SNAPSHOT_REF: target, LABEL_IMAGE_REF: ref, LABEL_LAYER_DIGEST: layer})
    mounts = s.prepare("ctr", target, {})
    snap = s.stat("ctr")
    subprocess.run(["umount", s.mount_dir(snap)], check=True)  # lost, as after a reboot of the mount namespace
    s.close()
    again = sn()
    assert again.recover() == []
    assert system.is_mountpoint(again.mount_dir(snap))
    assert again.mounts("ctr") == mounts and again.stat("ctr").kind == ACTIVE
    target_dir = tmp_path / "rootfs"
    target_dir.mkdir()
    _mount(mounts, target_dir)
    try:
        with open(target_dir / "etc" / "os-release") as f:
            assert "lazyfs test" in f.read()
    finally:
        subprocess.run(["umount", str(target_dir)], check=True)
    again.remove("ctr")
    again.remove(target)
    again.cleanup()
    assert call(again.config.socket_path, "list") == []
