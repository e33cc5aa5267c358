"""Full disks under a real writable mount (`lazyfs mount --writable`: FUSE export, loop device, ext4).

* The writable root is a small tmpfs. Files are written and fsynced in the
  mounted ext4 until that fails: fsync reports the error, the mount is undone,
  someone frees space, the image is mounted again and every file whose fsync
  had succeeded reads back intact.
* The cache root is a small tmpfs: every read still returns the image's
  bytes, and the chunk cache counts the writes it could not make.

Break-tests (by hand): with ``ChunkCache.write_pending`` re-raising its
OSError, reads fail with EIO. With ``WritableLayer._write_data`` swallowing the
ENOSPC of its pwrite (as the old code ignored short writes), the fsync of the
file being written when the root fills "succeeds", and after the remount that
file is gone: "a file fsynced before the disk filled up was lost or changed".
At this level the data file meets the full disk first; a flush meeting it
(the journal cannot grow) is tested in tests/device/test_full_disk.py.
"""

import hashlib
import json
import os
import subprocess

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.serve.control import call
from tests.serve.conftest import Env, leftovers
from tests.support.trees import describe_tree, tree_differences

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop]


def _tmpfs(path, size: str) -> str:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    return str(path)


def _env(tmp, registry, **doc) -> Env:
    env = Env(tmp, registry)
    env.doc.update(doc)
    with open(env.config_path, "w") as f:
        json.dump(env.doc, f)
    return env


@pytest.fixture(scope="module")
def big_image(registry, tmp_path_factory):
    """A 128 MiB ext4 image with a little data: far bigger than the writable root."""
    tmp = tmp_path_factory.mktemp("bigimage")
    src = tmp / "src"
    src.mkdir()
    (src / "hello").write_text("hello\n")
    local = LocalRef(str(tmp / "layout"), "v1")
    trio.run(lambda: create_image(local, from_dir=str(src), size=128 << 20))
    ref = f"{registry.registry}/serve/fulldisk:v1"

    async def push():
        config = Config(registries=(RegistrySettings(registry.registry, plain_http=True),))
        async with ImageOpener(config) as opener:
            await push_image(opener, local, parse_reference(ref))

    trio.run(push)
    return ref


def _write_and_fsync(path: str, data: bytes) -> OSError | None:
    """Write *path* and fsync it; the error, if either failed (fsync is tried after a failed write too)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:  # ext4 went read-only after an error it met earlier
        return exc
    error = None
    try:
        try:
            os.write(fd, data)
        except OSError as exc:
            error = exc
        try:
            os.fsync(fd)
        except OSError as exc:
            return exc
        assert error is None, f"write failed ({error}) but fsync succeeded: the error was not reported"
        return None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def _sha256_or_none(path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def test_writable_root_full(registry, big_image, tmp_path):
    wroot = _tmpfs(tmp_path / "wroot", "24m")
    env = _env(tmp_path, registry, writable_root=wroot)
    target = tmp_path / "mnt1"
    target.mkdir()
    try:
        with open(os.path.join(wroot, "other-data"), "wb") as f:  # someone else's data, freed later
            f.write(bytes(6 << 20))
        env.lazyfs("mount", big_image, str(target), "--writable")
        acknowledged: dict[str, str] = {}
        failures: list[OSError] = []
        for i in range(64):  # 64 MiB into an ext4 of 128 MiB on a writable root of 24 MiB: the root fills first
            data = os.urandom(1 << 20)
            failure = _write_and_fsync(str(target / f"file{i}"), data)
            if failure is None:
                acknowledged[f"file{i}"] = hashlib.sha256(data).hexdigest()
            else:
                failures.append(failure)
                if len(failures) == 8:  # go on a while after the first: the flushes must meet the full disk too
                    break
        assert failures, "the writable root never filled up"
        assert len(acknowledged) >= 5, f"only {len(acknowledged)} files fitted: the test proves little"
        writable = json.loads(env.lazyfs("stats", str(target), "--json").stdout)["device"]["writable"]
        layers = call(env.socket, "stats")["disk"]["writable_layers"]
        assert layers["bytes"] > 0 and layers["max_bytes"] == writable["max_disk_bytes"], layers
        done = env.lazyfs("umount", str(target), check=False)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 1, done.stderr
        assert leftovers(env) == []
        os.unlink(os.path.join(wroot, "other-data"))  # room again
        env.lazyfs("mount", big_image, str(target), "--writable")  # the layer opens, ext4 replays its journal
        try:
            got = {name: _sha256_or_none(target / name) for name in acknowledged}
            assert got == acknowledged, "a file fsynced before the disk filled up was lost or changed"
            (target / "after").write_text("the layer takes writes again\n")
            os.sync()
        finally:
            env.lazyfs("umount", str(target))
        assert leftovers(env) == []
        assert writable["write_errors"] + writable["flush_errors"] > 0, writable
    finally:
        env.cleanup()
        subprocess.run(["umount", "-l", wroot], check=False)


def test_cache_root_full(registry, env, tmp_path):
    """The module's busybox image (conftest ``env``) through a daemon whose cache root is a 1 MiB tmpfs."""
    croot = _tmpfs(tmp_path / "croot", "1m")
    full = _env(tmp_path, registry, cache_root=croot, memory_cache_size=1 << 20)
    target = tmp_path / "mnt2"
    target.mkdir()
    try:
        full.lazyfs("mount", env.ref, str(target))
        try:
            for _ in range(2):  # the second pass finds little in memory or on disk: fetched again
                diffs = tree_differences(describe_tree(str(env.src)), describe_tree(str(target)))
                assert diffs == [], "\n".join(diffs[:20])
                subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
            stats = call(full.socket, "stats")
            cache = stats["scheduler"]["cache"]
            # a fetched chunk goes into the flat layer files (the chunk tier only when none wants it):
            # the full root fails writes there, and neither tier grows past the tmpfs
            flat_cache = stats["flat_cache"]
            assert cache["write_errors"] + flat_cache.get("write_errors", 0) > 0, (cache, flat_cache)
            assert cache["bytes"] <= 1 << 20, cache
            disk = stats["disk"]  # the budget, sampled at the attach
            assert disk["chunk_cache"]["root"] == croot and disk["writable_reserve"] == 0
            assert any(croot in f["roots"] for f in disk["filesystems"])
        finally:
            full.lazyfs("umount", str(target))
        assert leftovers(full) == []
    finally:
        full.cleanup()
        subprocess.run(["umount", "-l", croot], check=False)
