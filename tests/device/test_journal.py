"""The journal's failure paths, one at a time (the power-loss and full-disk tests drive them for real)."""

import errno
import os

import pytest

import lazyfs.device.writable.base as base
import lazyfs.device.writable.journal as journal
from lazyfs import durable
from lazyfs.device.writable import create_writable, open_writable
from lazyfs.errors import StorageError

BS = 4096


def test_a_partial_batch_is_cut_off_and_the_flush_can_be_retried(tmp_path, monkeypatch):
    layer = create_writable(str(tmp_path / "w"), "sparse", 64 * BS)
    layer.write_blocks(1, b"a" * BS)
    layer.flush()
    size = os.path.getsize(tmp_path / "w" / "map.journal")
    layer.write_blocks(2, b"b" * BS)

    def half_then_full(fd, data, offset):
        os.pwrite(fd, bytes(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "pwrite_all", half_then_full)
    with pytest.raises(StorageError) as full:
        layer.flush()
    assert full.value.errno == errno.ENOSPC
    assert os.path.getsize(tmp_path / "w" / "map.journal") == size  # no partial batch left behind
    monkeypatch.undo()
    assert not layer.statistics()["failed"]
    layer.flush()  # the same batch again
    layer.close()
    layer = open_writable(str(tmp_path / "w"))
    try:
        assert layer.read_blocks(1, 2) == b"a" * BS + b"b" * BS
    finally:
        layer.close()


def test_batches_stay_bounded(tmp_path, monkeypatch):
    """A layer flushes by itself before one batch would pass MAX_BATCH_RECORDS."""
    monkeypatch.setattr(base, "MAX_BATCH_RECORDS", 3)
    monkeypatch.setattr(journal, "MAX_BATCH_RECORDS", 3)
    layer = create_writable(str(tmp_path / "w"), "log", 64 * BS)
    for i in range(10):
        layer.write_blocks(i, bytes([i]) * BS)
    assert layer.flushes == 3 and len(layer._pending) == 1
    layer.flush()
    layer.close()
    layer = open_writable(str(tmp_path / "w"))
    try:
        assert [layer.read_blocks(i, 1)[0] for i in range(10)] == list(range(10))
    finally:
        layer.close()


def test_a_compaction_that_cannot_write_keeps_the_old_journal(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "COMPACT_BYTES", 200)
    layer = create_writable(str(tmp_path / "w"), "sparse", 64 * BS)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal, "write_all", full)
    for i in range(12):
        layer.write_blocks(i, bytes([i + 1]) * BS)
        layer.flush()  # the flushes succeed although no compaction can be written
    stats = layer.statistics()
    assert stats["compaction_errors"] > 0 and stats["compactions"] == 0 and not stats["failed"]
    assert not os.path.exists(tmp_path / "w" / "map.journal.compact")
    monkeypatch.undo()
    monkeypatch.setattr(base, "COMPACT_BYTES", 200)
    layer.write_blocks(20, b"z" * BS)
    layer.flush()
    assert layer.statistics()["compactions"] == 1
    layer.close()
    layer = open_writable(str(tmp_path / "w"))
    try:
        assert [layer.read_blocks(i, 1)[0] for i in range(12)] == list(range(1, 13))
        assert layer.read_blocks(20, 1) == b"z" * BS
    finally:
        layer.close()


def test_write_atomically_fails_cleanly(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def broken_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError) as failed:
        durable.write_atomically(str(target), b"new")
    assert failed.value.errno == errno.EIO and "Input/output error" in str(failed.value)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.json"]
