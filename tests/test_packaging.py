"""The wheel built from the repository holds the runtime package only, no test helpers (issue 15).

Broken on purpose once (2026-12-06): with ``include = ["lazyfs", "lazyfs.*", "tests", "tests.*"]``
in pyproject.toml's ``[tool.setuptools.packages.find]``, this test failed, listing
``tests/__init__.py``, ``tests/conftest.py``, ... among the wheel's files.
"""

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.serve.conftest import ROOT

pytestmark = pytest.mark.timeout(300)  # about 2 s

# what a build reads: the package, its metadata, and the test tree, so leaving it out is the wheel's choice
SOURCES = ("pyproject.toml", "README.md", "lazyfs", "tests", "scripts")


def test_the_wheel_holds_no_test_helpers(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = f"{ROOT}/{name}"
        if name.endswith((".toml", ".md")):
            shutil.copy(path, src / name)
        else:
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("lazyfs-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lazyfs/cli.py" in names and "lazyfs/serve/daemon.py" in names  # the wheel is the real one
    strays = [n for n in names if not n.startswith(("lazyfs/", "lazyfs-"))]
    assert not strays, f"not lazyfs in the wheel: {strays[:10]}"
    helpers = [n for n in names if "/testing/" in n or n.startswith("lazyfs/tests")]
    assert not helpers, helpers[:10]
