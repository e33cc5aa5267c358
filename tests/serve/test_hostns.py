"""A daemon in a private mount namespace mounts its FUSE export in the host's (lazyfs.serve.hostns).

This is what systemd's ProtectSystem=/PrivateTmp= do to the daemon (see tests/serve/test_systemd.py
for the real units under a real systemd); here ``unshare --mount --propagation private`` builds
the private namespace, and the test process plays the host.

Break-test (done once, see the report of the change that added this file): with the
``hostns.configured()`` branch in ``lazyfs.serve.fuse.serve`` replaced by a plain
``pyfuse3.init(fs, mountpoint, opts)``, `test_private_namespace_daemon_export_is_seen_by_the_host`
fails: the export exists only in the daemon's namespace, so the host sees no mount at the
export dir (and ``lazyfs mount`` would fail in losetup with "No such file or directory").
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from lazyfs.errors import ConfigError
from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from lazyfs.serve import hostns, system
from lazyfs.serve.fuse import ExportFS, serve
from lazyfs.serve.singleton import owner_pid
from tests.serve.conftest import ROOT


def test_parse_namespace():
    assert hostns.parse_namespace(None) is None
    assert hostns.parse_namespace("") is None
    ns = hostns.parse_namespace("/proc/1/ns/mnt")
    assert ns == hostns.MountNamespace(1)
    assert (ns.path, ns.mountinfo) == ("/proc/1/ns/mnt", "/proc/1/mountinfo")
    for bad in ("/proc/self/ns/mnt", "/proc/1/ns/net", "1", "/proc/0/ns/mnt", "/proc/1/ns/mnt/", "x" * 1000):
        with pytest.raises(ConfigError, match="LAZYFS_MOUNT_NAMESPACE"):
            hostns.parse_namespace(bad)


def test_command_runs_in_the_namespace_only_when_one_is_set():
    assert hostns.command(["umount", "/x"], None) == ["umount", "/x"]
    assert hostns.command(["umount", "/x"], hostns.MountNamespace(7)) == [
        "nsenter", "--mount=/proc/7/ns/mnt", "--", "umount", "/x"]


def test_fuse_mount_command_spells_libfuse_options_for_the_kernel():
    cmd = hostns.fuse_mount_command(5, "/run/lazyfs/export", ["fsname=lazyfs", "subtype=lazyfs", "allow_other",
                                                            "default_permissions"], uid=0, gid=0)
    assert cmd == ["mount", "-i", "-n", "-t", "fuse.lazyfs", "-o",
                   "nosuid,nodev,fd=5,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
                   "lazyfs", "/run/lazyfs/export"]
    assert "nosuid" not in hostns.fuse_mount_command(5, "/m", ["suid"], uid=0, gid=0)[6]
    for bad in ("fd=3", "rootmode=1", "a,b"):
        with pytest.raises(ConfigError):
            hostns.fuse_mount_command(5, "/m", [bad], uid=0, gid=0)


def _fuse_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/fuse":
                out.append(fd)
        except OSError:
            pass
    return out


@pytest.mark.fuse
def test_serve_through_a_namespace_mounts_reads_and_unmounts(tmp_path, monkeypatch):
    """serve() with $LAZYFS_MOUNT_NAMESPACE: mounted nosuid,nodev by mount(8), served, then unmounted
    and the /dev/fuse fd closed (libfuse owns it once it is handed over)."""
    from tests.support.memory import MemorySource

    monkeypatch.setenv(hostns.ENV, f"/proc/{os.getpid()}/ns/mnt")  # this namespace, entered by nsenter
    mnt = tmp_path / "export"
    mnt.mkdir()
    before = _fuse_fds()
    data = os.urandom(8192)

    async def main():
        fs = ExportFS()
        src = MemorySource(len(data))
        await src.write(0, data)
        fs.add("one", src)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, str(mnt), fs)
            entry = [m for m in system.mounts() if m.mountpoint == str(mnt)]
            assert [m.fstype for m in entry] == ["fuse.lazyfs"]
            opts = open("/proc/self/mountinfo").read()
            line = next(ln for ln in opts.splitlines() if f" {mnt} " in ln)
            assert "nosuid" in line and "nodev" in line, line
            got = await trio.to_thread.run_sync(lambda: (mnt / "one" / "disk.img").read_bytes())
            assert got == data
            nursery.cancel_scope.cancel()
        assert not system.is_mountpoint(mnt)
        assert _fuse_fds() == before

    trio.run(main)


def _daemon_pid(run_dir: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = owner_pid(run_dir)
        if pid is not None and os.path.exists(os.path.join(run_dir, "lazyfs.sock")):
            return pid
        time.sleep(0.05)
    raise AssertionError("the daemon did not start")


@pytest.mark.slow
@pytest.mark.fuse
@pytest.mark.loop
def test_private_namespace_daemon_export_is_seen_by_the_host(tmp_path):
    """The daemon runs in a private mount namespace (nothing it mounts propagates out). With
    $LAZYFS_MOUNT_NAMESPACE naming the host's, `lazyfs mount` from the host works, umount works, and
    the export is gone from the host when the daemon stops."""
    if subprocess.run(["unshare", "--help"], capture_output=True).returncode != 0:
        pytest.skip("unshare (util-linux) is not installed")
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello from the image\n")
    layout = LocalRef(str(tmp_path / "layout"), "v1")
    trio.run(lambda: create_image(layout, from_dir=str(src)))
    run_dir = str(tmp_path / "run")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"run_dir": run_dir, "state_dir": str(tmp_path / "state"),
                               "cache_root": str(tmp_path / "cache"), "writable_root": str(tmp_path / "writable"),
                               "trace_record_seconds": 0}))
    env = {**os.environ, hostns.ENV: f"/proc/{os.getpid()}/ns/mnt"}
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                               sys.executable, "-m", "lazyfs.cli", "daemon", "--config", str(cfg)],
                              env=env, cwd=ROOT, stdout=log, stderr=log)
    target = tmp_path / "mnt"
    target.mkdir()

    def lazyfs(*args):
        return subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", str(cfg)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    try:
        pid = _daemon_pid(run_dir)
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")  # really private
        export = os.path.join(run_dir, "export")
        assert system.is_mountpoint(export)  # the host sees the daemon's export
        mounted = lazyfs("mount", f"oci:{layout.path}:v1", str(target))
        assert mounted.returncode == 0, mounted.stderr + (tmp_path / "daemon.log").read_text()
        assert (target / "hello").read_text() == "hello from the image\n"
        umounted = lazyfs("umount", str(target))
        assert umounted.returncode == 0, umounted.stderr
        assert not system.is_mountpoint(target)
    finally:
        lazyfs("umount", str(target))
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()
    assert not system.is_mountpoint(os.path.join(run_dir, "export"))  # unmounted in the host's namespace


def test_listen_fd_finds_the_named_fd_only_for_this_process():
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:lazyfs-mntns:b"}
    assert hostns.listen_fd("lazyfs-mntns", env, pid=42) == 4
    assert hostns.listen_fd("lazyfs-mntns", env, pid=43) is None  # passed to another process
    assert hostns.listen_fd("c", env, pid=42) is None
    assert hostns.listen_fd("b", {**env, "LISTEN_FDS": "2"}, pid=42) is None  # past LISTEN_FDS
    assert hostns.listen_fd("a", {**env, "LISTEN_FDS": "x"}, pid=42) is None
    assert hostns.listen_fd("a", {}, pid=42) is None


def _listen_env(monkeypatch, fd: int) -> None:
    """Make *fd* look like systemd's stored ``lazyfs-mntns`` fd of this process (fds start at 3)."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", str(fd - 2))
    monkeypatch.setenv("LISTEN_FDNAMES", ":".join(["unused"] * (fd - 3) + [hostns.FDNAME]))


