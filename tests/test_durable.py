"""lazyfs.durable: the one atomic-write helper and what each of its promises costs, counted in syscalls.

Each test counts fsyncs instead of pulling the power (tests/device/test_power_loss.py
does that for the writable layers). Break-tested: dropping the directory fsync from
write_atomically or replace_durably turns ``test_durable_writes_sync_file_and_directory``
and ``test_replace_durably_syncs_the_directory`` red; making ``durable=False`` still
fsync turns ``test_weak_writes_never_sync`` red.
"""

from __future__ import annotations

import errno
import os

import pytest

from lazyfs import durable
from lazyfs.durable import TMP_PREFIX, replace_durably, write_atomically
from lazyfs.errors import StorageError


@pytest.fixture
def fsyncs(monkeypatch) -> list[str]:
    """Every fsync, as 'dir' or 'file', in order."""
    seen: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        seen.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return seen


def test_durable_writes_sync_file_and_directory(tmp_path, fsyncs) -> None:
    target = tmp_path / "state.json"
    write_atomically(target, b"one")
    write_atomically(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert fsyncs == ["file", "dir", "file", "dir"]
    assert os.listdir(tmp_path) == ["state.json"]
    assert os.stat(target).st_mode & 0o777 == 0o600


def test_weak_writes_never_sync(tmp_path, fsyncs) -> None:
    target = tmp_path / "entry"
    write_atomically(target, b"x" * 10, mode=0o640, durable=False)
    assert target.read_bytes() == b"x" * 10 and fsyncs == []
    assert os.stat(target).st_mode & 0o777 == 0o640 & ~_umask()


def test_temporary_file_is_hidden_beside_the_target(tmp_path, monkeypatch) -> None:
    """A crash between write and rename leaves a ``TMP_PREFIX`` file a scan can recognise and drop."""
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_atomically(tmp_path / "layer.json", b"{}")
    [(src, dst)] = seen
    assert os.path.dirname(src) == str(tmp_path) and os.path.basename(src).startswith(TMP_PREFIX + "layer.json-")
    assert dst == str(tmp_path / "layer.json")


def test_a_symlink_at_the_temporary_name_is_never_followed(tmp_path, monkeypatch) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    monkeypatch.setattr(durable, "_tmp_names", iter([7]))
    (tmp_path / f"{TMP_PREFIX}state-{os.getpid()}-7").symlink_to(victim)
    with pytest.raises(StorageError):
        write_atomically(tmp_path / "state", b"new")
    assert victim.read_bytes() == b"keep" and not (tmp_path / "state").exists()


def test_replace_durably_syncs_the_directory(tmp_path, fsyncs) -> None:
    tmp = tmp_path / "big.partial"
    tmp.write_bytes(b"data")
    replace_durably(tmp, tmp_path / "big")
    assert (tmp_path / "big").read_bytes() == b"data" and not tmp.exists()
    assert fsyncs == ["dir"]  # the caller fsynced the file it streamed


def test_replace_durably_failure_is_one_storage_error(tmp_path) -> None:
    tmp = tmp_path / "big.partial"
    tmp.write_bytes(b"data")
    with pytest.raises(StorageError) as failed:
        replace_durably(tmp, tmp_path / "no-such-dir" / "big")
    assert failed.value.errno == errno.ENOENT and "cannot write" in str(failed.value)
    assert not tmp.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
