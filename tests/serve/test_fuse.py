"""The FUSE export against the real kernel: reads, writes, errors, loop devices, ext4.

The server runs in a subprocess (tests/serve/fuse_server.py): pyfuse3 allows one
session per process, and this process must never wait on a FUSE mount it serves.
Every test tears down what it set up (umount, losetup -d, server, FUSE mount),
also when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import queue
import random
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import trio

from lazyfs.device.source import BlockSource, check_write, clamp_read
from lazyfs.errors import BusyError, NotFoundError
from lazyfs.serve import system
from lazyfs.serve.fuse import IMAGE_NAME, ExportFS
from tests.support.conformance import check_source
from tests.support.memory import MemorySource
from tests.conftest import require_root

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SERVER = os.path.join(HERE, "fuse_server.py")
MiB = 1 << 20


class ServerError(Exception):
    pass


class Server:
    """A running fuse_server.py subprocess and its line-based control channel."""

    def __init__(self, tmp_path, specs: list[str]) -> None:
        self.mnt = str(tmp_path / "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.log_path = str(tmp_path / "server.log")
        self._log = open(self.log_path, "w")
        args = [sys.executable, SERVER, self.mnt]
        for spec in specs:
            args += ["--export", spec]
        self.expect_alive = True  # serving() checks the server survived the test
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     cwd=ROOT, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        line = self._next_line(60)
        if line != "ready":
            raise ServerError(f"server did not start: {line!r}\n{self.log()}")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _next_line(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ServerError(f"no answer from the server in {timeout} s\n{self.log()}") from None

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def command(self, cmd: str, timeout: float = 120):
        """Send one command; return its JSON result or raise ServerError."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self._next_line(timeout)
        if line is None:
            raise ServerError(f"server exited during {cmd!r}\n{self.log()}")
        status, _, rest = line.partition(" ")
        if status != "ok":
            raise ServerError(rest)
        return json.loads(rest)

    def stats(self) -> dict:
        return self.command("stats")

    def path(self, name: str) -> str:
        return os.path.join(self.mnt, name, IMAGE_NAME)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server and make sure nothing stays mounted, whatever state it is in."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
        finally:
            self._log.close()
            for _ in range(3):
                if not system.is_mountpoint(self.mnt):
                    break
                subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True, timeout=30)
                if system.is_mountpoint(self.mnt):
                    subprocess.run(["umount", "-l", self.mnt], capture_output=True, timeout=30)


def _umount(target: str) -> None:
    """Unmount *target*; if that hangs (a dead FUSE server below), abort FUSE and detach lazily."""
    if not system.is_mountpoint(target):
        return
    try:
        subprocess.run(["umount", target], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        pass
    if system.is_mountpoint(target):
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=60)


def _detach(dev: str) -> None:
    if os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop"):
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


@contextlib.contextmanager
def serving(tmp_path, *specs: str):
    """Run a server exporting *specs*; yields (server, cleanup stack for mounts/loops)."""
    require_root()  # mounting FUSE with allow_other, loop devices, ext4
    with contextlib.ExitStack() as stack:
        server = Server(tmp_path, list(specs))
        stack.callback(server.stop)  # registered first, so it runs last
        yield server, stack
        assert not server.expect_alive or server.alive(), f"the server died\n{server.log()}"


def model(size: int, seed: int | None = None) -> bytearray:
    return bytearray(random.Random(seed).randbytes(size) if seed is not None else bytes(size))