def test_configured_enters_a_stored_fd_rather_than_the_proc_path(monkeypatch):
    monkeypatch.setenv(hostns.ENV, "/proc/1/ns/mnt")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert hostns.configured() == hostns.MountNamespace(1)
    _listen_env(monkeypatch, 9)
    ns = hostns.configured()
    assert ns == hostns.MountNamespace(1, 9)
    assert (ns.path, ns.mountinfo, hostns.pass_fds(ns)) == ("/proc/self/fd/9", "/proc/1/mountinfo", (9,))
    assert hostns.command(["umount", "/x"], ns)[:2] == ["nsenter", "--mount=/proc/self/fd/9"]


def test_store_namespace_fd_sends_the_namespace_to_the_notify_socket(tmp_path, monkeypatch):
    """What ExecStartPre=+lazyfs store-mount-namespace sends: FDSTOREREMOVE=1 for the name, then
    FDSTORE=1, the name, and the fd itself."""
    import socket

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        hostns.store_namespace_fd("/proc/self/ns/mnt")
        # the fd the previous start stored goes first: restarts do not pile up copies
        assert server.recv(4096) == b"FDSTOREREMOVE=1\nFDNAME=lazyfs-mntns\n"
        msg, ancdata, _, _ = server.recvmsg(4096, socket.CMSG_SPACE(4))
    assert msg == b"FDSTORE=1\nFDNAME=lazyfs-mntns\n"
    [(level, kind, data)] = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = int.from_bytes(data[:4], "little")
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == os.readlink("/proc/self/ns/mnt")
    finally:
        os.close(fd)
    monkeypatch.delenv("NOTIFY_SOCKET")
    with pytest.raises(ConfigError, match="NOTIFY_SOCKET"):
        hostns.store_namespace_fd()
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with pytest.raises(ConfigError, match="not a mount namespace"):
        hostns.store_namespace_fd("/proc/self/ns/net")


