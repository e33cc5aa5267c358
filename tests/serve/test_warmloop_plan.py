"""warmloop.plan: which file a mount's loop device reads, and how (no root needed)."""

import os

from lazyfs.config import Config
from lazyfs.serve import hydrated, warmloop

MANIFEST = "sha256:" + "cd" * 32
SIZE = 1 << 20


def _attached(tmp_path):
    return {"path": str(tmp_path / "export" / "disk.img"), "manifest": MANIFEST, "size": SIZE}


def _hydrate(root: str, size: int = SIZE) -> str:
    path = hydrated.path_for(root, MANIFEST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_read_only_defaults_to_a_buffered_loop_and_writable_to_direct_io(tmp_path):
    config = Config(cache_root=str(tmp_path))
    ro = warmloop.plan(config, _attached(tmp_path), writable=False)
    assert (ro.path, ro.direct_io, ro.route, ro.note()) == (_attached(tmp_path)["path"], False, "buffered", None)
    rw = warmloop.plan(config, _attached(tmp_path), writable=True)
    assert (rw.direct_io, rw.route) == (True, "direct")


def test_read_only_loop_direct_is_honoured(tmp_path):
    config = Config(cache_root=str(tmp_path), read_only_loop="direct")
    lp = warmloop.plan(config, _attached(tmp_path), writable=False)
    assert (lp.direct_io, lp.route) == (True, "direct")


def test_a_hydrated_file_wins_for_read_only_only(tmp_path):
    path = _hydrate(str(tmp_path))
    config = Config(cache_root=str(tmp_path))
    lp = warmloop.plan(config, _attached(tmp_path), writable=False)
    assert (lp.path, lp.direct_io, lp.route) == (path, True, "hydrated")
    assert "no FUSE" in lp.note() and path in lp.note()
    assert warmloop.plan(config, _attached(tmp_path), writable=True).route == "direct"
    off = Config(cache_root=str(tmp_path), hydrated_max_bytes=0)  # hydration off: the file is not used
    assert warmloop.plan(off, _attached(tmp_path), writable=False).route == "buffered"


def test_a_hydrated_file_of_the_wrong_size_is_not_used(tmp_path):
    _hydrate(str(tmp_path), SIZE - 4096)
    lp = warmloop.plan(Config(cache_root=str(tmp_path)), _attached(tmp_path), writable=False)
    assert lp.route == "buffered"