def aligned_buffer(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # page aligned, as O_DIRECT wants


# -- plain file access ---------------------------------------------------------------


def test_tree_and_attributes(tmp_path):
    size = 3 * MiB + 4096
    with serving(tmp_path, f"name=img,size={size},seed=1", "name=ro,size=65536,ro=1") as (srv, _):
        assert sorted(os.listdir(srv.mnt)) == ["img", "ro"]
        assert os.listdir(os.path.join(srv.mnt, "img")) == [IMAGE_NAME]
        st = os.stat(srv.path("img"))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600  # the daemon's user alone
        assert (st.st_size, st.st_uid, st.st_gid, st.st_nlink) == (size, 0, 0, 1)
        assert stat.S_IMODE(os.stat(srv.path("ro")).st_mode) == 0o400
        assert not os.path.exists(os.path.join(srv.mnt, "nope", IMAGE_NAME))
        assert not os.path.exists(os.path.join(srv.mnt, "img", "other"))
        # the namespace is the daemon's: nothing can be created, renamed, removed or resized
        for call in (lambda: open(os.path.join(srv.mnt, "img", "new"), "w"),
                     lambda: os.mkdir(os.path.join(srv.mnt, "dir")),
                     lambda: os.unlink(srv.path("img")),
                     lambda: os.rename(srv.path("img"), os.path.join(srv.mnt, "img", "x")),
                     lambda: os.truncate(srv.path("img"), 4096),
                     lambda: os.chmod(srv.path("img"), 0o600)):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno in (errno.EPERM, errno.EACCES), info.value
        os.truncate(srv.path("img"), size)  # a no-op resize is fine
        os.utime(srv.path("img"), ns=(10**18, 2 * 10**18))  # times are tolerated (losetup, qemu, touch)
        assert os.stat(srv.path("img")).st_mtime_ns == 2 * 10**18
        vfs = os.statvfs(srv.mnt)
        assert vfs.f_blocks * vfs.f_frsize == size + 65536


def test_reads_at_odd_offsets_match_the_model(tmp_path):
    size = 5 * MiB + 3 * 4096
    want = model(size, seed=7)
    rng = random.Random(1)
    with serving(tmp_path, f"name=img,size={size},seed=7") as (srv, _):
        fd = os.open(srv.path("img"), os.O_RDONLY)
        try:
            shapes = [(0, 1), (1, 4095), (4095, 2), (size - 1, 1), (size - 100, 1000), (size, 10),
                      (size + 12345, 10), (0, size), (MiB - 3, MiB + 7)]
            shapes += [(rng.randrange(size), rng.choice([1, 511, 4097, 70001, MiB + 1])) for _ in range(200)]
            for off, n in shapes:
                assert os.pread(fd, n, off) == bytes(want[off : off + n]), (off, n)
        finally:
            os.close(fd)
        # O_DIRECT skips the page cache: every byte comes from the source through FUSE
        fd = os.open(srv.path("img"), os.O_RDONLY | os.O_DIRECT)
        try:
            buf = aligned_buffer(MiB)
            for off in (0, 4096, size - MiB, 2 * MiB + 8192):
                assert os.preadv(fd, [buf], off) == MiB
                assert buf[:] == want[off : off + MiB], off
        finally:
            os.close(fd)
        st = srv.stats()
        assert st["bytes_read"] >= 4 * MiB and st["errors"] == 0
        assert st["largest_read"] >= 128 * 1024  # big requests reach the daemon


def test_writes_read_back(tmp_path):
    size = 4 * MiB
    want = model(size, seed=3)
    rng = random.Random(2)
    with serving(tmp_path, f"name=img,size={size},seed=3") as (srv, _):
        fd = os.open(srv.path("img"), os.O_RDWR)
        try:
            for _ in range(100):
                off = rng.randrange(size)
                data = rng.randbytes(min(size - off, rng.choice([1, 100, 4096, 5000, 300000])))
                assert os.pwrite(fd, data, off) == len(data)
                want[off : off + len(data)] = data
            assert os.pwrite(fd, b"tail", size - 4) == 4
            want[size - 4 :] = b"tail"
            # past the end: a short write, then ENOSPC, like a block device
            assert os.pwrite(fd, b"abcdef", size - 2) == 2
            want[size - 2 :] = b"ab"
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x", size)
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        # a fresh open drops the page cache of a writable export: this reads the source
        fd = os.open(srv.path("img"), os.O_RDONLY)
        try:
            assert os.pread(fd, size + 10, 0) == bytes(want)
        finally:
            os.close(fd)
        st = srv.stats()
        assert st["exports"]["img"]["bytes_written"] >= 100
        assert os.stat(srv.path("img")).st_size == size


def test_read_only_export_refuses_writes(tmp_path):
    with serving(tmp_path, "name=ro,size=1048576,seed=5,ro=1") as (srv, _):
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as info:
                os.open(srv.path("ro"), flags)
            assert info.value.errno in (errno.EROFS, errno.EACCES)
        with pytest.raises(OSError) as info:
            os.truncate(srv.path("ro"), 0)
        assert info.value.errno in (errno.EPERM, errno.EACCES, errno.EROFS)
        with open(srv.path("ro"), "rb") as f:
            assert f.read() == bytes(model(MiB, seed=5))
        st = srv.stats()
        assert st["writes"] == 0 and st["exports"]["ro"]["source_flushes"] == 0


def test_source_errors_become_eio_and_the_server_keeps_serving(tmp_path):
    size = 4 * MiB
    want = model(size, seed=9)
    bad_off, bug_off = MiB + 4096, 3 * MiB
    with serving(tmp_path, f"name=img,size={size},seed=9,fail={bad_off}+4096,bug={bug_off}+4096") as (srv, _):
        for off in (bad_off, bug_off):
            # O_DIRECT so that neither readahead nor the page cache decides which request fails
            fd = os.open(srv.path("img"), os.O_RDONLY | os.O_DIRECT)
            try:
                buf = aligned_buffer(4096)
                for _ in range(3):
                    with pytest.raises(OSError) as info:
                        os.preadv(fd, [buf], off)
                    assert info.value.errno == errno.EIO
                assert os.preadv(fd, [buf], off + 8192) == 4096
                assert buf[:] == want[off + 8192 : off + 12288]
            finally:
                os.close(fd)
        with open(srv.path("img"), "rb") as f:
            assert f.read(MiB) == bytes(want[:MiB])
        st = srv.stats()
        assert st["errors"] >= 6
        assert st["failures"] >= 3  # the RuntimeError reads: logged as bugs, answered with EIO
        assert "injected bug" in srv.log()


def test_reads_are_served_concurrently(tmp_path):
    # The read at block 0 completes only once the read at 4 MiB has started: if
    # the server handled one request at a time, the first read would never return.
    size = 8 * MiB
    with serving(tmp_path, f"name=img,size={size},seed=4,gate=0+{4 * MiB}") as (srv, _):
        results: dict[str, object] = {}

        def read_at(off: int) -> None:
            fd = os.open(srv.path("img"), os.O_RDONLY | os.O_DIRECT)
            try:
                buf = aligned_buffer(4096)
                os.preadv(fd, [buf], off)
                results[off] = bytes(buf)
            except OSError as exc:
                results[off] = exc
            finally:
                os.close(fd)

        first = threading.Thread(target=read_at, args=(0,))
        first.start()
        # bounded wait until the gated request is parked in the daemon; only then send the other
        for _ in range(1000):
            if srv.stats()["exports"]["img"]["gate_waiting"] or not first.is_alive():
                break
            threading.Event().wait(0.01)
        assert srv.stats()["exports"]["img"]["gate_waiting"] == 1
        second = threading.Thread(target=read_at, args=(4 * MiB,))
        second.start()
        second.join(60)
        first.join(60)
        want = model(size, seed=4)
        assert results.get(0) == bytes(want[:4096])
        assert results.get(4 * MiB) == bytes(want[4 * MiB : 4 * MiB + 4096])


def test_fsync_and_close_flush_the_source(tmp_path):
    with serving(tmp_path, "name=img,size=1048576") as (srv, _):
        def flushes() -> int:
            return srv.stats()["exports"]["img"]["source_flushes"]

        with open(srv.path("img"), "rb") as f:  # read-only open and close: nothing to flush
            f.read(4096)
        assert flushes() == 0
        fd = os.open(srv.path("img"), os.O_RDWR)
        try:
            os.pwrite(fd, b"hello", 0)
            os.fsync(fd)
            assert flushes() == 1
            os.fsync(fd)  # fsync always reaches the source
            assert flushes() == 2
            os.pwrite(fd, b"again", 8192)
        finally:
            os.close(fd)  # dirty since the last flush: close flushes
        assert flushes() == 3
        # FUSE_RELEASE reaches the server asynchronously after close() returns: wait for it, bounded
        deadline = time.monotonic() + 30
        while srv.stats()["open_handles"] and time.monotonic() < deadline:
            time.sleep(0.01)
        st = srv.stats()
        assert st["fsyncs"] == 2 and st["flushes"] == 3 and st["open_handles"] == 0


def test_add_and_remove_exports_at_runtime(tmp_path):
    with serving(tmp_path, "name=first,size=65536") as (srv, _):
        assert srv.command("add name=second,size=131072,seed=2") == "second"
        assert sorted(os.listdir(srv.mnt)) == ["first", "second"]
        with open(srv.path("second"), "rb") as f:
            assert f.read() == bytes(model(131072, seed=2))
            with pytest.raises(ServerError, match="BusyError"):
                srv.command("remove second 0.2")  # still open when the wait ends: refused
            assert f.read(10) == b""  # the export is untouched and still usable
        assert srv.command("remove second") == "second"  # waits for the kernel's RELEASE
        assert os.listdir(srv.mnt) == ["first"]
        # the kernel's cached dentry is invalidated asynchronously; bounded wait for it
        for _ in range(1000):
            if not os.path.exists(srv.path("second")):
                break
            threading.Event().wait(0.01)
        assert not os.path.exists(srv.path("second"))
        with pytest.raises(ServerError, match="NotFoundError"):
            srv.command("remove second")
        with pytest.raises(ServerError, match="BusyError"):
            srv.command("add name=first,size=4096")
        # the name can be reused for a new source
        srv.command("add name=second,size=4096,seed=8")
        with open(srv.path("second"), "rb") as f:
            assert f.read() == bytes(model(4096, seed=8))


# -- the whole FUSE path as a block source ----------------------------------------------


class FileSource(BlockSource):
    """The exported file as a BlockSource: os.pread/pwrite in threads; discard writes zeros."""

    def __init__(self, path: str, read_only: bool) -> None:
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.read_only = read_only

    async def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.size, offset, length)
        return await trio.to_thread.run_sync(os.pread, self.fd, n, offset) if n else b""

    async def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            return await super().write(offset, data)
        check_write(self.size, offset, len(data))
        assert await trio.to_thread.run_sync(os.pwrite, self.fd, data, offset) == len(data)

    async def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            return await super().discard(offset, length)
        await self.write(offset, bytes(length))

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self.fd)

    async def aclose(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("read_only", [False, True])
def test_conformance_through_fuse(tmp_path, read_only):
    size = 3 * MiB + 8192
    with serving(tmp_path, f"name=img,size={size},seed=11{',ro=1' if read_only else ''}") as (srv, _):
        async def make():
            return FileSource(srv.path("img"), read_only), bytes(model(size, seed=11))

        trio.run(check_source, make)
        assert srv.stats()["errors"] == 0


# -- loop device and ext4 ---------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.loop
def test_ext4_on_a_loop_device_over_the_export(tmp_path):
    target = str(tmp_path / "target")
    os.makedirs(target)
    with serving(tmp_path, f"name=img,size={128 * MiB}") as (srv, cleanup):
        trio.run(system.mkfs_ext4, srv.path("img"))
        # the daemon attaches its own file: losetup must not block its event loop
        attached = srv.command("attach img")
        dev = attached["dev"]
        cleanup.callback(_detach, dev)
        assert attached["direct_io"], "the kernel refused direct I/O on the FUSE file"
        assert srv.command("loops img") == [dev]
        assert trio.run(system.find_loop_devices, srv.path("img")) == [dev]
        with open(f"/sys/block/{os.path.basename(dev)}/queue/read_ahead_kb") as f:
            assert int(f.read()) == 1024

        files = {f"file{i}": random.Random(i).randbytes(n) for i, n in enumerate([0, 1, 4096, 100_000, 5 * MiB + 3])}
        cleanup.callback(_umount, target)
        trio.run(system.mount, dev, target)
        assert system.is_mountpoint(target)
        os.makedirs(os.path.join(target, "dir/sub"))
        for name, data in files.items():
            with open(os.path.join(target, "dir/sub", name), "wb") as f:
                f.write(data)
        os.sync()
        trio.run(system.umount, target)
        assert not system.is_mountpoint(target)

        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, timeout=120)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr

        # everything written went through FUSE into the source; read it back from there
        subprocess.run(["blockdev", "--flushbufs", dev], capture_output=True, timeout=60)
        trio.run(lambda: system.mount(dev, target, read_only=True))
        for name, data in files.items():
            with open(os.path.join(target, "dir/sub", name), "rb") as f:
                assert f.read() == data, name
        with pytest.raises(OSError) as info:
            open(os.path.join(target, "new"), "w")
        assert info.value.errno == errno.EROFS
        trio.run(system.umount, target)

        # busy: the loop device holds the file open, so the export cannot go away
        with pytest.raises(ServerError, match="BusyError"):
            srv.command("remove img 0.5")
        srv.command(f"detach {dev}")
        st = srv.stats()
        assert st["errors"] == 0 and st["bytes_written"] > 5 * MiB
        assert st["largest_read"] > 4096 and st["largest_write"] > 4096


