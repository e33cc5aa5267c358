"""A second, different installed version of lazyfs, for upgrade tests.

``second_install(ROOT, DIR, VERSION)`` copies the runtime package and its pyproject.toml to
DIR/src, gives the copy VERSION (``lazyfs.__version__`` and the distribution's metadata), and
installs it **non-editable** into a new virtualenv DIR/venv. The new virtualenv has no packages
of its own besides lazyfs: a ``.pth`` file puts the running interpreter's site-packages (the
dependencies scripts/setup.sh installed: trio, pyfuse3, setuptools, ...) after its own on
``sys.path``. Nothing is downloaded and nothing compiled, so it takes a few seconds on a fresh CI
machine. The running venv's editable lazyfs is not visible there: its finder is hooked in by a
``.pth`` file of the old site-packages, and ``.pth`` files of a directory reached through another
``.pth`` line are not processed.

Run the second version through DIR/venv/bin/lazyfs with a working directory outside the source
tree (``python -m lazyfs.cli`` in the checkout would import the checkout's package instead).
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys


def second_install(root: str, directory: str, version: str) -> str:
    """Install lazyfs from *root* as *version* into a virtualenv under *directory*; its ``bin/lazyfs``."""
    src = os.path.join(directory, "src")
    os.makedirs(src)
    shutil.copytree(os.path.join(root, "lazyfs"), os.path.join(src, "lazyfs"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), src)
    _substitute(os.path.join(src, "lazyfs", "__init__.py"), r'(?m)^__version__ = ".*"$', f'__version__ = "{version}"')
    _substitute(os.path.join(src, "pyproject.toml"), r'(?m)^version = ".*"$', f'version = "{version}"')
    venv = os.path.join(directory, "venv")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", venv], check=True)
    purelib = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "lazyfs-test-base.pth"), "w") as f:
        f.write("".join(p + "\n" for p in site.getsitepackages()))
    # the running venv's pip, building under the new interpreter (--python) with the setuptools it sees
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "-q",
                          "--no-deps", "--no-index", "--no-build-isolation", "--no-warn-script-location", src],
                         capture_output=True, text=True, cwd=directory)
    if pip.returncode:
        raise AssertionError(f"installing the second lazyfs failed:\n{pip.stdout}{pip.stderr}")
    shutil.rmtree(src)  # the install is a copy: nothing of it may come from the source tree
    return os.path.join(venv, "bin", "lazyfs")


def _substitute(path: str, pattern: str, replacement: str) -> None:
    with open(path) as f:
        text = f.read()
    text, count = re.subn(pattern, replacement, text, count=1)
    if count != 1:
        raise AssertionError(f"{path}: no line matches {pattern!r}")
    with open(path, "w") as f:
        f.write(text)
