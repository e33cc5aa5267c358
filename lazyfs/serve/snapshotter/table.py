"""Snapshot metadata in sqlite: crash-safe (WAL, synchronous=FULL), one row per snapshot.

A snapshot's row id names its directories, and ids are never reused once committed
(AUTOINCREMENT), so a directory whose id has no row is garbage (see `Snapshotter.cleanup`).
A parent is referenced by id: committing an active snapshot renames it without touching its
children.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from lazyfs.errors import AlreadyExistsError, BusyError, ConfigError, NotFoundError

VIEW, ACTIVE, COMMITTED = "view", "active", "committed"
KINDS = (VIEW, ACTIVE, COMMITTED)
# where a snapshot's directories live
ON_CACHE, ON_WRITABLE = "cache", "writable"
# what a snapshot is made of
OVERLAY = "overlay"  # a directory: an overlay layer (committed) or upper dir (active)
LAZYFS = "lazyfs"  # a committed lazyfs layer, registered without download
BLOCK = "block"  # an active snapshot whose writable state is a lazyfs writable layer

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind TEXT NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    labels TEXT NOT NULL,
    backend TEXT NOT NULL,
    placement TEXT NOT NULL,
    size INTEGER,
    inodes INTEGER,
    extra TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: int
    key: str
    parent_id: int | None
    parent: str  # the parent's key, "" for none
    kind: str
    created: int  # nanoseconds since the epoch
    updated: int
    labels: dict = field(hash=False)
    backend: str
    placement: str
    usage: tuple[int, int] | None  # (bytes, inodes), frozen at commit
    extra: dict = field(hash=False)


_COLUMNS = ("s.id, s.key, s.parent_id, COALESCE(p.key, ''), s.kind, s.created, s.updated, s.labels, s.backend, "
            "s.placement, s.size, s.inodes, s.extra")
_SELECT = f"SELECT {_COLUMNS} FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"


def _row(r: tuple) -> Snapshot:
    usage = (r[10], r[11]) if r[10] is not None else None
    return Snapshot(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9], usage, json.loads(r[12]))


class SnapshotTable:
    """The snapshot table. Every method is atomic; `transaction` groups several."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        # One connection, so one user at a time. A plain lock, not an RLock: a thread inside a
        # transaction() is recognised by its own thread-local depth, and methods called inside
        # it run under the lock the transaction already holds. Only sqlite is done under it.
        self._lock = threading.Lock()
        self._local = threading.local()

    def close(self) -> None:
        with self._locked():
            self._db.close()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The connection for this thread: taken, or already held by its transaction."""
        if getattr(self._local, "depth", 0):
            yield
            return
        with self._lock:
            yield

    @contextmanager
    def transaction(self) -> Iterator["SnapshotTable"]:
        """All changes inside commit together or not at all (nested uses join the outer one)."""
        if getattr(self._local, "depth", 0):
            self._local.depth += 1
            try:
                yield self
            finally:
                self._local.depth -= 1
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._local.depth = 1
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._local.depth = 0

    # ------------------------------------------------------------ reads

    def get(self, key: str) -> Snapshot:
        with self._locked():
            r = self._db.execute(f"{_SELECT} WHERE s.key = ?", (key,)).fetchone()
        if r is None:
            raise NotFoundError(f"snapshot {key} does not exist")
        return _row(r)

    def by_id(self, id: int) -> Snapshot:
        with self._locked():
            r = self._db.execute(f"{_SELECT} WHERE s.id = ?", (id,)).fetchone()
        if r is None:
            raise NotFoundError(f"snapshot #{id} does not exist")
        return _row(r)

    def all(self) -> list[Snapshot]:
        with self._locked():
            return [_row(r) for r in self._db.execute(f"{_SELECT} ORDER BY s.id")]

    def ancestors(self, snap: Snapshot) -> list[Snapshot]:
        """The parent, its parent, ... (nearest first)."""
        out = []
        parent = snap.parent_id
        while parent is not None:
            p = self.by_id(parent)
            out.append(p)
            parent = p.parent_id
        return out

    def has_children(self, id: int) -> bool:
        with self._locked():
            return self._db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (id,)).fetchone() is not None

    # ------------------------------------------------------------ changes

    def create(self, key: str, parent: str, kind: str, labels: dict, *, backend: str = OVERLAY,
               placement: str = ON_WRITABLE, extra: dict | None = None, usage: tuple[int, int] | None = None) -> Snapshot:
        if not key:
            raise ConfigError("a snapshot needs a non-empty key")
        if kind not in KINDS:
            raise ConfigError(f"unknown snapshot kind {kind!r}")
        now = time.time_ns()
        with self.transaction():
            if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                raise AlreadyExistsError(f"snapshot {key} already exists")
            parent_id = None
            if parent:
                p = self.get(parent)
                if p.kind != COMMITTED:
                    raise ConfigError(f"parent {parent} is not a committed snapshot")
                parent_id = p.id
            cur = self._db.execute(
                "INSERT INTO snapshots (key, parent_id, kind, created, updated, labels, backend, placement, size, inodes,"
                " extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, parent_id, kind, now, now, json.dumps(labels or {}), backend, placement,
                 usage[0] if usage else None, usage[1] if usage else None, json.dumps(extra or {})))
            return self.by_id(cur.lastrowid)

    def commit(self, key: str, name: str, labels: dict, usage: tuple[int, int], placement: str) -> Snapshot:
        """Turn active snapshot *key* into committed snapshot *name* (a new info: new times, these labels)."""
        now = time.time_ns()
        with self.transaction():
            snap = self.get(key)
            if snap.kind != ACTIVE:
                raise BusyError(f"snapshot {key} is {snap.kind}, not active: only active snapshots can be committed")
            if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExistsError(f"snapshot {name} already exists")
            self._db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, created = ?, updated = ?, labels = ?, size = ?, inodes = ?,"
                " placement = ? WHERE id = ?",
                (name, COMMITTED, now, now, json.dumps(labels or {}), usage[0], usage[1], placement, snap.id))
            return self.by_id(snap.id)

    def remove(self, key: str) -> Snapshot:
        with self.transaction():
            snap = self.get(key)
            if self.has_children(snap.id):
                raise BusyError(f"cannot remove snapshot {key}: other snapshots have it as their parent")
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
            return snap

    def set_labels(self, key: str, labels: dict) -> Snapshot:
        with self.transaction():
            snap = self.get(key)
            self._db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                             (json.dumps(labels), time.time_ns(), snap.id))
            return self.by_id(snap.id)

    def set_extra(self, id: int, extra: dict) -> Snapshot:
        with self.transaction():
            self._db.execute("UPDATE snapshots SET extra = ? WHERE id = ?", (json.dumps(extra), id))
            return self.by_id(id)
