"""The control socket answers while a restarted daemon restores its attachments.

A restore can wait long for a registry (metadata not cached, registry stalled). Before this, the
daemon bound its control socket only after the restore, so every ``lazyfs`` command meanwhile
failed ("no lazyfs daemon answers", or ``ensure_daemon``'s 30 s start timeout). Now ``ping``
answers at once with ``restoring: true``, and other requests wait for the restore, so they see
every restored image.

Real registry behind a fault proxy, real daemons (``kill -9`` and a new one), FUSE, loop, ext4.

Broken on purpose once (2026-12-06): with ``serve_control`` started after the restore again (as
before), the new daemon did not answer ``ping`` while its manifest request was stalled; it
answered only once the restore had given up on the registry at the default 30 s deadline
(``restoring: false``, the image not restored), and this test went red.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from lazyfs.errors import LazyfsError
from lazyfs.serve.control import call
from lazyfs.serve.singleton import owner_pid
from tests.serve.conftest import ROOT
from tests.serve.test_live_restart import Stack, wait_for
from tests.support.cleanup import release_under
from tests.support.proxy import FaultKind, FaultProxy

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.slow, pytest.mark.timeout(300)]


def test_control_answers_during_a_restore_waiting_for_the_registry(env, tmp_path):
    with FaultProxy.running_in_thread(env.registry.port) as proxy:
        stack = Stack(env, tmp_path, proxy)
        stack.doc["fetch_deadline"] = 300  # the restore keeps retrying the stalled registry till the proxy lets go
        with open(stack.config, "w") as f:
            json.dump(stack.doc, f)
        target = tmp_path / "mnt"
        target.mkdir()
        new = None
        try:
            stack.lazyfs("mount", stack.ref, str(target))
            name = call(stack.socket, "list", timeout=10)[0]["name"]
            os.kill(stack.pid(), signal.SIGKILL)
            wait_for(lambda: owner_pid(stack.doc["run_dir"]) is None, "the old daemon's exit")
            # the restore needs the registry: no kept metadata, and the registry's answers stall
            shutil.rmtree(os.path.join(stack.doc["cache_root"], "metadata"))
            proxy.faults.stall(path="/manifests/", method="GET")
            with open(tmp_path / "new-daemon.log", "ab") as log:
                new = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "daemon", "--config", stack.config],
                                       cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
            wait_for(lambda: [r for r in proxy.requests("GET", "/manifests/") if r.fault == FaultKind.STALL],
                     "the restore's manifest request, stalled")

            def ping():
                try:
                    return call(stack.socket, "ping", timeout=5)
                except Exception:
                    return None

            answer = wait_for(ping, "ping during the restore")
            assert answer["pid"] == new.pid and answer["restoring"] is True
            # the restore stalls until the proxy lets go, so a list never answers before that (an
            # empty list, answered at once, would be the bug)
            with pytest.raises(LazyfsError, match="did not answer"):
                call(stack.socket, "list", timeout=3)
            listed = []
            lister = threading.Thread(target=lambda: listed.append(call(stack.socket, "list", timeout=120)))
            lister.start()
            proxy.faults.clear()
            lister.join(timeout=150)
            assert listed and [a["name"] for a in listed[0]] == [name]  # waited: the restored image is there
            assert call(stack.socket, "ping", timeout=10)["restoring"] is False
            stack.lazyfs("umount", str(target))
        finally:
            proxy.faults.clear()
            release_under(tmp_path, stack.socket)
            if new is not None:
                new.wait(timeout=30)
