"""qemu guests on lazyfs images: the exported file as a virtio-blk disk, and a mount shared over virtio-fs."""

import json
import subprocess

import pytest

from lazyfs.serve.control import call
from tests.support.guest import Drive, Share, require_qemu
from tests.serve.conftest import leftovers

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.qemu, pytest.mark.slow]
GUEST_TIMEOUT = 180.0


def _attachment(env, directory):
    return next(a for a in call(env.socket, "list") if a.get("target") == str(directory))


@pytest.mark.timeout(600)
def test_guest_boots_with_exported_file_as_virtio_blk(env):
    guest = require_qemu()
    export = env.tmp / "vm-ro"
    env.lazyfs("export", env.ref, str(export))
    try:
        disk = export / "disk.img"
        result = guest.run(
            "set -e\nmount -t ext4 -o ro,noload /dev/vda /mnt\ncat /mnt/marker\ncat /mnt/etc/os-release\n"
            "/mnt/bin/busybox echo ran-from-image\numount /mnt\n",
            drives=[Drive(disk, read_only=True)], timeout=GUEST_TIMEOUT)
        print(f"guest boot + run: {result.seconds:.2f} s")
        assert not result.timed_out and result.returncode == 0, result.console[-3000:]
        assert result.output == 'lazyfs marker\nNAME="lazyfs test"\nran-from-image\n'
        stats = call(env.socket, "stats", name=_attachment(env, export)["name"])
        print(f"fetched {stats['bytes_missed']} stored bytes of a {stats['size']}-byte image")
        assert 0 < stats["bytes_missed"] < stats["size"] // 4  # lazy: only what the guest read
    finally:
        env.lazyfs("umount", str(export))
    assert not (export / "disk.img").exists()


@pytest.mark.timeout(600)
def test_guest_writes_reach_the_writable_layer_and_commit(env, tmp_path):
    guest = require_qemu()
    export = env.tmp / "vm-rw"
    env.lazyfs("export", env.ref, str(export), "--writable")
    try:
        disk = export / "disk.img"
        result = guest.run(
            "set -e\nmount -t ext4 /dev/vda /mnt\nmkdir -p /mnt/guest\necho from-the-guest > /mnt/guest/note\n"
            "sync\numount /mnt\n", drives=[Drive(disk)], timeout=GUEST_TIMEOUT)
        assert not result.timed_out and result.returncode == 0, result.console[-3000:]
        fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout
        cat = subprocess.run(["debugfs", "-R", "cat /guest/note", str(disk)], capture_output=True, text=True)
        assert cat.stdout == "from-the-guest\n"
        wdir = _attachment(env, export)["writable"]
        assert wdir.startswith(env.doc["writable_root"])
        out = f"oci:{tmp_path}/committed:vm"
        committed = json.loads(env.lazyfs("commit", str(export), out, "--json").stdout)
        assert committed["chunks_stored"] >= 1
    finally:
        env.lazyfs("umount", str(export))
    target = env.tmp / "mnt-vm"
    target.mkdir(exist_ok=True)
    env.lazyfs("mount", f"oci:{tmp_path}/committed:vm", str(target))
    try:
        assert (target / "guest/note").read_text() == "from-the-guest\n"
    finally:
        env.lazyfs("umount", str(target))
    assert leftovers(env) == []


@pytest.mark.timeout(600)
def test_guest_runs_from_a_lazyfs_mount_over_virtiofs(env):
    guest = require_qemu(virtiofs=True)
    target = env.tmp / "vm-fs"
    target.mkdir(exist_ok=True)
    env.lazyfs("mount", env.ref, str(target))
    try:
        result = guest.run(
            "set -e\nmount -t virtiofs lazyfs /mnt\ncat /mnt/marker\n/mnt/bin/busybox echo via-virtiofs\numount /mnt\n",
            virtiofs=Share(target, "lazyfs"), timeout=GUEST_TIMEOUT)
        assert not result.timed_out and result.returncode == 0, result.console[-3000:]
        assert result.output == "lazyfs marker\nvia-virtiofs\n"
    finally:
        env.lazyfs("umount", str(target))
    assert leftovers(env) == []
