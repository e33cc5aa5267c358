"""Offline life (docs/daemon.md): hydrate, lose the registry, restart the daemon, keep working.

Real docker-registry, real daemon processes, FUSE, loop devices and ext4. In the first two tests
"the network is cut" by stopping the registry process (SIGSTOP): connections hang as over a dead
link, so every request runs into its timeout, the worst case for a restart; SIGCONT brings the
network back.

The third test cuts a real link instead: its daemon runs in a network namespace that reaches the
registry over a veth pair, and the test takes the link down.

Break-tests done once by hand (each turns these tests red):
* the daemon's state record without its ``manifest`` pin (``Daemon._records``): the restore
  resolves the tag again, which needs the stalled registry, and fails: no attachment comes back;
* ``MetadataCache.store_tail`` made a no-op (layer tails not kept): the restore opens the manifest
  from the cache but must fetch every tail from the stalled registry, and fails the same way.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image, flatten_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.serve import system
from lazyfs.serve.control import call
from tests.serve.conftest import ROOT
from tests.support.cleanup import release_under
from tests.support.netns import ShapedLink, cut, relay
from tests.support.trees import describe_tree, tree_differences

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.slow]

FETCH_DEADLINE = 3.0  # seconds a read of a missing chunk may wait before EIO (kept short for the test)
WAIT_STEPS = 600  # polls of 0.1 s: the bound on every wait below (never a timing assertion)


@pytest.fixture(scope="module")
def offline(env):
    env.doc.update(fetch_deadline=FETCH_DEADLINE, registry_probe_interval=0, readahead_chunks=0)
    with open(env.config_path, "w") as f:
        json.dump(env.doc, f)
    return env


def _wait(predicate, what):
    for _ in range(WAIT_STEPS):
        try:
            value = predicate()
        except Exception:  # the daemon is starting, or the socket is not there yet
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def _restart_daemon(env) -> subprocess.Popen:
    """kill -9 the daemon and start a new one; return it once it answers (restore is done by then)."""
    old = env.daemon_pid()
    os.kill(old, signal.SIGKILL)
    _wait(lambda: not os.path.exists(f"/proc/{old}") or open(f"/proc/{old}/stat").read().split()[2] == "Z",
          "the killed daemon to exit")
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "daemon", "--config", env.config_path], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _wait(lambda: call(env.socket, "ping", timeout=5)["pid"] == proc.pid, "the new daemon to answer")
    return proc


def _stop_daemon(env, proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _attachment(env, target) -> dict:
    return next(a for a in call(env.socket, "list", timeout=10) if a.get("target") == str(target))


def _hydration(env, name):
    return call(env.socket, "stats", timeout=10, name=name)["hydration"]


@contextmanager
def loop_mounted(disk: str, target):
    """*disk* read-only on a loop device, its ext4 mounted at *target* (noload: no journal replay)."""
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", disk], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", dev, str(target)], check=True, capture_output=True)
        try:
            yield dev
        finally:
            subprocess.run(["umount", str(target)], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _checksum_every_file(env, disk: str, mountpoint: str) -> None:
    """e2fsck the exported disk, loop-mount its ext4 and compare every file (sha256) with the source tree."""
    fsck = subprocess.run(["e2fsck", "-fn", disk], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with loop_mounted(disk, env.tmp / mountpoint):
        diffs = tree_differences(describe_tree(str(env.src)), describe_tree(str(env.tmp / mountpoint)))
        assert diffs == [], "\n".join(diffs[:20])


def test_hydrated_image_runs_with_the_network_cut_across_a_restart(offline, registry):
    """Hydrate; cut the network; checksum every file of the loop-mounted ext4; kill -9 the daemon
    and start another; checksum every file again: all of them match, with no registry to ask."""
    env = offline
    export = env.tmp / "hydrated"
    env.lazyfs("export", env.ref, str(export), "--hydrate", "--hydrate-deadline", "5")
    attached = _attachment(env, export)
    name = attached["name"]
    assert set(attached["hydrate"]) == {"deadline_at"}
    # the count of chunks fetched is the batch's, added when the batch returns: a poll can see
    # every chunk local before that (a CI run did), so wait for both
    done = _wait(lambda: (h := _hydration(env, name))["hydrated"] and h["chunks_fetched"] > 0 and h, "hydration")
    assert done["bytes_local"] == done["bytes_total"] > 0 and done["chunks_fetched"] > 0
    human = env.lazyfs("stats", str(export)).stdout
    assert "hydrated: yes" in human
    proc = None
    try:
        with registry.stopped():  # the network is cut
            _checksum_every_file(env, str(export / "disk.img"), "mnt-hydrated")  # the running daemon
            proc = _restart_daemon(env)
            restored = {a["name"]: a for a in call(env.socket, "list", timeout=10)}
            # the state file kept the pin and the same deadline
            assert restored[name]["hydrate"] == attached["hydrate"] and restored[name]["manifest"] == attached["manifest"]
            _checksum_every_file(env, str(export / "disk.img"), "mnt-hydrated")  # the restarted one
            stats = call(env.socket, "stats", timeout=10, name=name)
            assert stats["hydration"]["hydrated"] and stats["scheduler"]["fetches"] == 0
            assert stats["last_error"] is None
    finally:
        env.lazyfs("umount", str(export), check=False)
        _stop_daemon(env, proc)
    assert not system.is_mountpoint(str(env.tmp / "mnt-hydrated"))


def _push_random_image(env, registry, tag: str) -> tuple[str, str]:
    """A fresh image (random file contents: no chunk shared with the others) in the registry;
    return its reference and a flat copy of its disk."""
    src = env.tmp / f"src-{tag}"
    (src / "data").mkdir(parents=True)
    rng = random.Random(tag)
    for i in range(6):
        (src / "data" / f"file{i}").write_bytes(rng.randbytes(1 << 20))
    local = LocalRef(str(env.tmp / f"layout-{tag}"), "v1")
    ref = f"{registry.registry}/serve/random:{tag}"
    flat = str(env.tmp / f"flat-{tag}.img")

    async def build():
        await create_image(local, from_dir=str(src))
        async with ImageOpener(Config(registries=(RegistrySettings(registry.registry, plain_http=True),))) as opener:
            await push_image(opener, local, parse_reference(ref))
        await flatten_image(local, flat)

    trio.run(build)
    return ref, flat


def test_hydrated_image_runs_across_a_cut_link_and_a_restart(offline, registry, tmp_path):
    """The same across a real link: the daemon runs in a network namespace that reaches the
    registry over a veth pair; the test takes the link down (packets go nowhere, connections time
    out), kills the daemon with -9, starts another in the namespace, and checksums every file."""
    env = offline
    run = tmp_path / "run"
    doc = {**env.doc, "run_dir": str(run), "state_dir": str(tmp_path / "state"), "cache_root": str(tmp_path / "cache"),
           "writable_root": str(tmp_path / "writable")}
    config_path = str(tmp_path / "config.json")
    socket = str(run / "lazyfs.sock")
    export = tmp_path / "exp"
    with ShapedLink(1000, tag="h") as link, relay(link, registry.port) as address:
        doc["registries"] = [{"host": address, "plain_http": True}]
        with open(config_path, "w") as f:
            json.dump(doc, f)
        daemon = [*link.nsenter("client"), sys.executable, "-m", "lazyfs.cli", "daemon", "--config", config_path]

        def start() -> subprocess.Popen:
            proc = subprocess.Popen(daemon, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            _wait(lambda: call(socket, "ping", timeout=5), "the daemon in the namespace to answer")
            return proc

        procs = [start()]
        try:
            ref = f"{address}/serve/busybox:v1"  # the image the env pushed, seen across the link
            subprocess.run([sys.executable, "-m", "lazyfs.cli", "export", ref, str(export), "--hydrate",
                            "--config", config_path], cwd=ROOT, check=True, capture_output=True, timeout=120)
            name = next(a["name"] for a in call(socket, "list", timeout=10) if a.get("target") == str(export))
            _wait(lambda: call(socket, "stats", timeout=10, name=name)["hydration"]["hydrated"], "hydration")
            cut(link)
            disk = str(export / "disk.img")
            _checksum_every_file(env, disk, "mnt-link")
            pid = call(socket, "ping", timeout=10)["pid"]
            os.kill(pid, signal.SIGKILL)
            procs[0].wait(timeout=60)
            procs.append(start())
            assert name in {a["name"] for a in call(socket, "list", timeout=10)}
            _checksum_every_file(env, disk, "mnt-link")
            stats = call(socket, "stats", timeout=10, name=name)
            assert stats["hydration"]["hydrated"] and stats["scheduler"]["fetches"] == 0
        finally:
            subprocess.run([sys.executable, "-m", "lazyfs.cli", "umount", str(export), "--config", config_path],
                           cwd=ROOT, capture_output=True, timeout=120)
            release_under(tmp_path, socket)
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=60)


def _first_unreadable(disk: str, size: int, step: int) -> tuple[int, str]:
    """Read *disk* in *step* blocks from the start in a child process; (offset, error) of the first failure."""
    script = ("import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\nstep=int(sys.argv[3])\n"
              "for off in range(0,int(sys.argv[2]),step):\n"
              "    try: os.pread(fd,step,off)\n"
              "    except OSError as e: print(off, e.errno); sys.exit(0)\nprint(-1, 0)\n")
    out = subprocess.run([sys.executable, "-c", script, disk, str(size), str(step)], capture_output=True, text=True,
                         timeout=600).stdout.split()
    return int(out[0]), out[1]


def test_restart_offline_restores_a_partly_cached_image(offline, registry):
    """A lazily read (not hydrated) image: restart with the registry stalled restores it from its
    cached metadata; cached chunks read back; a missing chunk fails with EIO (after the fetch
    deadline, not forever); with the network back the same read succeeds and matches."""
    env = offline
    ref, flat = _push_random_image(env, registry, "partial")
    export = env.tmp / "partial"
    env.lazyfs("export", ref, str(export), "--no-hydrate")
    disk = str(export / "disk.img")
    with open(disk, "rb") as f:
        head = f.read(64 << 10)
    name = _attachment(env, export)["name"]
    before = _hydration(env, name)
    assert 0 < before["chunks_local"] < before["chunks_total"] and not before["hydrated"]
    size = os.path.getsize(disk)
    proc = None
    try:
        with registry.stopped():  # the network is cut
            proc = _restart_daemon(env)
            assert name in {a["name"] for a in call(env.socket, "list", timeout=10)}
            with open(disk, "rb") as f:
                assert f.read(64 << 10) == head  # cached chunks are served
            offset, errno = _first_unreadable(disk, size, 256 << 10)
            assert offset > 0 and errno == "5", (offset, errno)  # EIO for the first missing chunk
            stats = call(env.socket, "stats", timeout=10, name=name)
            error = stats["last_error"] or ""
            assert f"{FETCH_DEADLINE}s" in error and "deadline" in error, error  # it waited the deadline, then EIO
        # the network is back: the same read works, and is the image's bytes
        with open(flat, "rb") as f:
            f.seek(offset)
            expected = f.read(256 << 10)

        def read_back():
            fd = os.open(disk, os.O_RDONLY)
            try:
                return os.pread(fd, 256 << 10, offset) == expected
            finally:
                os.close(fd)

        assert _wait(read_back, "the read to work again with the network back")
    finally:
        env.lazyfs("umount", str(export), check=False)
        _stop_daemon(env, proc)