@pytest.mark.fuse
def test_serve_through_a_stored_namespace_fd(tmp_path, monkeypatch):
    """The systemd path: nsenter enters /proc/self/fd/N, an fd it inherits (not a /proc/PID path)."""
    from tests.support.memory import MemorySource

    ns_fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    monkeypatch.setenv(hostns.ENV, f"/proc/{os.getpid()}/ns/mnt")  # where mountinfo is read
    _listen_env(monkeypatch, ns_fd)
    mnt = tmp_path / "export"
    mnt.mkdir()

    async def main():
        fs = ExportFS()
        fs.add("one", MemorySource(b"x" * 4096))
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, str(mnt), fs)
            assert system.is_mountpoint(mnt)
            got = await trio.to_thread.run_sync(lambda: (mnt / "one" / "disk.img").read_bytes())
            assert got == b"x" * 4096
            nursery.cancel_scope.cancel()
        assert not system.is_mountpoint(mnt)

    try:
        trio.run(main)
    finally:
        os.close(ns_fd)


def test_snapshotter_remove_tree_unmounts_in_the_host_namespace(tmp_path):
    """The snapshotter's remove_tree, run in a private mount namespace with $LAZYFS_MOUNT_NAMESPACE
    naming the host's, unmounts what is mounted below the tree in the host's namespace (where the
    snapshotter mounted it, and where containerd sees it), then removes the tree.

    As under systemd, the private namespace is a slave of the host's (host umounts reach it) and
    the tree is on a shared mount (systemd makes / shared; this test's host may not).

    Break-test (done once): with remove_tree calling a plain ``umount -l`` again (not through
    lazyfs.serve.system), the umount only reaches the private namespace's copy, the host still
    has the mount, and remove_tree refuses ("still has mounts below it"): this test goes red.
    """
    if subprocess.run(["unshare", "--help"], capture_output=True).returncode != 0:
        pytest.skip("unshare (util-linux) is not installed")
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        tree = shared / "snapshot"
        mnt = tree / "fs" / "mnt"
        mnt.mkdir(parents=True)
        (tree / "fs" / "file").write_text("x")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
        env = {**os.environ, hostns.ENV: f"/proc/{os.getpid()}/ns/mnt"}
        code = "import sys; from lazyfs.serve.snapshotter.overlay import remove_tree; remove_tree(sys.argv[1])"
        done = subprocess.run(["unshare", "--mount", "--propagation", "slave", sys.executable, "-c", code,
                               str(tree)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert not system.is_mountpoint(mnt)
        assert not tree.exists()
    finally:
        subprocess.run(["umount", "-R", "-l", str(shared)], check=False)
