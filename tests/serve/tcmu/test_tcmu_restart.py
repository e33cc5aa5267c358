"""A TCMU LUN across ``kill -9`` of the daemon and a restart: a reader of an ext4 mounted from the
LUN (/dev/sdX) sees zero read errors and every checksum matches.

Real kernel (target_core_user + tcm_loop), real registry behind a fault proxy, real ext4. The
proxy holds every blob read once the LUN is mounted, so the reader's next cold read is provably
a SCSI command the daemon has taken off the ring and not answered when it is killed. The keeper
keeps the uio fd; the new daemon takes it over, maps the ring again and serves that command.
Then the daemon and its keeper are both killed: the next daemon opens the uio device again (the
kernel keeps the device and its ring across the close), and the reader still sees no error.

``test_tcmu_restart_in_qemu_guest`` runs it in a qemu guest booted with the host's Debian kernel
(this host has no target_core_user); ``test_lun_survives_kill_9_and_restart`` is the test itself,
run directly where the kernel has TCMU.

Broken on purpose (2026-12-06):
- with the uio fd not handed to a keeper (``keep=None`` in ``Daemon.tcmu_attach``) and the
  first fallback (tear the stale LUN down, make a new one), the new daemon hung removing a LUN
  with a command on its ring, and the test went red ("timed out waiting for the new daemon").
  That is why the fallback now opens the uio device again;
- with the TCMU branch removed from ``Daemon._restore_one`` (what main did before: the LUN came
  back as a FUSE export, with no handler on the ring), the reader stayed blocked and the test
  went red ("timed out waiting for a pass after the restart"; the cleanup's ``tcmu detach``
  then hung too, on the command left on the ring).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.serve.control import call
from lazyfs.serve.fusekernel import keeper
from lazyfs.serve.singleton import owner_pid
from lazyfs.serve.tcmu import keep
from tests.serve.tcmu.test_tcmu_real_kernel import GUEST_MODULES, unavailable_reason
from tests.serve.test_live_restart import READER, Stack, checksums, wait_for
from tests.support.cleanup import release_under
from tests.support.proxy import FaultKind, FaultProxy

LUN = "restart-lun"


def start_daemon(stack: Stack, tmp_path: Path) -> subprocess.Popen:
    """``lazyfs daemon`` in the background, waited for longer than ``ensure_daemon`` does: under
    TCG on a loaded host its start-up alone can take more than 30 s."""
    with open(tmp_path / "daemon2.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "daemon", "--config", stack.config],
                                cwd=str(Path(__file__).resolve().parents[3]), stdout=log, stderr=log,
                                start_new_session=True)
    wait_for(stack.answers, "the daemon", timeout=240)
    return proc


def _run(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True, timeout=120)


@pytest.mark.registry
@pytest.mark.timeout(600)
@pytest.mark.skipif(unavailable_reason() is not None, reason=f"real-kernel TCMU: {unavailable_reason()}")
def test_lun_survives_kill_9_and_restart(env, tmp_path):
    with FaultProxy.running_in_thread(env.registry.port) as proxy:
        stack = Stack(env, tmp_path, proxy)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        reader, mounted, attached = None, False, False
        try:
            start_daemon(stack, tmp_path)
            out = stack.lazyfs("tcmu", "attach", stack.ref, LUN).stdout
            attached = True
            disk = re.search(r"SCSI disk (/dev/\S+)", out).group(1)
            _run("mount", "-o", "ro,noload", disk, str(mnt))
            mounted = True
            expected = checksums(str(env.src))
            (tmp_path / "expected.json").write_text(json.dumps(expected))
            # from now on every blob read waits: the reader's first cold read stays in flight
            proxy.faults.stall(path="/blobs/", method="GET")
            stop, progress = tmp_path / "stop", tmp_path / "progress.json"
            reader = subprocess.Popen([sys.executable, READER, str(mnt), str(tmp_path / "expected.json"),
                                       str(progress), str(stop)], stderr=subprocess.PIPE, text=True)
            wait_for(lambda: [r for r in proxy.requests("GET", "/blobs/") if r.fault == FaultKind.STALL],
                     "a read in flight in the daemon", timeout=120)
            old = stack.pid()
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: owner_pid(stack.doc["run_dir"]) is None, "the old daemon's exit")
            proxy.faults.clear()
            kept = keeper.alive(keep.socket_path(stack.doc["run_dir"], LUN))  # the uio fd lives on
            assert reader.poll() is None  # waiting, not failing
            start_daemon(stack, tmp_path)
            passes = wait_for(lambda: progress.exists() and json.loads(progress.read_text())["passes"],
                              "a pass after the restart", timeout=240)
            # a second crash, the keeper killed too: the new daemon opens the uio device again
            socket_path = keep.socket_path(stack.doc["run_dir"], LUN)
            keeper_pid = int(keeper._ask(socket_path, b"ping"))
            os.kill(keeper_pid, signal.SIGKILL)
            os.kill(stack.pid(), signal.SIGKILL)
            wait_for(lambda: owner_pid(stack.doc["run_dir"]) is None, "the second daemon's exit")
            start_daemon(stack, tmp_path)
            wait_for(lambda: json.loads(progress.read_text())["passes"] > passes, "a pass after the 2nd restart",
                     timeout=240)
            stop.touch()
            try:
                reader.wait(timeout=240)
            except subprocess.TimeoutExpired:
                raise AssertionError("the reader is stuck: the command in flight at the kill was never answered")
            assert reader.returncode == 0, reader.stderr.read()
            done = json.loads(progress.read_text())
            assert done["passes"] >= 2
            print(f"TCMU restart: {done['passes']} reader passes, longest file read {done['longest_read']:.2f} s "
                  "(two kill -9 restarts under TCG)")
            assert kept
            listed = {a["name"]: a for a in call(stack.socket, "list", timeout=30)}
            assert listed[f"tcmu-{LUN}"]["tcmu"] == LUN  # a LUN again, not a FUSE export
            export_dir = call(stack.socket, "ping", timeout=30)["export_dir"]
            assert not os.path.exists(os.path.join(export_dir, f"tcmu-{LUN}"))
            log = (tmp_path / "daemon2.log").read_text()
            assert f"restored TCMU LUN {LUN}" in log and "took over its uio fd from the keeper" in log, log[-3000:]
            assert "took over its uio fd from the uio device" in log, log[-3000:]
            assert keeper.alive(socket_path)  # kept again after the reopen
            _run("umount", str(mnt))
            mounted = False
            stack.lazyfs("tcmu", "detach", LUN)
            attached = False
            assert not keeper.alive(keep.socket_path(stack.doc["run_dir"], LUN))  # detached for good: let go
        finally:
            if reader is not None and reader.poll() is None:
                reader.kill()
            if mounted:
                subprocess.run(["umount", "-l", str(mnt)], timeout=60)
            if attached:
                stack.lazyfs("tcmu", "detach", LUN, check=False)
            release_under(tmp_path, stack.socket)


GUEST_SCRIPT = r"""
set -e
mount -t configfs none /sys/kernel/config
mkdir -p /host
mount -t virtiofs -o ro root /host
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t configfs none /host/sys/kernel/config
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /repo
mount --bind /host{repo} /repo
mount -t ext4 /dev/vda /host/tmp
chmod 1777 /host/tmp
mount -t tmpfs tmpfs /host/run
mkdir -p /host{repo}
mount --bind /repo /host{repo}
chroot /host /bin/sh -c 'ip link set lo up && cd {repo} && PYTHONDONTWRITEBYTECODE=1 HOME=/tmp {python} -m pytest -q -x \
    -p no:cacheprovider --basetemp=/tmp/pt -s -o log_cli=true --log-cli-level={log_level} \
    tests/serve/tcmu/test_tcmu_restart.py -k test_lun_survives_kill_9_and_restart'
