"""Upgrade: a reader of a loop-mounted ext4 on a lazyfs export runs across a restart of the daemon
into a *different installed version* (a second virtualenv, lazyfs installed non-editable from a
copy of the tree with another ``__version__`` and metadata), following the procedure of
docs/daemon.md ("Live restart and upgrade", "Procedures"): ``kill -TERM`` of the old daemon, then
the new version's ``lazyfs daemon``.

Real registry (behind a fault proxy), real FUSE, loop device and ext4. As in test_live_restart.py,
the proxy holds every blob read once the image is mounted, so one of the reader's cold reads is in
flight in the old daemon when it hands over; the new version answers it after FUSE_NOTIFY_RESEND.
Zero read errors, every checksum matches, and the new daemon reports the other version.

Broken on purpose once (2026-12-06): with ``takeover._kept`` made to return None in the copy that
becomes the second install (the new version never takes the kept connection over), the reader's
request in flight at the handover is never answered and the test went red ("the reader is stuck").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import lazyfs
from lazyfs.serve.control import call
from lazyfs.serve.fusekernel import keeper
from lazyfs.serve.singleton import owner_pid
from tests.serve.conftest import ROOT
from tests.serve.test_live_restart import READER, Stack, checksums, wait_for
from tests.support.cleanup import release_under
from tests.support.proxy import FaultKind, FaultProxy
from tests.support.second_install import second_install

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.slow, pytest.mark.timeout(600)]

NEW_VERSION = lazyfs.__version__ + "+upgrade.test"


def test_reader_survives_an_upgrade_into_a_second_venv(env, tmp_path):
    new_lazyfs = second_install(ROOT, str(tmp_path / "second"), NEW_VERSION)
    with FaultProxy.running_in_thread(env.registry.port) as proxy:
        stack = Stack(env, tmp_path, proxy)
        target = tmp_path / "mnt"
        target.mkdir()
        reader = new = None

        def lazyfs_new(*args):  # the new version's command, run outside the source tree
            proc = subprocess.run([new_lazyfs, *args, "--config", stack.config], capture_output=True, text=True,
                                  cwd=str(tmp_path), timeout=120)
            assert proc.returncode == 0, f"new lazyfs {' '.join(args)}: {proc.stderr}"
            return proc.stdout

        try:
            stack.lazyfs("mount", stack.ref, str(target))  # starts the old version's daemon (this venv)
            old = call(stack.socket, "ping", timeout=10)
            assert old["version"] == lazyfs.__version__
            expected = checksums(str(env.src))
            assert len(expected) >= 3
            (tmp_path / "expected.json").write_text(json.dumps(expected))
            proxy.faults.stall(path="/blobs/", method="GET")  # the reader's next cold read stays in flight
            stop, progress = tmp_path / "stop", tmp_path / "progress.json"
            reader = subprocess.Popen([sys.executable, READER, str(target), str(tmp_path / "expected.json"),
                                       str(progress), str(stop)], stderr=subprocess.PIPE, text=True)
            wait_for(lambda: [r for r in proxy.requests("GET", "/blobs/") if r.fault == FaultKind.STALL],
                     "a read in flight in the old daemon")
            # the documented procedure: SIGTERM (a handover), wait for the lock, start the new version
            os.kill(old["pid"], signal.SIGTERM)
            wait_for(lambda: owner_pid(stack.doc["run_dir"]) is None, "the old daemon's exit")
            proxy.faults.clear()
            assert keeper.alive(keeper.socket_path(stack.doc["run_dir"]))
            assert reader.poll() is None  # waiting, not failing
            with open(tmp_path / "new-daemon.log", "ab") as log:
                new = subprocess.Popen([new_lazyfs, "daemon", "--config", stack.config], cwd=str(tmp_path),
                                       stdout=log, stderr=log, start_new_session=True)
            wait_for(stack.answers, "the new version's daemon")
            ping = call(stack.socket, "ping", timeout=10)
            assert ping["pid"] == new.pid and ping["version"] == NEW_VERSION
            shown = json.loads(lazyfs_new("version", "--json"))
            assert shown["version"] == NEW_VERSION
            assert (shown["daemon"]["pid"], shown["daemon"]["version"]) == (new.pid, NEW_VERSION)
            stop.touch()
            try:
                reader.wait(timeout=90)
            except subprocess.TimeoutExpired:
                raise AssertionError("the reader is stuck: the request in flight at the handover was never answered")
            assert reader.returncode == 0, reader.stderr.read()
            assert json.loads(progress.read_text())["passes"] >= 2
            fuse = call(stack.socket, "fuse-stats", timeout=10)
            assert fuse["resent_requests"] >= 1  # the read in flight at the handover, answered by the new version
            assert fuse["adopted_handles"] >= 1  # the loop device's handle, opened through the old version
            assert fuse["errors"] == 0
            assert "taking over the FUSE connection" in (tmp_path / "new-daemon.log").read_text()
            lazyfs_new("umount", str(target))
        finally:
            if reader is not None and reader.poll() is None:
                reader.kill()
            release_under(tmp_path, stack.socket)
            if new is not None:
                new.wait(timeout=30)
    assert not keeper.alive(keeper.socket_path(stack.doc["run_dir"]))