@pytest.mark.loop
def test_read_only_loop_device_over_a_file_backed_export(tmp_path):
    backing = str(tmp_path / "backing.img")
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    _run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", ROOT + "/lazyfs/serve", backing])
    target = str(tmp_path / "target")
    os.makedirs(target)
    with serving(tmp_path, f"name=img,file={backing},ro=1") as (srv, cleanup):
        dev = trio.run(lambda: system.losetup_attach(srv.path("img"), read_only=True))
        cleanup.callback(_detach, dev)
        assert system.loop_direct_io(dev)
        cleanup.callback(_umount, target)
        trio.run(lambda: system.mount(dev, target, read_only=True))
        with open(os.path.join(ROOT, "lazyfs/serve/system.py"), "rb") as f:
            want = f.read()
        with open(os.path.join(target, "system.py"), "rb") as f:
            assert f.read() == want
        trio.run(system.umount, target)
        trio.run(system.losetup_detach, dev)
        assert trio.run(system.find_loop_devices, srv.path("img")) == []


# -- system helpers -----------------------------------------------------------------------------


def test_parse_mountinfo():
    text = (
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "43 27 0:40 / /tmp/x rw,nosuid,nodev,relatime - fuse.lazyfs lazyfs rw,user_id=0\n"
        "garbage line\n"
    )
    first, second = system.parse_mountinfo(text)
    assert (first.mountpoint, first.fstype, first.major, first.minor) == ("/mnt/with space", "ext3", 98, 0)
    assert (second.mount_id, second.fstype, second.source, second.minor) == (43, "fuse.lazyfs", "lazyfs", 40)


