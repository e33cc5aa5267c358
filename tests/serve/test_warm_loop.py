"""Warm reads served by the kernel (issue 14 item 3): buffered loop, hydrated local file.

Real registry, FUSE, loop devices, ext4 and e2fsck -fn. Every read path must read the same
bytes as the merged device (the flattened image ``env.flat``).
"""

import json
import os
import signal
import stat
import subprocess
from contextlib import contextmanager

import pytest
import trio

from lazyfs.serve import system
from lazyfs.serve.control import call
from tests.serve.conftest import leftovers
from tests.support.trees import describe_tree, tree_differences

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.slow]


@pytest.fixture(scope="module")
def wenv(env):
    # the daemon's own check would hydrate the image behind the tests' backs: the tests ask for it
    env.doc["hydrated_check_interval"] = 3600
    env.doc["export_readahead"] = 1 << 20  # the kernel's 128 KiB is the default
    with open(env.config_path, "w") as f:
        json.dump(env.doc, f)
    return env


def _device_bytes_read(env, target) -> int:
    return json.loads(env.lazyfs("stats", str(target), "--json").stdout)["device"]["bytes_read"]


def _same_as_flat(env, dev):
    """The loop device reads the merged device's bytes (O_DIRECT: the loop's own read path)."""
    size = os.path.getsize(env.flat)
    with open(env.flat, "rb") as f:
        want = f.read()
    got = subprocess.run(["dd", f"if={dev}", "bs=1M", "iflag=direct", "status=none"], capture_output=True,
                         check=True).stdout
    assert len(got) == size and got == want
    fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_read_only_mount_uses_a_buffered_loop_whose_rereads_never_reach_lazyfs(wenv):
    """A read-only mount attaches a buffered loop; once a block was read, reading it again
    through the loop is served from the exported file's page cache (keep_cache): the merged
    device's byte counter does not move. (Break-checked: with the loop attached direct-I/O,
    the re-read goes to FUSE and the counter grows by the device size.)"""
    env = wenv
    target = env.tmp / "mnt-buffered"
    target.mkdir()
    info = json.loads(env.lazyfs("mount", env.ref, str(target), "--json").stdout)
    try:
        dev = info["loop"]
        assert info["loop_route"] == "buffered" and not system.loop_direct_io(dev)
        _same_as_flat(env, dev)  # the first pass: through FUSE into the exported file's cache
        before = _device_bytes_read(env, target)
        _same_as_flat(env, dev)
        # a stray page (udev's blkid probing the new device, say) may still go to FUSE; with a
        # direct-I/O loop the whole device would
        assert _device_bytes_read(env, target) - before < os.path.getsize(env.flat) // 64
        diffs = tree_differences(describe_tree(str(env.src)), describe_tree(str(target)))
        assert diffs == [], "\n".join(diffs[:20])
        env.lazyfs("umount", str(target))
        out = env.lazyfs("mount", env.ref, str(target)).stdout
        assert "buffered loop" in out
    finally:
        if system.is_mountpoint(str(target)):
            env.lazyfs("umount", str(target))
    assert leftovers(env) == []


