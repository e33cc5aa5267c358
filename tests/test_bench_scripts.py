"""Every benchmark script under scripts/bench still starts: it imports what it uses and parses its arguments.

A clean-up that removed ``warm.WarmLazyfs`` left ``scripts/bench/passthrough.py`` unable to import for a
day without any test noticing. Broken on purpose once (2026-12-07): with that import put back, this test
failed naming passthrough.py.
"""

import glob
import os
import subprocess
import sys

import pytest

from tests.serve.conftest import ROOT

LIBRARIES = {"benchlib.py", "benchnet.py"}  # imported by the scripts, not run
SCRIPTS = sorted(p for p in glob.glob(os.path.join(ROOT, "scripts", "bench", "*.py"))
                 if os.path.basename(p) not in LIBRARIES)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_the_benchmark_script_starts(script):
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