def test_parse_mountinfo_propagation_tags():
    text = (
        "36 35 98:0 / / rw shared:1 - ext4 /dev/vda rw\n"
        "512 36 7:0 / /mnt/img ro,relatime master:7 - ext4 /dev/loop0 ro\n"
        "513 36 7:1 / /mnt/both ro shared:9 master:7 propagate_from:2 - ext4 /dev/loop1 ro\n"
        "514 36 7:2 / /mnt/private ro,relatime - ext4 /dev/loop2 ro\n"
    )
    root, slave, both, private = system.parse_mountinfo(text)
    assert root.tags == ("shared:1",) and not root.is_slave
    assert slave.tags == ("master:7",) and slave.is_slave
    assert both.tags == ("shared:9", "master:7", "propagate_from:2") and both.is_slave
    assert private.tags == () and not private.is_slave
    assert (private.mountpoint, private.source) == ("/mnt/private", "/dev/loop2")


def test_command_errors_carry_stderr(tmp_path):
    async def main():
        with pytest.raises(system.CommandError) as info:
            await system.mount("/dev/does-not-exist", str(tmp_path))
        assert "does-not-exist" in info.value.stderr and info.value.returncode
        with pytest.raises(system.CommandError, match="timed out"):
            await system.run(["sleep", "10"], timeout=0.2)
        with pytest.raises(NotFoundError):
            await system.fuse_abort(str(tmp_path))

    require_root()
    trio.run(main)