def test_the_exported_files_are_read_ahead_as_configured(wenv):
    """The daemon sets the kernel's readahead on its exported files (``export_readahead``, 1 MiB
    here) before any loop device opens one: a sequential pass through the buffered loop then
    reaches the daemon in READs of about 1 MiB, where the kernel's own FUSE value (128 KiB, the
    default) would take eight times as many. (Break-checked: without the daemon's ``set_readahead``
    the export's read_ahead_kb read 128 and this went red; with that check left out too, the
    pass took 635 READs for the 79 MiB device, at most 128 KiB each, and the count went red.)"""
    env = wenv
    target = env.tmp / "mnt-readahead"
    target.mkdir()
    info = json.loads(env.lazyfs("mount", env.ref, str(target), "--json").stdout)  # starts the daemon if need be
    try:
        assert info["loop_route"] == "buffered"
        assert call(env.socket, "fuse-stats", timeout=30)["readahead_kb"] == 1024  # as configured
        entry = system.mount_at(os.path.join(env.doc["run_dir"], "export"))
        with open(f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb") as f:
            assert int(f.read()) == 1024
        size = os.path.getsize(env.flat)
        fd = os.open(info["path"], os.O_RDONLY)  # the exported file: forget what it has cached
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        name = info["name"]
        before = call(env.socket, "fuse-stats", timeout=30)["exports"][name]["reads"]
        # 4 KiB reads, one after another: the loop reads its backing file ahead as the kernel allows
        subprocess.run(["dd", f"if={info['loop']}", "of=/dev/null", "bs=4k", "iflag=direct", "status=none"],
                       check=True, timeout=300)
        reads = call(env.socket, "fuse-stats", timeout=30)["exports"][name]["reads"] - before
        assert 0 < reads < size // (256 << 10), (reads, size)  # at 128 KiB a READ: >= size / 128 KiB
    finally:
        env.lazyfs("umount", str(target))
    assert leftovers(env) == []


def test_set_readahead_names_what_it_could_not_do(tmp_path):
    assert system.set_readahead(tmp_path, 1 << 20) == (None, f"{tmp_path} is not a mount point")


@contextmanager
def writable_mount(env, name: str):
    """The image mounted writable at a fresh target (its `lazyfs mount --json` output), unmounted after."""
    target = env.tmp / name
    target.mkdir()
    info = json.loads(env.lazyfs("mount", env.ref, str(target), "--writable", "--json").stdout)
    try:
        yield info
    finally:
        env.lazyfs("umount", str(target))


def test_writable_mount_keeps_direct_io(wenv):
    with writable_mount(wenv, "mnt-writable") as info:
        assert info["loop_route"] == "direct" and system.loop_direct_io(info["loop"])


def test_a_fully_local_image_is_hydrated_and_new_mounts_bypass_fuse(wenv):
    """Once every chunk is local, ``hydrate-file`` writes the merged disk as one 0600 file; a new
    mount's loop reads that file (O_DIRECT), says so, and reads the same bytes and tree.
    (Break-checked: with plan() ignoring hydrated files the route assertion fails.)"""
    env = wenv
    first, second = env.tmp / "mnt-h1", env.tmp / "mnt-h2"
    first.mkdir()
    second.mkdir()
    info = json.loads(env.lazyfs("mount", env.ref, str(first), "--json").stdout)
    try:
        name = info["name"]
        subprocess.run(["dd", f"if={info['loop']}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"],
                       check=True)  # every chunk fetched, hence in the disk cache
        built = call(env.socket, "hydrate-file", name=name, timeout=120)
        assert built["path"] and built["size"] == os.path.getsize(env.flat)
        st = os.stat(built["path"])
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        assert built["path"].startswith(os.path.join(env.doc["cache_root"], "hydrated") + os.sep)
        with open(built["path"], "rb") as f, open(env.flat, "rb") as g:
            assert f.read() == g.read()
        out = env.lazyfs("mount", env.ref, str(second))
        assert "hydrated local file" in out.stdout and "no FUSE" in out.stdout
        assert "hydrated local file" in out.stderr
        entry = next(m for m in system.mounts() if m.mountpoint == str(second))
        with open(f"/sys/block/{os.path.basename(entry.source)}/loop/backing_file") as f:
            assert f.read().strip() == built["path"]
        assert system.loop_direct_io(entry.source)
        _same_as_flat(env, entry.source)
        diffs = tree_differences(describe_tree(str(env.src)), describe_tree(str(second)))
        assert diffs == [], "\n".join(diffs[:20])
        assert (second / "marker").read_text() == "lazyfs marker\n"
    finally:
        for t in (second, first):
            if system.is_mountpoint(str(t)):
                env.lazyfs("umount", str(t))
    assert leftovers(env) == []
    assert trio.run(system.find_loop_devices, built["path"]) == []  # umount detached the hydrated loop too


def test_hydrate_file_refuses_a_writable_attachment(wenv):
    with writable_mount(wenv, "mnt-hw") as info:
        with pytest.raises(Exception) as exc:
            call(wenv.socket, "hydrate-file", name=info["name"], timeout=30)
        assert "writable" in str(exc.value)


def test_a_hydrated_mount_keeps_working_when_the_daemon_dies(wenv):
    """A mount on the hydrated file reads nothing through the daemon: after SIGKILL of the
    daemon its files still read right, and ``lazyfs umount`` still undoes it."""
    env = wenv
    first, second = env.tmp / "mnt-k1", env.tmp / "mnt-k2"
    first.mkdir()
    second.mkdir()
    info = json.loads(env.lazyfs("mount", env.ref, str(first), "--json").stdout)
    try:
        subprocess.run(["dd", f"if={info['loop']}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"],
                       check=True)
        assert call(env.socket, "hydrate-file", name=info["name"], timeout=120)["path"]
    finally:
        env.lazyfs("umount", str(first))
    info = json.loads(env.lazyfs("mount", env.ref, str(second), "--json").stdout)
    try:
        assert info["loop_route"] == "hydrated"
        os.kill(env.daemon_pid(), signal.SIGKILL)
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)  # reads reach the loop
        diffs = tree_differences(describe_tree(str(env.src)), describe_tree(str(second)))
        assert diffs == [], "\n".join(diffs[:20])
    finally:
        env.lazyfs("umount", str(second))
    assert not system.is_mountpoint(str(second))
    assert leftovers(env) == []
