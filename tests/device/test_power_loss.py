"""Power loss under the writable layers: a FUSE file system that keeps only synced data (tests/support/faultfs.py).

The SIGKILL crash test (test_crash.py) cannot see a missing fsync: the page
cache survives SIGKILL, so it passes with every fsync deleted (checked: it
does). Here the power is cut at a random request of a write/flush/reopen
workload, the file system comes back as its disk holds it, and the layer is
opened again: it must open, and every write acknowledged by a flush must read
back. Each round runs two generations on the same layer, so cuts also land
while a torn tail from the previous cut is still there.

Every fsync of the writable-layer code is needed: removing any one of them
(test_each_fsync_is_needed does it through crash_writer --skip-fsync) turns
these checks red. What went red when each was removed by hand:

* ``WritableLayer.flush`` (fdatasync of the data before the journal batch):
  "lost an acknowledged write" (sparse: the block reads as zeros or older data;
  log: also "does not open", a record points past the end of data.log).
* ``Journal.append`` (fdatasync of the batch): "lost an acknowledged write".
* ``Journal.rewrite`` (fdatasync of the compacted journal before its rename):
  "does not open" (header truncated / bad magic).
* ``fsync_dir<-Journal.rewrite`` (the rename of the compacted journal):
  "lost an acknowledged write" (the old journal came back; later batches were
  appended to the new file).
* ``write_atomically`` (layer.json and the new journal's header):
  "does not open" (layer.json not JSON, journal header truncated).
* ``fsync_dir<-write_atomically`` (their renames): "does not open" (no map.journal).
* ``SparseLayer.__init__`` (the size of a new sparse data file): "does not
  open" (data has size 0).
* ``fsync_dir<-create_writable`` (the rename that makes a new layer exist):
  "does not open" (acknowledged layer missing).
* ``fsync_dir<-makedirs_durable`` (a parent directory the layer was created
  in): "does not open" (acknowledged layer missing).

The fsync that cut a torn tail at open was removed rather than kept: nothing
turned red without it, because the next append's fdatasync makes the cut
durable and a tail that comes back after a cut is simply cut again.
"""

import errno
import os
import random
import subprocess
import sys

import pytest

from lazyfs.device.writable import open_writable
from lazyfs.errors import LazyfsError, NotFoundError, StorageError
from lazyfs.device.writable import create_writable
from tests.device.crash_writer import BLOCKS, op
from tests.support.faultfs import FaultFs

pytestmark = pytest.mark.fuse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = 120  # per generation
COMPACT_BYTES = 1500  # compact often, so cuts land in compactions too
SITES = ["WritableLayer.flush", "Journal.append", "Journal.rewrite", "fsync_dir<-Journal.rewrite",
         "write_atomically", "fsync_dir<-write_atomically", "SparseLayer.__init__", "fsync_dir<-create_writable",
         "fsync_dir<-makedirs_durable"]


@pytest.fixture(scope="module")
def faultfs(tmp_path_factory):
    with FaultFs(tmp_path_factory.mktemp("power") / "mnt") as fs:
        yield fs


def _writer(fs: FaultFs, root: str, kind: str, seed: int, *, reopen: bool, skip: str | None = None) -> list[str]:
    args = [sys.executable, "-m", "tests.device.crash_writer", root, kind, str(seed), "--ops", str(OPS),
            "--compact-bytes", str(COMPACT_BYTES)]
    if reopen:
        args.append("--open")
    if skip:
        args += ["--skip-fsync", skip]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode in (0, 3), done.stderr.decode()[-2000:]
    return done.stdout.decode().splitlines()


def _contents(layer) -> list[bytes | None]:
    """Every block: None if it falls through to the layers below, else its bytes."""
    out: list[bytes | None] = []
    for start, count, state in layer.lookup(0, BLOCKS):
        for b in range(start, start + count):
            out.append(None if state == 0 else bytes(4096) if state == 2 else layer.read_blocks(b, 1))
    return out