def test_fuse_abort_rescues_a_mount(tmp_path):
    with serving(tmp_path, "name=img,size=65536") as (srv, _):
        srv.expect_alive = False
        assert system.is_mountpoint(srv.mnt)
        trio.run(system.fuse_abort, srv.mnt)
        with pytest.raises(OSError) as info:
            os.stat(srv.path("img"))
        # ENOENT: the server saw the abort and unmounted the dead connection already
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT)
        srv.proc.wait(timeout=60)  # the session is gone: the server winds down by itself
        srv.stop()
        assert not system.is_mountpoint(srv.mnt)


def test_export_fs_without_a_mount():
    """add/remove/statistics need no kernel; handlers answer in-process."""
    async def main():
        fs = ExportFS()
        src = MemorySource(8192)
        fs.add("a", src)
        with pytest.raises(BusyError):
            fs.add("a", src)
        with pytest.raises(Exception):
            fs.add("bad/name", src)
        dir_attr = await fs.lookup(1, b"a", None)
        file_attr = await fs.lookup(dir_attr.st_ino, IMAGE_NAME.encode(), None)
        assert file_attr.st_size == 8192
        info = await fs.open(file_attr.st_ino, os.O_RDWR, None)
        assert await fs.write(info.fh, 100, b"xyz") == 3
        assert await fs.read(info.fh, 99, 5) == b"\0xyz\0"
        with pytest.raises(BusyError):
            await fs.remove("a", wait=0.01)
        await fs.fsync(info.fh, False)

        async def release_soon():
            await trio.sleep(0.05)
            await fs.release(info.fh)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_soon)
            assert await fs.remove("a", wait=30) is src  # waited for the release
        assert src.flushes == 1 and fs.names() == []
        import pyfuse3

        with pytest.raises(pyfuse3.FUSEError):
            await fs.getattr(file_attr.st_ino, None)
        st = fs.statistics()
        assert (st["reads"], st["writes"], st["bytes_read"], st["bytes_written"], st["fsyncs"]) == (1, 1, 5, 3, 1)

    trio.run(main)


@pytest.mark.loop
def test_stopping_with_a_loop_device_attached(tmp_path):
    """A server stopped under an attached loop device leaves no mount and no hang behind."""
    with serving(tmp_path, "name=img,size=1048576") as (srv, cleanup):
        srv.expect_alive = False
        attached = srv.command("attach img")
        cleanup.callback(_detach, attached["dev"])
        srv.stop()  # the loop device still holds the file open
        assert not system.is_mountpoint(srv.mnt)
        fd = os.open(attached["dev"], os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError):
                os.preadv(fd, [aligned_buffer(4096)], 0)
        finally:
            os.close(fd)
