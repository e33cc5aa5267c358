"""Live restart: a reader of a loop-mounted ext4 on a lazyfs export runs across `kill -9` of the
daemon and a restart with zero read errors and every checksum matching.

Real registry (behind a fault proxy), real FUSE, loop device and ext4. The proxy holds every blob
read once the image is mounted, so the reader's next cold read is provably in flight in the daemon
(its FUSE request read from /dev/fuse, not answered) when the daemon is killed. The fd keeper keeps
the connection; the new daemon takes it over and sends FUSE_NOTIFY_RESEND, so that request is
answered by the new daemon.

Broken on purpose once (2026-12-05): with ``session.resend()`` removed from
``lazyfs.serve.daemon``, the reader stays blocked on the request the dead daemon had read and this
test fails (the reader does not finish; ``resent_requests`` stays 0). With the keeper disabled
(no ``keeper.spawn``), the kill aborts the connection and the reader exits with EIO (status 7).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from lazyfs.serve.control import call
from lazyfs.serve.fusekernel import keeper
from lazyfs.serve.singleton import owner_pid
from tests.serve.conftest import ROOT
from tests.support.cli import run_lazyfs
from tests.support.cleanup import release_under
from tests.support.proxy import FaultKind, FaultProxy

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.slow, pytest.mark.timeout(600)]

READER = os.path.join(ROOT, "tests", "support", "reader.py")


def checksums(root: str) -> dict[str, str]:
    """sha256 of every regular file under *root*, by relative path."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as f:
                    found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Stack:
    """A lazyfs run directory of its own whose registry is reached through a fault proxy."""

    def __init__(self, env, tmp, proxy) -> None:
        self.env, self.tmp, self.proxy = env, tmp, proxy
        host = f"127.0.0.1:{proxy.port}"
        self.ref = f"{host}/serve/busybox:v1"
        self.doc = dict(env.doc, run_dir=str(tmp / "run"), state_dir=str(tmp / "state"),
                        cache_root=str(tmp / "cache"), writable_root=str(tmp / "writable"),
                        registries=[{"host": host, "plain_http": True}], readahead_chunks=0)
        self.config = str(tmp / "config.json")
        with open(self.config, "w") as f:
            json.dump(self.doc, f)
        self.socket = os.path.join(self.doc["run_dir"], "lazyfs.sock")

    def lazyfs(self, *args, check=True):
        return run_lazyfs(self.config, *args, check=check, timeout=120)

    def start_daemon(self) -> subprocess.Popen:
        log = open(self.tmp / "daemon2.log", "ab")
        with log:
            proc = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "daemon", "--config", self.config], cwd=ROOT,
                                    stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: self.answers(), "the new daemon")
        return proc

    def answers(self) -> bool:
        try:
            call(self.socket, "ping", timeout=5)
            return True
        except Exception:
            return False

    def pid(self) -> int:
        return call(self.socket, "ping", timeout=10)["pid"]


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_reader_survives_kill_9_and_restart(env, tmp_path, how):
    """*how*: SIGKILL (a crash) or SIGTERM with an image attached (a restart or upgrade: a handover)."""
    with FaultProxy.running_in_thread(env.registry.port) as proxy:
        stack = Stack(env, tmp_path, proxy)
        target = tmp_path / "mnt"
        target.mkdir()
        reader = None
        try:
            stack.lazyfs("mount", stack.ref, str(target))
            expected = checksums(str(env.src))
            assert len(expected) >= 3
            (tmp_path / "expected.json").write_text(json.dumps(expected))
            # from now on every blob read waits: the reader's first cold read stays in flight
            proxy.faults.stall(path="/blobs/", method="GET")
            stop, progress = tmp_path / "stop", tmp_path / "progress.json"
            reader = subprocess.Popen([sys.executable, READER, str(target), str(tmp_path / "expected.json"),
                                       str(progress), str(stop)], stderr=subprocess.PIPE, text=True)
            wait_for(lambda: [r for r in proxy.requests("GET", "/blobs/") if r.fault == FaultKind.STALL],
                     "a read in flight in the daemon")
            os.kill(stack.pid(), signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
            wait_for(lambda: owner_pid(stack.doc["run_dir"]) is None, "the old daemon's exit")
            proxy.faults.clear()
            assert keeper.alive(keeper.socket_path(stack.doc["run_dir"]))  # the connection lives on
            assert reader.poll() is None  # waiting, not failing
            stack.start_daemon()
            stop.touch()
            try:
                reader.wait(timeout=90)
            except subprocess.TimeoutExpired:
                raise AssertionError("the reader is stuck: the request in flight at the kill was never answered")
            assert reader.returncode == 0, reader.stderr.read()
            assert json.loads(progress.read_text())["passes"] >= 2
            fuse = call(stack.socket, "fuse-stats", timeout=10)
            assert fuse["resent_requests"] >= 1  # the read in flight at the kill was answered by the new daemon
            assert fuse["adopted_handles"] >= 1  # the loop device's handle, opened through the dead daemon
            assert fuse["errors"] == 0
            stack.lazyfs("umount", str(target))
        finally:
            if reader is not None and reader.poll() is None:
                reader.kill()
            release_under(tmp_path, stack.socket)
    assert not keeper.alive(keeper.socket_path(stack.doc["run_dir"]))