def _allowed(baseline: list[bytes | None], seed: int, flushed: int) -> list[list[bytes | None]]:
    """Per block: its content at the last acknowledged flush, then every later write's."""
    allowed = [[c] for c in baseline]
    for i in range(OPS):
        what, start, count, data = op(seed, i)
        for b in range(start, start + count):
            block = bytes(4096) if what == "discard" else data[(b - start) * 4096 : (b - start + 1) * 4096]
            if i < flushed:
                allowed[b] = [block]
            else:
                allowed[b].append(block)
    return allowed


def power_round(fs: FaultFs, kind: str, rng: random.Random, total_ops: int, skip: str | None = None) -> list[str]:
    """Two generations of write/flush, each cut at a random request; the broken guarantees, if any."""
    fs.reset()
    root = os.path.join(fs.mountpoint, "layers", "w")
    baseline: list[bytes | None] = [None] * BLOCKS
    created = False
    problems = []
    for generation in range(2):
        seed = rng.randrange(1 << 30)
        # a quarter of the cuts land in the first requests: creating or opening the layer, the first flush
        early = rng.random() < 0.25
        fs.arm(rng.randint(1, min(40, total_ops) if early else total_ops), seed=rng.randrange(1 << 30))
        lines = _writer(fs, root, kind, seed, reopen=created, skip=skip)
        if not fs.status()["dead"]:
            fs.cut(seed=rng.randrange(1 << 30))
        fs.power_on()
        created = created or "READY" in lines
        flushed = max([int(line.split()[1]) for line in lines if line.startswith("FLUSHED")], default=0)
        try:
            layer = open_writable(root)
        except NotFoundError as exc:
            if created:
                problems.append(f"generation {generation}: the acknowledged layer does not open: {exc}")
            return problems
        except LazyfsError as exc:
            return problems + [f"generation {generation}: the layer does not open: {exc}"]
        created = True
        try:
            got = _contents(layer)
        finally:
            layer.close()
        allowed = _allowed(baseline, seed, flushed if "READY" in lines else 0)
        lost = [b for b in range(BLOCKS) if got[b] not in allowed[b]]
        if lost:
            problems.append(f"generation {generation}: lost an acknowledged write in blocks {lost[:8]} "
                            f"(flushed ops {flushed})")
            return problems
        baseline = got
    return problems


def _total_ops(fs: FaultFs, kind: str) -> int:
    """How many mutating requests one uncut generation makes (the range for the cut)."""
    fs.reset()
    before = fs.status()["ops"]
    lines = _writer(fs, os.path.join(fs.mountpoint, "layers", "w"), kind, 99, reopen=False)
    assert "DONE" in lines, lines
    return fs.status()["ops"] - before


@pytest.mark.parametrize("kind", ["sparse", "log"])
def test_power_loss_keeps_every_acknowledged_flush(faultfs, kind):
    total = _total_ops(faultfs, kind)
    rng = random.Random(2024 + len(kind))
    problems = []
    for _ in range(20):  # x 2 generations x 2 kinds = 80 power cuts
        problems += power_round(faultfs, kind, rng, total)
    assert problems == []


@pytest.mark.parametrize("site", SITES)
def test_each_fsync_is_needed(faultfs, site):
    """With one fsync call site skipped, some power cut breaks a guarantee (the test above would go red)."""
    rng = random.Random(7)
    totals = {kind: _total_ops(faultfs, kind) for kind in ("sparse", "log")}
    for round_ in range(30):
        kind = "sparse" if site == "SparseLayer.__init__" or round_ % 2 == 0 else "log"
        if power_round(faultfs, kind, rng, totals[kind], skip=site):
            return
    pytest.fail(f"no power cut noticed that the fsyncs of {site} were skipped")


# ---------------------------------------------------------------- failed fsyncs and short writes


