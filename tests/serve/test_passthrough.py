"""FUSE passthrough of hydrated images through the daemon (issue 14 item 3, docs/warm.md §3).

Real registry, daemon, FUSE (lazyfs's own kernel-protocol front end), loop devices and ext4.
The exported ``disk.img`` of a read-only image must read exactly the merged device's bytes
(the flattened image ``env.flat``) before and after it is passed through; once passed through,
a new open is served by the kernel from the hydrated file: no READ request reaches the daemon.
"""

import json
import os
import subprocess

import pytest
import trio

from lazyfs.serve import system
from lazyfs.serve.control import call
from tests.serve.conftest import leftovers

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.slow]


@pytest.fixture(scope="module")
def penv(env):
    # the daemon's own check would hydrate and pass through behind the test's back: the test asks for it
    env.doc["hydrated_check_interval"] = 3600
    with open(env.config_path, "w") as f:
        json.dump(env.doc, f)
    return env


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _read_all(path: str, direct: bool = False) -> bytes:
    flags = ["iflag=direct"] if direct else []
    return subprocess.run(["dd", f"if={path}", "bs=1M", "status=none", *flags], capture_output=True,
                          check=True, timeout=120).stdout


def _export_stats(env, name: str) -> dict:
    return call(env.socket, "fuse-stats", timeout=30)["exports"][name]


def test_hydrated_export_is_passed_through_and_a_cold_one_never(penv):
    """Before hydration every open of the export is served by the daemon (its READs counted and
    the bytes verified against the merged device); ``hydrate-file`` passes the export through;
    then new opens (cat, O_DIRECT, a new loop device with ext4 checked by e2fsck) read the same
    bytes while the daemon sees no READ at all.

    Break-checked: with Daemon.pass_through handing the export a sparse file of the right size
    instead of the (missing) hydrated one, the very first check went red (passthrough before
    hydration, zeros instead of the image)."""
    env = penv
    target = env.tmp / "mnt-pt"
    target.mkdir()
    path = env.lazyfs("export", env.ref, str(target)).stdout.strip()
    try:
        name = next(a["name"] for a in call(env.socket, "list", timeout=30) if a["path"] == path
                    or os.path.realpath(a["path"]) == os.path.realpath(path))
        with open(env.flat, "rb") as f:
            want = f.read()
        size = len(want)
        # cold: the daemon serves and verifies every read, never a passthrough
        assert _read_all(path) == want
        st = _export_stats(env, name)
        assert not st["passthrough"] and st["passthrough_opens"] == 0
        assert st["reads"] > 0 and st["bytes_read"] >= size
        _drop_caches()
        before = _export_stats(env, name)["reads"]
        assert _read_all(path, direct=True) == want
        assert _export_stats(env, name)["reads"] > before  # still the daemon: not hydrated

        built = call(env.socket, "hydrate-file", name=name, timeout=120)
        assert built["path"] and built["passthrough"] is True
        assert _export_stats(env, name)["passthrough"]

        _drop_caches()
        reads = _export_stats(env, name)["reads"]
        assert _read_all(path) == want
        assert _read_all(path, direct=True) == want
        with open(path, "rb") as f:  # scattered preads
            for off in range(0, size, size // 97 or 1):
                assert os.pread(f.fileno(), 4096, off) == want[off:off + 4096]
        dev = trio.run(lambda: system.losetup_attach(path, read_only=True))
        try:
            assert _read_all(dev, direct=True) == want
            fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, timeout=120)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        finally:
            trio.run(system.losetup_detach, dev)
        st = _export_stats(env, name)
        assert st["reads"] == reads, "a passed-through open sent READs to the daemon"
        assert st["passthrough_opens"] >= 4
    finally:
        if system.is_mountpoint(str(target)) or os.path.exists(path):
            env.lazyfs("umount", str(target), check=False)
    assert leftovers(env) == []
