"""FUSE passthrough of hydrated images through the daemon (issue 14 item 3, docs/warm.md §3).

Real registry, daemon, FUSE (lazyfs's own kernel-protocol front end), loop devices and ext4.
The exported ``disk.img`` of a read-only image must read exactly the merged device's bytes
(the flattened image ``env.flat``) before and after it is passed through; once passed through,
a new open is served by the kernel from the hydrated file: no READ request reaches the daemon.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from lazyfs.serve import system
from lazyfs.serve.control import call
from lazyfs.serve.singleton import owner_pid
from tests.serve.conftest import ROOT
from tests.support.cleanup import loop_backing_files, release_under

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
    return _export_stats_at(env.socket, name)


def _export_stats_at(sock: str, name: str) -> dict:
    return call(sock, "fuse-stats", timeout=30)["exports"][name]


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
    # from sysfs, not `losetup -a`: that hangs on another test's wedged FUSE export
    assert [m.mountpoint for m in system.mounts() if m.mountpoint == str(target)] == []
    assert [dev for dev, back in loop_backing_files() if os.path.basename(os.path.dirname(back)) == name] == []


def test_a_restarted_daemon_keeps_passing_the_export_through(penv, tmp_path):
    """A daemon restart that takes the FUSE connection over (SIGTERM with an image attached: a
    handover) keeps the export passed through with the same backing id: the kernel refuses a
    non-passthrough open while a passthrough one is held (EIO), so the new daemon must answer
    as the old one did. Held and new opens read the image; no READ reaches the new daemon.

    Break-checked: with the backing id left out of the state file (Daemon._records), the new
    daemon answered the new open without passthrough and the kernel failed it with EIO."""
    env = penv
    doc = dict(env.doc, run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"),
               cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "writable"))
    config = str(tmp_path / "config.json")
    with open(config, "w") as f:
        json.dump(doc, f)
    sock = os.path.join(doc["run_dir"], "lazyfs.sock")

    def lazyfs(*args):
        proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", config], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    target = tmp_path / "export"
    target.mkdir()
    with open(env.flat, "rb") as f:
        want = f.read()
    held = None
    try:
        path = lazyfs("export", env.ref, str(target)).strip()
        name = call(sock, "list", timeout=30)[0]["name"]
        assert _read_all(path) == want  # every chunk local
        assert call(sock, "hydrate-file", name=name, timeout=120)["passthrough"] is True
        held = open(path, "rb")
        assert held.read(65536) == want[:65536]
        old = call(sock, "ping", timeout=10)["pid"]
        os.kill(old, signal.SIGTERM)
        for _ in range(600):  # bounded wait for the handover
            if owner_pid(doc["run_dir"]) is None:
                break
            time.sleep(0.05)
        assert owner_pid(doc["run_dir"]) is None
        with open(tmp_path / "daemon2.log", "ab") as log:
            subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "daemon", "--config", config], cwd=ROOT,
                             stdout=log, stderr=log, start_new_session=True)
        for _ in range(600):
            try:
                if call(sock, "ping", timeout=5)["pid"] != old:
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.05)
        _drop_caches()
        assert _read_all(path) == want  # a new open after the takeover
        held.seek(0)
        assert held.read() == want  # the open held across it
        st = _export_stats_at(sock, name)
        assert st["passthrough"] and st["reads"] == 0 and st["passthrough_opens"] >= 1
    finally:
        if held is not None:
            held.close()
        subprocess.run([sys.executable, "-m", "lazyfs.cli", "umount", str(target), "--config", config],
                       capture_output=True, cwd=ROOT, timeout=120)
        release_under(tmp_path, sock)
