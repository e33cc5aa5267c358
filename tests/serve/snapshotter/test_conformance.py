"""containerd's own snapshotter conformance suite against `lazyfs snapshotter`.

containerd's snapshots/testsuite (from Debian's golang-github-containerd-containerd-dev) is built
in GOPATH mode with Debian's Go into a small test binary (conformance/suite_test.go) that starts
one snapshotter process per test and reaches it the way containerd reaches a proxy plugin.
Writable roots go on a tmpfs, so committing moves trees across file systems as in production.
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import require_root

pytestmark = [pytest.mark.containerd, pytest.mark.slow]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
GOPATH_SYSTEM = "/usr/share/gocode"
SUITE = f"{GOPATH_SYSTEM}/src/github.com/containerd/containerd/snapshots/testsuite"


def test_containerd_snapshotter_conformance_suite(tmp_path):
    require_root()
    if shutil.which("go") is None:
        pytest.skip("Debian's golang-go is not installed")
    if not os.path.isdir(SUITE):
        pytest.skip("containerd's Go sources are not installed (golang-github-containerd-containerd-dev)")
    gopath = tmp_path / "gopath"
    package = gopath / "src" / "lazyfssuite"
    package.mkdir(parents=True)
    shutil.copy(os.path.join(HERE, "conformance", "suite_test.go"), package)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}:{GOPATH_SYSTEM}", "GOFLAGS": "",
           "GOCACHE": os.environ.get("GOCACHE", os.path.expanduser("~/.cache/go-build"))}
    binary = tmp_path / "suite.test"
    built = subprocess.run(["go", "test", "-c", "-o", str(binary), "."], cwd=package, env=env, capture_output=True,
                           text=True, timeout=1800)
    assert built.returncode == 0, built.stdout + built.stderr
    writable = tmp_path / "writable-disk"
    writable.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "lazyfs-suite", str(writable)], check=True)
    try:
        env["LAZYFS_SNAPSHOTTER_CMD"] = f"{sys.executable} -m lazyfs.cli snapshotter"
        env["LAZYFS_SUITE_WRITABLE"] = str(writable)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        run = subprocess.run([str(binary), "-test.v", "-test.timeout", "900s"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=1000)
    finally:
        subprocess.run(["umount", "-l", str(writable)], check=False)
    results = [line.strip() for line in run.stdout.splitlines() if line.strip().startswith("--- ")]
    print("\n".join(results))
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert "--- PASS: TestLazyfsSnapshotter " in run.stdout
    passed = [r for r in results if r.startswith("--- PASS: TestLazyfsSnapshotter/")]
    assert len(passed) >= 20 and not any(r.startswith("--- FAIL") for r in results), results