@pytest.mark.parametrize("kind", ["sparse", "log"])
def test_a_failed_fsync_is_never_acknowledged_later(faultfs, kind):
    """fsyncgate: after a failed fsync the kernel has dropped the pages, and a retried fsync "succeeds".

    The layer refuses writes and flushes until reopened, so the retry below
    never acknowledges the lost data. Break-test: with the refusal removed
    (``_usable`` returning at once) the retried flush succeeds and, after the
    power cut, "acknowledged write lost in block 5" (sparse: the old data) or
    "in block 9" goes red, or the log layer no longer opens (its journal points
    past the end of data.log).
    """
    faultfs.reset()
    root = os.path.join(faultfs.mountpoint, "w")
    layer = create_writable(root, kind, BLOCKS * 4096)
    a, b, c = (bytes([x]) * 4096 for x in b"abc")
    layer.write_blocks(5, a)
    layer.flush()
    acknowledged = {5: a}
    layer.write_blocks(5, b)
    layer.write_blocks(9, c)
    faultfs.fail_fsyncs(1)  # the data's fdatasync
    with pytest.raises(StorageError) as failed:
        layer.flush()
    assert failed.value.errno == errno.EIO
    assert layer.statistics()["failed"] and layer.statistics()["flush_errors"] == 1
    for attempt in range(3):  # what a naive client does: go on writing, flush again until it works
        try:
            layer.write_blocks(1, a)
            layer.flush()
            acknowledged.update({1: a, 5: b, 9: c})
            break
        except StorageError as exc:
            assert exc.errno == errno.EIO and "reopen" in str(exc)
    assert _contents(layer)[5] in (a, b)  # reads keep working
    layer.close()
    faultfs.cut(seed=1)
    faultfs.power_on()
    layer = open_writable(root)  # reopening reads the journal back from the disk
    try:
        got = _contents(layer)
        for block, data in acknowledged.items():
            assert got[block] == data, f"acknowledged write lost in block {block}"
        layer.write_blocks(1, a)  # the reopened layer works again
        layer.flush()
    finally:
        layer.close()


def test_a_failed_journal_sync_refuses_until_reopen(faultfs):
    """The journal's fdatasync fails: the flush fails, the layer refuses, a reopen has every acknowledged write."""
    faultfs.reset()
    root = os.path.join(faultfs.mountpoint, "w")
    layer = create_writable(root, "log", BLOCKS * 4096)
    a, b = bytes([1]) * 4096, bytes([2]) * 4096
    layer.write_blocks(3, a)
    layer.flush()
    layer.write_blocks(3, b)
    faultfs.fail_fsyncs(1, after=1)  # the data's fdatasync passes, the journal's fails
    with pytest.raises(StorageError):
        layer.flush()
    with pytest.raises(StorageError, match="reopen"):
        layer.flush()
    layer.close()
    faultfs.cut(seed=3)
    faultfs.power_on()
    layer = open_writable(root)
    try:
        assert _contents(layer)[3] == a
    finally:
        layer.close()


@pytest.mark.parametrize("kind", ["sparse", "log"])
def test_short_writes_are_completed(faultfs, kind):
    """The file system takes at most 1000 bytes per write(2), as a nearly full disk does.

    Break-test: with pwrite_all writing once (no loop), the blocks come back torn
    and the journal batches short, so the layer loses the flushed writes.
    """
    faultfs.reset()
    faultfs.short_writes(1000)
    try:
        root = os.path.join(faultfs.mountpoint, "w")
        layer = create_writable(root, kind, BLOCKS * 4096)
        rng = random.Random(5)
        expected: dict[int, bytes] = {}
        for _ in range(40):
            start, count = rng.randrange(BLOCKS - 8), rng.randint(1, 8)
            data = rng.randbytes(count * 4096)
            layer.write_blocks(start, data)
            for i in range(count):
                expected[start + i] = data[i * 4096 : (i + 1) * 4096]
            if rng.random() < 0.3:
                layer.flush()
        layer.flush()
        layer.close()
        faultfs.cut(seed=5)
        faultfs.power_on()
        layer = open_writable(root)
        try:
            got = _contents(layer)
            assert {b: got[b] for b in expected} == expected
        finally:
            layer.close()
    finally:
        faultfs.short_writes(0)
