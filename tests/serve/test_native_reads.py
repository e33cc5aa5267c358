"""Warm reads answered in C by the daemon's FUSE threads (docs/warm.md §4), end to end.

Real registry, daemon, FUSE, a direct-I/O loop (``read_only_loop = "direct"``: every read of the
device reaches the daemon), ext4 and e2fsck -fn. The image is read whole once (cold: fetched,
verified, written to the flat files), then again: the second pass is answered from the flat files,
almost all of it in C, with the same bytes as the merged device. A block changed on disk in a flat
file is then never served: the read gets the right bytes, through the verified chunk store.
(Broken on purpose once: ``hashes_match`` in native/fastread.c accepting a mismatch served the
changed byte, and this went red.)
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from lazyfs.serve import system
from lazyfs.serve.control import call
from tests.serve.conftest import leftovers
from tests.support.trees import describe_tree, tree_differences

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.slow]


@pytest.fixture(scope="module")
def denv(env):
    env.doc.update(read_only_loop="direct", hydrated_check_interval=3600, fuse_threads=2)
    with open(env.config_path, "w") as f:
        json.dump(env.doc, f)
    return env


def _read_device(dev: str) -> bytes:
    return subprocess.run(["dd", f"if={dev}", "bs=1M", "iflag=direct", "status=none"], capture_output=True,
                          check=True).stdout


def _stats(env) -> dict:
    """The daemon's statistics: its scheduler's and the flat cache's counters among them."""
    return call(env.socket, "stats", timeout=30)


def test_warm_reads_are_answered_in_c_and_a_tampered_block_is_not(denv):
    env = denv
    with open(env.flat, "rb") as f:
        want = f.read()
    target = env.tmp / "mnt-direct"
    target.mkdir()
    info = json.loads(env.lazyfs("mount", env.ref, str(target), "--json").stdout)
    try:
        dev = info["loop"]
        assert info["loop_route"] == "direct" and system.loop_direct_io(dev)
        assert _read_device(dev) == want  # cold: through the trio thread, fetched and verified
        fuse = call(env.socket, "fuse-stats", timeout=30)
        assert fuse["native_reads_unavailable"] is None, fuse["native_reads_unavailable"]
        before_reads, before_native = fuse["reads"], fuse["native_reads"]
        gets = _stats(env)["scheduler"]["fetches"]

        device_read = json.loads(env.lazyfs("stats", str(target), "--json").stdout)["device"]["bytes_read"]
        assert _read_device(dev) == want  # warm: from the flat files
        # the image's own counter (lazyfs_image_read_bytes_total) counts what C answered too
        assert json.loads(env.lazyfs("stats", str(target), "--json").stdout)["device"]["bytes_read"] \
            >= device_read + len(want)
        fuse = call(env.socket, "fuse-stats", timeout=30)
        reads, native = fuse["reads"] - before_reads, fuse["native_reads"] - before_native
        assert reads > 0 and native >= reads - 2, (reads, native)  # all but a planning READ or two in C
        assert fuse["native_plans"] >= 1
        assert _stats(env)["scheduler"]["fetches"] == gets  # nothing fetched again
        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        diffs = tree_differences(describe_tree(str(env.src)), describe_tree(str(target)))
        assert diffs == [], "\n".join(diffs[:20])

        # a byte changed on disk in a flat file, inside a block of data: never served
        data_file = max(Path(env.doc["cache_root"], "flat").glob("*.data"), key=lambda p: os.stat(p).st_blocks)
        at = next(i for i in range(4096 * 64, len(want), 4096) if any(want[i:i + 4096]))  # past the superblocks
        with open(data_file, "r+b") as f:
            old = os.pread(f.fileno(), 1, at + 7)
            os.pwrite(f.fileno(), bytes([old[0] ^ 0x5A]), at + 7)
            os.fsync(f.fileno())
        tampered = _stats(env)["flat_cache"]["tampered"]
        assert _read_device(dev) == want
        # caught by the hash check (the C path declined it, Python's check counted it) and read again
        # through the chunk store, verified: from its memory tier here, or fetched
        assert _stats(env)["flat_cache"]["tampered"] == tampered + 1
    finally:
        env.lazyfs("umount", str(target))
    assert leftovers(env) == []
