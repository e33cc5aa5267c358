"""Each atheris target runs briefly (a few thousand inputs) without a failure or an out-of-memory."""

import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

from tests.fuzz.atheris_parsers import TARGETS  # noqa: E402 - only with atheris


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_atheris_target(target, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz.atheris_parsers", target, "-runs=3000", "-seed=1",
                           "-rss_limit_mb=1024", "-max_len=4096", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 3000 runs" in proc.stderr, proc.stderr[-2000:]
