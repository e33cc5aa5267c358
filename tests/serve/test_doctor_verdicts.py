"""`lazyfs doctor`'s verdict against what `lazyfs mount` really does with the same config.

Exit status 0 must mean the mount works, 1 that it fails: each case runs both, on a registry
image, with directories on small tmpfs file systems made full or read-only.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lazyfs.serve.control import call
from tests.serve.conftest import ROOT, leftovers

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop]


def _lazyfs(config: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", config],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def _small_tmpfs(path, options: str):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "lazyfs-test", str(path)], check=True)
    return path


def _fill(path) -> None:
    subprocess.run(["dd", "if=/dev/zero", f"of={path}/fill", "bs=64k"], capture_output=True)


def _verdict_and_mount(env, tmp_path, **fields) -> tuple[dict, subprocess.CompletedProcess, str]:
    """Doctor's JSON report, then `lazyfs mount` with the same config (unmounted again if it worked)."""
    doc = {**env.doc, "run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state"),
           "cache_root": str(tmp_path / "cache"), **fields}
    config = str(tmp_path / "config.json")
    with open(config, "w") as f:
        json.dump(doc, f)
    doctor = _lazyfs(config, "doctor", "--json")
    report = json.loads(doctor.stdout)
    assert doctor.returncode == (0 if report["mount_can_work"] else 1)
    target = tmp_path / "mnt"
    target.mkdir()
    mounted = _lazyfs(config, "mount", env.ref, str(target))
    marker = ""
    try:
        if mounted.returncode == 0:
            marker = (target / "marker").read_text()
            marker += (target / "bin" / "busybox").read_bytes()[:4].decode(errors="replace")  # reads real chunks
            stats = json.loads(_lazyfs(config, "stats", str(target), "--json").stdout)
            marker += f" write_errors={stats['scheduler']['cache']['write_errors']}"
    finally:
        if mounted.returncode == 0:
            _lazyfs(config, "umount", str(target))
        try:
            call(str(tmp_path / "run" / "lazyfs.sock"), "stop", timeout=10)
        except Exception:  # noqa: BLE001 - no daemon (it never started): nothing to stop
            pass
    assert leftovers(env) == []
    return report, mounted, marker


def _status(report: dict, topic: str) -> str:
    return next(c["status"] for c in report["checks"] if c["topic"] == topic)


def test_full_state_dir_doctor_fails_and_so_does_mount(env, tmp_path):
    full = _small_tmpfs(tmp_path / "full", "size=1m")
    try:
        _fill(full)
        report, mounted, _ = _verdict_and_mount(env, tmp_path, state_dir=str(full / "state"))
    finally:
        subprocess.run(["umount", "-l", str(full)], check=True)
    assert not report["mount_can_work"] and _status(report, "state dir") == "FAIL"
    assert mounted.returncode != 0 and "No space left on device" in mounted.stderr, mounted.stderr


def test_full_cache_disk_doctor_warns_and_mount_works_without_disk_cache(env, tmp_path):
    full = _small_tmpfs(tmp_path / "full", "size=1m")
    try:
        _fill(full)
        report, mounted, marker = _verdict_and_mount(env, tmp_path, cache_root=str(full / "cache"))
    finally:
        subprocess.run(["umount", "-l", str(full)], check=True)
    assert report["mount_can_work"] and _status(report, "cache root") == "warn"
    assert mounted.returncode == 0, mounted.stderr
    assert marker.startswith("lazyfs marker\n\x7fELF")
    assert int(marker.rsplit("write_errors=", 1)[1]) > 0  # what the warning said: chunks are not kept on disk


@pytest.mark.slow
def test_cache_root_that_cannot_be_created_doctor_fails_and_so_does_mount(env, tmp_path):
    ro = _small_tmpfs(tmp_path / "ro", "size=1m,ro")
    try:
        report, mounted, _ = _verdict_and_mount(env, tmp_path, cache_root=str(ro / "cache"))
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)
    assert not report["mount_can_work"] and _status(report, "cache root") == "FAIL"
    assert mounted.returncode != 0
    log = (tmp_path / "run" / "daemon.log").read_text()
    assert "Read-only file system" in log, log[-2000:]
