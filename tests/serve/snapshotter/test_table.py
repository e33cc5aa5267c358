"""The snapshot table: contract of create/commit/remove/update, persistence, crash safety."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lazyfs.errors import AlreadyExistsError, BusyError, ConfigError, NotFoundError
from lazyfs.serve.snapshotter.table import ACTIVE, COMMITTED, ON_CACHE, VIEW, SnapshotTable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_lifecycle_and_errors(tmp_path):
    db = SnapshotTable(str(tmp_path / "m.db"))
    a = db.create("a", "", ACTIVE, {"x": "1"})
    assert (a.kind, a.parent, a.labels, a.created == a.updated) == (ACTIVE, "", {"x": "1"}, True)
    with pytest.raises(AlreadyExistsError):
        db.create("a", "", VIEW, {})
    with pytest.raises(ConfigError, match="not a committed"):
        db.create("b", "a", ACTIVE, {})  # parents must be committed
    with pytest.raises(NotFoundError):
        db.create("b", "missing", ACTIVE, {})
    c = db.commit("a", "c", {"y": "2"}, (4096, 3), ON_CACHE)
    assert (c.id, c.key, c.kind, c.labels, c.usage, c.placement) == (a.id, "c", COMMITTED, {"y": "2"}, (4096, 3), ON_CACHE)
    with pytest.raises(NotFoundError):
        db.get("a")
    with pytest.raises(BusyError):
        db.commit("c", "d", {}, (0, 0), ON_CACHE)  # only active snapshots commit
    child = db.create("child", "c", VIEW, {})
    assert child.parent == "c" and db.ancestors(child) == [db.get("c")]
    with pytest.raises(BusyError, match="cannot remove"):
        db.remove("c")
    db.remove("child")
    db.remove("c")
    again = db.create("again", "", ACTIVE, {})
    assert again.id > child.id  # ids are never reused: they name directories


def test_transaction_is_all_or_nothing_and_survives_reopening(tmp_path):
    path = str(tmp_path / "m.db")
    db = SnapshotTable(path)
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.create("kept-only-if-committed", "", ACTIVE, {})
            raise RuntimeError("crash between the row and the directories")
    with pytest.raises(NotFoundError):
        db.get("kept-only-if-committed")
    db.create("p", "", ACTIVE, {})
    db.commit("p", "parent", {"l": "v"}, (1, 1), ON_CACHE)
    db.create("kid", "parent", ACTIVE, {})
    db.set_labels("kid", {"new": "label"})
    db.close()
    reopened = SnapshotTable(path)
    kid = reopened.get("kid")
    assert (kid.parent, kid.labels, kid.updated > kid.created) == ("parent", {"new": "label"}, True)


WRITER = """
import sys
from lazyfs.serve.snapshotter.table import ACTIVE, ON_CACHE, SnapshotTable
db = SnapshotTable(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    with db.transaction():
        db.create(f"a{i}", "", ACTIVE, {"n": str(i)})
        db.commit(f"a{i}", f"c{i}", {"n": str(i)}, (i, i), ON_CACHE)
    i += 1
"""


def test_kill_9_mid_write_leaves_a_consistent_table(tmp_path):
    path = str(tmp_path / "m.db")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 60
        while os.path.getsize(path) < 64 << 10 and time.monotonic() < deadline:
            time.sleep(0.01)  # let it get going: the WAL and the table grow
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    db = SnapshotTable(path)
    assert db._db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    snaps = db.all()
    assert snaps, "the writer committed nothing"
    # every transaction is whole: only committed snapshots, numbered without gaps
    assert all(s.kind == COMMITTED and s.key == f"c{s.labels['n']}" for s in snaps)
    assert sorted(int(s.labels["n"]) for s in snaps) == list(range(len(snaps)))
