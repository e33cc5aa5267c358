"""SIGKILL a process writing to a writable layer; every flushed write must survive.

This checks the journal's logic (torn tails, ordering of data and batches), not
durability: the page cache survives SIGKILL, so these tests pass even with every
fsync skipped (checked with ``crash_writer --skip-fsync '*'``). Power loss is
tested in test_power_loss.py.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from lazyfs.device.writable import open_writable
from lazyfs.errors import FormatError
from tests.device.crash_writer import BLOCKS, op

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_and_kill(directory: str, kind: str, seed: int, delay: float) -> tuple[int, list[bytes]]:
    child = subprocess.Popen([sys.executable, "-m", "tests.device.crash_writer", directory, kind, str(seed)],
                             cwd=ROOT, stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"READY\n"
    first = child.stdout.readline()  # kill only after a flush, however slow the machine is
    assert first.startswith(b"FLUSHED"), first
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    lines = [first.decode()] + out.decode().splitlines()
    flushed = [int(line.split()[1]) for line in lines if line.startswith("FLUSHED")]
    return (flushed[-1] if flushed else 0), out


def _allowed_states(seed: int, flushed: int, horizon: int) -> list[list[bytes | None]]:
    """Per block: the content of the last flushed op, then every later op's content (any may be on disk)."""
    allowed: list[list[bytes | None]] = [[None] for _ in range(BLOCKS)]  # None = never written
    for i in range(horizon):
        what, start, count, data = op(seed, i)
        for b in range(start, start + count):
            block = bytes(4096) if what == "discard" else data[(b - start) * 4096 : (b - start + 1) * 4096]
            if i < flushed:
                allowed[b] = [block]
            else:
                allowed[b].append(block)
    return allowed


@pytest.mark.parametrize("kind", ["sparse", "log"])
def test_sigkill_keeps_every_flushed_write(tmp_path, kind):
    rng = random.Random(1234)
    for round_ in range(12):  # x2 kinds = 24 kills
        directory = str(tmp_path / f"{kind}{round_}")
        seed = rng.randrange(1 << 30)
        flushed, _ = _run_and_kill(directory, kind, seed, rng.uniform(0.0, 0.5))
        layer = open_writable(directory)
        try:
            # ops after the last acknowledged flush may or may not have reached the disk
            states = {}
            for start, count, state in layer.lookup(0, BLOCKS):
                for b in range(start, start + count):
                    states[b] = state
            allowed = _allowed_states(seed, flushed, flushed + 20000)
            for b in range(BLOCKS):
                if states[b] == 0:
                    got = None
                elif states[b] == 2:
                    got = bytes(4096)
                else:
                    got = layer.read_blocks(b, 1)
                assert got in allowed[b], f"round {round_}: block {b} lost a flushed write (flushed ops {flushed})"
        finally:
            layer.close()
        assert flushed > 0, "the writer never flushed: the test would prove nothing"


def test_damaged_journal_is_an_error_not_garbage(tmp_path):
    directory = str(tmp_path / "w")
    _run_and_kill(directory, "sparse", 7, 0.8)
    path = os.path.join(directory, "map.journal")
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        assert len(data) > 200, "journal too small to damage in the middle"
        data[60] ^= 0xFF  # inside the first batch, with valid batches after it
        f.seek(0)
        f.write(data)
    with pytest.raises(FormatError):
        open_writable(directory)
