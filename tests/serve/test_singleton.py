"""One daemon per run directory: concurrent starts, a second daemon, stale exports and sockets.

Break-test (done once, see the report of the change that added this file): with the
``daemon_lock`` in ``run_daemon`` and the ``start_lock`` in ``ensure_daemon`` removed,
`test_twenty_concurrent_mounts_start_one_daemon` fails (mounts fail with ``losetup: ... No such
file`` and more than one daemon reports ready).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from lazyfs.errors import BusyError
from lazyfs.serve import system
from lazyfs.serve.control import call
from lazyfs.serve.controlserver import serve_control
from lazyfs.serve.singleton import daemon_lock, owner_pid
from tests.serve.conftest import ROOT, leftovers

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop]

N_MOUNTS = 20


def daemon_pids(config_path: str) -> list[int]:
    """Live `lazyfs daemon` processes started for *config_path* (by ensure_daemon or by hand)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z" or b"lazyfs.cli" not in argv or b"daemon" not in argv:
            continue
        if config_path.encode() in argv or f"LAZYFS_CONFIG={config_path}".encode() in environ:
            found.append(int(pid))
    return found


def log_lines(run_dir: str, text: str) -> int:
    try:
        with open(os.path.join(run_dir, "daemon.log")) as f:
            return sum(text in line for line in f)
    except FileNotFoundError:
        return 0


def test_twenty_concurrent_mounts_start_one_daemon(env, tmp_path):
    doc = dict(env.doc, run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"))
    cfg = str(tmp_path / "cfg.json")
    with open(cfg, "w") as f:
        json.dump(doc, f)
    sock = os.path.join(doc["run_dir"], "lazyfs.sock")
    targets = [tmp_path / f"mnt{i}" for i in range(N_MOUNTS)]
    for t in targets:
        t.mkdir()
    assert daemon_pids(cfg) == []
    procs = [subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "mount", env.ref, str(t), "--config", cfg],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for t in targets]
    try:
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        failed = [f"{t.name}: rc={rc} {err.strip()}" for t, (rc, err) in zip(targets, results) if rc]
        assert failed == [], "\n".join(failed)
        assert len(daemon_pids(cfg)) == 1
        assert log_lines(doc["run_dir"], " starting for ") == 1  # one daemon ever took the lock
        assert log_lines(doc["run_dir"], " ready: export ") == 1
        assert log_lines(doc["run_dir"], "stale FUSE export") == 0  # no live session was aborted
        assert owner_pid(doc["run_dir"]) == daemon_pids(cfg)[0]
        for t in targets:
            assert (t / "marker").read_text() == "lazyfs marker\n"
        assert len(call(sock, "list")) == N_MOUNTS
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for t in targets:
            subprocess.run([sys.executable, "-m", "lazyfs.cli", "umount", str(t), "--config", cfg],
                           cwd=ROOT, capture_output=True, timeout=120)
        for pid in daemon_pids(cfg):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while daemon_pids(cfg) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert daemon_pids(cfg) == []
    assert leftovers(env) == []
    assert not any(m.mountpoint.startswith(str(tmp_path)) for m in system.mounts())


def test_second_daemon_leaves_the_live_one_alone(env, tmp_path):
    """A second `lazyfs daemon` fails with one line; the first one's export and socket keep working."""
    export = tmp_path / "exp"
    env.lazyfs("export", env.ref, str(export))
    try:
        pid = env.daemon_pid()
        with open(export / "disk.img", "rb") as f:
            head = f.read(65536)
        second = env.lazyfs("daemon", check=False, timeout=60)
        assert second.returncode != 0
        assert second.stderr.strip().count("\n") == 0, second.stderr
        assert f"a lazyfs daemon (pid {pid}) already owns" in second.stderr
        assert env.daemon_pid() == pid  # the socket was not unlinked
        with open(export / "disk.img", "rb") as f:  # the FUSE session was not aborted
            assert f.read(65536) == head
    finally:
        env.lazyfs("umount", str(export))


def test_umount_after_kill_clears_only_a_dead_daemons_export(env, tmp_path):
    export = tmp_path / "exp"
    env.lazyfs("export", env.ref, str(export))
    os.kill(env.daemon_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while owner_pid(env.doc["run_dir"]) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owner_pid(env.doc["run_dir"]) is None  # the kernel dropped the dead daemon's lock
    assert system.is_mountpoint(env.doc["run_dir"] + "/export")
    env.lazyfs("umount", str(export))
    assert not system.is_mountpoint(env.doc["run_dir"] + "/export")


def test_daemon_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    run_dir = str(tmp_path / "run")
    assert owner_pid(run_dir) is None
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from lazyfs.serve.singleton import daemon_lock\n"
                               f"with daemon_lock({run_dir!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert owner_pid(run_dir) == holder.pid
        with pytest.raises(BusyError, match=f"pid {holder.pid}"):
            with daemon_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert owner_pid(run_dir) is None
    with daemon_lock(run_dir):
        assert owner_pid(run_dir) == os.getpid()
    assert owner_pid(run_dir) is None


def test_control_socket_is_never_taken_from_a_live_listener(tmp_path):
    path = str(tmp_path / "ctl.sock")

    async def handle(op, args):
        return op

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, handle)
            with pytest.raises(BusyError, match="already answers"):
                await serve_control(path, handle)
            assert await trio.to_thread.run_sync(lambda: call(path, "ping", timeout=5)) == "ping"
            nursery.cancel_scope.cancel()
        assert not os.path.exists(path)
        # a dead listener's socket file is replaced
        import socket
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(path)
        dead.close()
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, handle)
            assert await trio.to_thread.run_sync(lambda: call(path, "ping", timeout=5)) == "ping"
            nursery.cancel_scope.cancel()

    trio.run(main)