"""


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tcmu_restart_in_qemu_guest(tmp_path):
    """Boot the host's kernel with target_core_user + tcm_loop and run the restart test inside it.

    The guest's /tmp is an ext4 disk, not a tmpfs: the test image's tree has a user xattr, which
    tmpfs refuses before kernel 6.6 (Debian 12's kernel is 6.1)."""
    from tests.support import guest as G

    if unavailable_reason() is None:
        pytest.skip("the host kernel has target_core_user: test_lun_survives_kill_9_and_restart ran on it")
    vm = G.require_qemu(GUEST_MODULES + ("virtio_blk",), virtiofs=True)
    scratch = tmp_path / "guest-tmp.img"
    with open(scratch, "wb") as f:
        f.truncate(2 << 30)  # sparse
    _run("mkfs.ext4", "-q", "-F", str(scratch))
    repo = Path(__file__).resolve().parents[3]
    script = GUEST_SCRIPT.format(repo=repo, python=sys.executable,
                                 log_level=os.environ.get("LAZYFS_TCMU_GUEST_LOG", "WARNING"))
    initrd = G.build_initrd(modules=vm.modules, init_script=script, kernel=vm.kernel)
    result = G.boot(vm.vmlinux, initrd, drives=[scratch], virtiofs=G.Share(Path("/"), "root"), timeout=600, memory_mb=1024,
                    append=os.environ.get("LAZYFS_TCMU_GUEST_APPEND", ""))
    print(result.output)
    result.check()
    assert "1 passed" in result.output, result.output
