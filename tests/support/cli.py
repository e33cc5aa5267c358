"""Running the lazyfs command line as a user does: ``python -m lazyfs.cli`` from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_lazyfs(config: str, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``lazyfs ARGS --config CONFIG`` (output captured as text); with *check*, a non-zero exit
    fails the test with the command's stderr."""
    proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", config],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"lazyfs {' '.join(args)} failed: {proc.stderr}")
    return proc
