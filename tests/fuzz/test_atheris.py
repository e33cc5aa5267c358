"""Each atheris target runs briefly (a few thousand inputs) without a failure or an out-of-memory."""

import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

from tests.fuzz.atheris_parsers import TARGETS  # noqa: E402 - only with atheris


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_atheris_target(target, tmp_path):
    # libFuzzer's -rss_limit_mb reads the peak RSS (ru_maxrss), and Linux carries the forking process's peak
    # across fork + exec: late in a full run this pytest process holds over 1 GiB, and the fuzzer then
    # "runs out of memory" before its first input. A shell in between forks once more, from a small process.
    command = [sys.executable, "-m", "tests.fuzz.atheris_parsers", target, "-runs=3000", "-seed=1",
               "-rss_limit_mb=1024", "-max_len=4096", str(tmp_path)]
    proc = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *command],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 3000 runs" in proc.stderr, proc.stderr[-2000:]
