"""hydrated.build: the hydrated file reads exactly as the merged device (in-process, no root)."""

import os
import stat

import pytest
import trio

from lazyfs.device.merged import MergedDevice
from lazyfs.errors import IntegrityError
from lazyfs.serve import hydrated
from tests.device.test_merged import SIZE, make_stack
from tests.support.layers import MemoryBackend, build_blob
from tests.support.stores import CountingStore

MANIFEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("seed", range(6))
def test_hydrated_file_is_the_merged_device(tmp_path, seed):
    """Every byte of the hydrated file equals the merged device's, holes and whited-out
    (ZEROED) blocks included; the file is 0600 and published under its final name.
    (Break-checked: ignoring seg.chunk_block when slicing the chunk makes it fail.)"""
    layers, backend, model = make_stack(seed)
    dev = MergedDevice(layers, CountingStore(backend))
    built = trio.run(hydrated.build, dev, dev.store, str(tmp_path), MANIFEST)
    assert built.path == hydrated.path_for(str(tmp_path), MANIFEST)
    with open(built.path, "rb") as f:
        assert f.read() == bytes(model) == trio.run(dev.read, 0, SIZE)
    assert stat.S_IMODE(os.stat(built.path).st_mode) == 0o600
    assert hydrated.existing(str(tmp_path), MANIFEST, SIZE) == built
    assert os.listdir(hydrated.directory(str(tmp_path))) == [os.path.basename(built.path)]


def test_a_file_of_another_size_is_never_served(tmp_path):
    layers, backend, _ = make_stack(1)
    dev = MergedDevice(layers, CountingStore(backend))
    built = trio.run(hydrated.build, dev, dev.store, str(tmp_path), MANIFEST)
    assert hydrated.existing(str(tmp_path), MANIFEST, SIZE + 4096) is None
    os.truncate(built.path, SIZE - 4096)
    assert hydrated.existing(str(tmp_path), MANIFEST, SIZE) is None


def test_a_bad_chunk_leaves_no_file(tmp_path):
    """A chunk that fails verification aborts the build: no final file, no temporary file."""
    blob, digest, meta = build_blob(SIZE, [(0, b"x" * 4096 * 3)], chunk_size=4 * 4096)
    bad = bytearray(blob)
    bad[meta.chunks[0].offset] ^= 1
    dev = MergedDevice([(meta, digest)], CountingStore(MemoryBackend({digest: bytes(bad)})))
    with pytest.raises(IntegrityError):
        trio.run(hydrated.build, dev, dev.store, str(tmp_path), MANIFEST)
    assert os.listdir(hydrated.directory(str(tmp_path))) == []


def test_not_a_manifest_digest_is_refused(tmp_path):
    for bad in ("", "sha256", "sha256:../x", "../a:b"):
        with pytest.raises(Exception) as info:
            hydrated.path_for(str(tmp_path), bad)
        assert "manifest digest" in str(info.value)
