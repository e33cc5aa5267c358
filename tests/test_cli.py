"""Every command that reaches a registry or a layout fails, on every fault, with one line.

The table runs `python -m lazyfs.cli` against a real docker-registry (Basic auth), behind the
fault proxy where the fault is on the wire, and against damaged copies of a local layout. For
each (command, fault) it asserts: exit status 1; exactly one line on stderr, naming the object
and the cause; no traceback and no exception group anywhere in the output; nothing left
attached (mounts, loop devices, daemon attachments, export links). A pair that cannot arise is
in the table too, as not applicable, with the reason.

One registry, one daemon and one set of proxies serve the whole module. The config lists no
registry: every command reaches the (plain HTTP) registry through ``--plain-http`` alone, so
the mount and export rows also show that the flag reaches the daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from lazyfs.fetch.credentials import Credentials
from lazyfs.fetch.registry import RegistryClient
from lazyfs.format.oci import parse_manifest
from lazyfs.format.reference import parse_reference
from lazyfs.image.layout import OciLayout
from lazyfs.serve import system
from lazyfs.serve.control import call
from tests.support.cli import run_lazyfs
from tests.support.cleanup import loops_under, release_under
from tests.support.containerd import oci_image_from_trees, push_oci_image
from tests.support.proxy import FaultProxy
from tests.support.registry import free_port, registry_fixture, write_auth_file

pytestmark = [pytest.mark.registry, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
registry = registry_fixture(auth="htpasswd")


@dataclass
class World:
    tmp: Path
    config: str  # the config file: no registries, good credentials except for the wrong-credentials host
    listed: str  # the same, listing every registry host as plain HTTP (rpull refuses --plain-http)
    socket: str
    export_dir: str
    reg: str  # the registry
    flip: str  # proxy flipping the first byte of every blob response
    trunc: str  # proxy cutting every manifest response short
    wrong: str  # proxy whose credentials in the config are wrong
    dead: str  # nothing listens here
    good: str  # oci:DIR:v1, a good local lazyfs image
    bad_meta: str  # the same with a byte of its layer metadata flipped
    bad_chunk: str  # the same with a byte of its first chunk (the ext4 superblock) flipped
    bad_manifest: str  # the same with its manifest blob cut in half
    counter: int = 0

    def lazyfs(self, *args: str, timeout: float = 300, config: str | None = None) -> subprocess.CompletedProcess:
        return run_lazyfs(config or self.config, *args, check=False, timeout=timeout)

    def fresh(self, name: str) -> str:
        self.counter += 1
        path = self.tmp / "out" / f"{name}-{self.counter}"
        path.mkdir(parents=True)
        return str(path)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def _damaged_copy(src: Path, dst: Path) -> tuple[Path, object]:
    shutil.copytree(src, dst)
    layout = OciLayout(str(dst))
    data, _ = layout.read_manifest("v1")
    manifest = parse_manifest(data)
    return dst, manifest


@pytest.fixture(scope="module")
def world(registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    tree = tmp / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_text("hello from lazyfs\n")
    (tree / "random.bin").write_bytes(os.urandom(600_000))  # real chunks, not holes

    auths = tmp / "auths.json"
    proxies = [FaultProxy.running_in_thread(registry.port) for _ in range(3)]
    flip, trunc, wrong = (p.__enter__() for p in proxies)
    try:
        flip.faults.corrupt(0, path="/blobs/")
        trunc.faults.truncate(10, path="/manifests/")
        hosts = {name: f"127.0.0.1:{p.port}" for name, p in (("flip", flip), ("trunc", trunc), ("wrong", wrong))}
        entries = {h: (registry.username, registry.password) for h in (registry.registry, hosts["flip"], hosts["trunc"])}
        entries[hosts["wrong"]] = (registry.username, "not-the-password")
        write_auth_file(auths, entries)
        doc = {"run_dir": str(tmp / "run"), "state_dir": str(tmp / "state"), "cache_root": str(tmp / "cache"),
               "writable_root": str(tmp / "writable"), "credentials": str(auths), "trace_record_seconds": 0,
               "trace_replay": False}
        dead = f"127.0.0.1:{free_port()}"
        config, listed = tmp / "config.json", tmp / "listed.json"
        config.write_text(json.dumps(doc))
        listed.write_text(json.dumps({**doc, "registries": [
            {"host": h, "plain_http": True} for h in (registry.registry, *hosts.values(), dead)]}))
        w = World(tmp, str(config), str(listed), str(tmp / "run" / "lazyfs.sock"), str(tmp / "run" / "export"), registry.registry,
                  hosts["flip"], hosts["trunc"], hosts["wrong"], dead,
                  f"oci:{tmp}/good:v1", f"oci:{tmp}/bad-meta:v1", f"oci:{tmp}/bad-chunk:v1", f"oci:{tmp}/bad-manifest:v1")
        created = w.lazyfs("create", w.good, "--from-dir", str(tree), "--chunk-size", "64K")
        assert created.returncode == 0, created.stderr
        pushed = w.lazyfs("push", w.good, f"{w.reg}/errors/img:v1", "--plain-http", w.reg)
        assert pushed.returncode == 0, pushed.stderr

        async def push_ordinary():
            async with RegistryClient(registry.configs(), Credentials(str(auths))) as client:
                await push_oci_image(client, parse_reference(f"{w.reg}/errors/ordinary:v1"),
                                     oci_image_from_trees([(str(tree), ())]))

        trio.run(push_ordinary)

        good = tmp / "good"
        path, manifest = _damaged_copy(good, tmp / "bad-meta")
        layer = manifest.layers[0]
        _flip(path / "blobs" / "sha256" / layer.digest.split(":")[1], layer.meta_offset + layer.meta_length // 2)
        path, manifest = _damaged_copy(good, tmp / "bad-chunk")
        _flip(path / "blobs" / "sha256" / manifest.layers[0].digest.split(":")[1], 40)  # inside the first frame
        path, manifest = _damaged_copy(good, tmp / "bad-manifest")
        blob = path / "blobs" / "sha256" / manifest.digest.split(":")[1]
        data = blob.read_bytes()
        os.chmod(blob, 0o644)
        blob.write_bytes(data[: len(data) // 2])
        yield w
    finally:
        release_under(tmp, str(tmp / "run" / "lazyfs.sock"))
        for p in proxies:
            p.__exit__(None, None, None)


def leftovers(w: World) -> list[str]:
    """What a failed command left attached: mounts, loop devices, daemon attachments, export links."""
    found = [f"mount {m.mountpoint}" for m in system.mounts()
             if m.mountpoint.startswith(str(w.tmp)) and m.mountpoint != w.export_dir]
    found += [f"loop {line}" for line in loops_under(w.tmp)]
    if os.path.exists(w.socket):
        found += [f"attachment {a['name']}" for a in call(w.socket, "list", timeout=30)]
    found += [f"link {p}" for p in (w.tmp / "out").glob("*/disk.img")] if (w.tmp / "out").exists() else []
    return found


# ----------------------------------------------------------------------------- the table

FAULTS = ("meta-local", "meta-proxy", "chunk", "unreachable", "credentials", "unknown-tag", "truncated-manifest")

# What each fault's one line must say (besides the object): any of these words.
CAUSES = {
    "meta-local": ("digest mismatch",),
    "meta-proxy": ("digest mismatch",),
    "chunk": ("digest mismatch", "superblock"),
    "unreachable": ("cannot connect",),
    "credentials": ("401", "credentials", "unauthorized"),
    "unknown-tag": ("not found", "unknown", "no tag", "has no"),
    "truncated-manifest": ("cut short", "not JSON", "truncated", "incomplete", "digest mismatch"),
}

LOCAL_ONLY = "works on a local layout only; a registry image comes through `pull` (its rows)"
NO_REGISTRY = "reads a local layout and never a registry"
METADATA_ONLY = "fetches manifest, config and layer metadata, never a chunk"
ATTACH_READS_NO_CHUNK = ("attaching reads no chunk: a bad chunk fails the guest's read with EIO later "
                         "(tests/serve/test_fuse.py, tests/fetch)")
NOT_LAZYFS_SOURCE = "its source is an ordinary OCI image: no lazyfs metadata or chunks to damage (the proxy row flips its blobs)"
RPULL_LAYERS = "the layers' metadata is read by the snapshotter, not by rpull (tests/serve/snapshotter)"
TCMU_FIRST = ("this host has no target_core_user: attach is refused before any image is opened, so every fault "
              "gives that same line (the meta-local and meta-proxy rows show it; tests/serve/tcmu runs attach in a guest)")


def _cmd(w: World, command: str, fault: str):
    """(argv, object named in the message) for *command* under *fault*, or the reason it cannot arise."""
    local = {"meta-local": w.bad_meta, "chunk": w.bad_chunk, "unknown-tag": w.good.replace(":v1", ":nosuch"),
             "truncated-manifest": w.bad_manifest}
    remote = {"meta-proxy": (w.flip, "errors/img:v1"), "unreachable": (w.dead, "errors/img:v1"),
              "credentials": (w.wrong, "errors/img:v1"), "unknown-tag": (w.reg, "errors/img:nosuch"),
              "truncated-manifest": (w.trunc, "errors/img:v1")}
    if command == "verify" and fault in remote:  # a registry image: checked against the chain of digests
        host, path = remote[fault]
        return ["verify", f"{host}/{path}", "--quiet", "--plain-http", host], host
    if command in ("info", "verify", "flatten"):
        if fault not in local:
            return NO_REGISTRY if fault in ("unreachable", "credentials") else LOCAL_ONLY
        if command == "info" and fault == "chunk":
            return "info reads metadata only, never a chunk"
        extra = [os.path.join(w.fresh("flat"), "disk.raw")] if command == "flatten" else []
        return [command, local[fault], *extra], local[fault].split(":")[1]
    if command == "push":
        if fault in local:
            return ["push", local[fault], f"{w.reg}/errors/pushed:v1", "--plain-http", w.reg], local[fault].split(":")[1]
        if fault == "meta-proxy":
            return "push sends blobs and reads none back (the registry checks each digest it receives)"
        host, _ = remote[fault]
        return ["push", w.good, f"{host}/errors/pushed:v1", "--plain-http", host], host
    if command == "pull":
        if fault in ("meta-local", "chunk"):
            return METADATA_ONLY if fault == "chunk" else "pull reads the registry; its local side is only written"
        host, path = remote[fault]
        return ["pull", f"{host}/{path}", f"oci:{w.fresh('pull')}/layout:v1", "--plain-http", host], host
    if command in ("mount", "export"):
        if fault == "chunk" and command == "export":
            return ATTACH_READS_NO_CHUNK
        if fault in ("meta-local", "chunk"):
            image, named = local[fault], local[fault].split(":")[1]
            plain = []
        else:
            host, path = remote[fault]
            image, named, plain = f"{host}/{path}", host, ["--plain-http", host]
        return [command, image, w.fresh(command), *plain], named
    if command == "convert":
        if fault in ("meta-local", "chunk"):
            return NOT_LAZYFS_SOURCE
        host, path = remote[fault]
        path = path.replace("img", "ordinary")
        return ["convert", f"{host}/{path}", f"oci:{w.fresh('convert')}/layout:v1", "--quiet", "--no-cache",
                "--plain-http", host], host
    if command == "rpull":
        if fault in ("meta-local", "chunk"):
            return RPULL_LAYERS
        host, path = remote[fault]
        # the registry fault stops rpull before it talks to containerd, so no containerd is needed
        return ["rpull", f"{host}/{path}", "--address", str(w.tmp / "no-containerd.sock")], host
    if command == "tcmu attach":
        from lazyfs.serve.tcmu import configfs

        try:
            configfs.check_available()
        except Exception:
            available = False
        else:
            available = True
        if not available and fault not in ("meta-local", "meta-proxy"):
            return TCMU_FIRST
        if fault in ("meta-local", "chunk"):
            image, named, plain = local[fault], local[fault].split(":")[1], []
        else:
            host, path = remote[fault]
            image, named, plain = f"{host}/{path}", host, ["--plain-http", host]
        if not available:
            named = "target_core_user"
        return ["tcmu", "attach", image, f"errors{w.counter}", *plain], named
    raise AssertionError(command)


COMMANDS = ("info", "verify", "flatten", "push", "pull", "mount", "export", "convert", "rpull", "tcmu attach")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_failure_is_one_line_that_names_object_and_cause(world, command, fault):
    row = _cmd(world, command, fault)
    if isinstance(row, str):
        pytest.skip(f"not applicable: {command} / {fault}: {row}")
    argv, named = row
    proc = world.lazyfs(*argv, config=world.listed if command == "rpull" else None)
    out = proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, f"exit {proc.returncode}: {out}"
    assert "Traceback" not in out and "sub-exception" not in out and "ExceptionGroup" not in out, out
    assert len(lines) == 1, f"stderr has {len(lines)} lines:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("lazyfs: "), line
    assert "internal error" not in line, line
    assert named in line, f"{named!r} not named in: {line}"
    causes = ("target_core_user",) if named == "target_core_user" else CAUSES[fault]
    assert any(c.lower() in line.lower() for c in causes), f"none of {causes} in: {line}"
    assert leftovers(world) == []


# ----------------------------------------------------------------------------- flags reach the daemon


def _one_line_failure(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "sub-exception" not in out, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_plain_http_reaches_the_daemon_with_no_config_entry(world):
    """The config lists no registry: --plain-http alone makes mount and export work."""
    image = f"{world.reg}/errors/img:v1"
    target = world.fresh("plain-mount")
    mounted = world.lazyfs("mount", image, target, "--plain-http", world.reg)
    try:
        assert mounted.returncode == 0, mounted.stderr
        assert Path(target, "etc", "hello").read_text() == "hello from lazyfs\n"
    finally:
        umounted = world.lazyfs("umount", target)
    assert umounted.returncode == 0, umounted.stderr

    directory = world.fresh("plain-export")
    exported = world.lazyfs("export", image, directory, "--plain-http", world.reg)
    try:
        assert exported.returncode == 0, exported.stderr
        with open(os.path.join(directory, "disk.img"), "rb") as f:
            f.seek(1024 + 56)
            assert f.read(2) == b"\x53\xef"  # the ext4 superblock magic, read through the daemon
    finally:
        unexported = world.lazyfs("umount", directory)
    assert unexported.returncode == 0, unexported.stderr
    assert leftovers(world) == []


def test_without_plain_http_the_failure_says_why(world):
    """HTTPS to a plain-HTTP registry: the cause after "cannot connect to URL:" is never empty."""
    line = _one_line_failure(world.lazyfs("mount", f"{world.reg}/errors/img:v1", world.fresh("https-mount")))
    assert f"cannot connect to https://{world.reg}: " in line, line
    reason = line.split(f"cannot connect to https://{world.reg}: ", 1)[1]
    assert reason.strip() and not reason.startswith(" ") and not reason.startswith("("), line
    assert "SSL" in reason, line  # the TLS handshake with a plain-HTTP server is what failed
    assert leftovers(world) == []


def test_rpull_refuses_plain_http_with_one_line_naming_the_config(world):
    line = _one_line_failure(world.lazyfs("rpull", f"{world.reg}/errors/img:v1", "--plain-http", world.reg,
                                          "--address", str(world.tmp / "no-containerd.sock")))
    assert "--plain-http" in line and "config" in line and world.reg in line, line


def test_a_flag_without_effect_is_refused(world):
    line = _one_line_failure(world.lazyfs("mount", world.good, world.fresh("ro"), "--writable-root",
                                          str(world.tmp / "w")))
    assert "--writable-root" in line and "--writable" in line, line
    assert not (world.tmp / "w").exists()
    proc = world.lazyfs("info", world.good, "--plain-http", world.reg)
    assert proc.returncode == 2 and "unrecognized arguments: --plain-http" in proc.stderr  # info reaches no registry


def _layer_files(root: Path) -> set[str]:
    """Files of writable layers (a layer.json marks each layer directory) anywhere below *root*."""
    found = set()
    for descriptor in root.rglob("layer.json"):
        found |= {str(p) for p in descriptor.parent.rglob("*") if p.is_file()}
    return found


def test_writable_root_puts_the_layer_under_it_and_nowhere_else(world):
    """mount/export --writable --writable-root DIR: the writable layer's files are under DIR only."""
    before = _layer_files(world.tmp)
    root = world.tmp / "fast-disk"
    target = world.fresh("rw-mount")
    mounted = world.lazyfs("mount", f"{world.reg}/errors/img:v1", target, "--writable", "--writable-root", str(root),
                           "--plain-http", world.reg)
    assert mounted.returncode == 0, mounted.stderr
    try:
        Path(target, "written").write_bytes(os.urandom(1 << 20))
        subprocess.run(["sync", "-f", target], check=True)
        described = [a for a in call(world.socket, "list", timeout=30) if a.get("target") == target]
        assert described and described[0]["writable"].startswith(str(root) + "/"), described
    finally:
        umounted = world.lazyfs("umount", target)
    assert umounted.returncode == 0, umounted.stderr

    export_root = world.tmp / "fast-disk-2"
    directory = world.fresh("rw-export")
    exported = world.lazyfs("export", world.good, directory, "--writable", "--writable-root", str(export_root))
    assert exported.returncode == 0, exported.stderr
    try:
        with open(os.path.join(directory, "disk.img"), "r+b") as f:
            f.seek(32 << 20)
            f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
    finally:
        unexported = world.lazyfs("umount", directory)
    assert unexported.returncode == 0, unexported.stderr

    new = _layer_files(world.tmp) - before
    assert new, "no writable layer was made"
    outside = sorted(p for p in new if not (p.startswith(str(root) + "/") or p.startswith(str(export_root) + "/")))
    assert outside == [], f"writable layer files outside --writable-root: {outside}"
    assert any(p.startswith(str(root) + "/") for p in new) and any(p.startswith(str(export_root) + "/") for p in new)
    assert not (world.tmp / "writable").exists() or not any((world.tmp / "writable").iterdir())
    assert leftovers(world) == []


def test_a_restarted_daemon_restores_with_the_same_flags(world):
    """The daemon's state keeps each attachment's --plain-http and --writable-root: a daemon
    killed and started again reattaches the image from the unlisted registry, writable under DIR."""
    import signal
    import time

    root = world.tmp / "restart-root"
    directory = world.fresh("restart")
    exported = world.lazyfs("export", f"{world.reg}/errors/img:v1", directory, "--writable", "--writable-root",
                            str(root), "--plain-http", world.reg)
    assert exported.returncode == 0, exported.stderr
    disk = os.path.join(directory, "disk.img")
    with open(disk, "rb") as f:
        head = f.read(8192)
    os.kill(call(world.socket, "ping", timeout=10)["pid"], signal.SIGKILL)
    log = world.tmp / "restarted-daemon.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "daemon", "--config", world.config], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        restored: list = []
        while not restored and time.monotonic() < deadline and daemon.poll() is None:
            try:
                restored = call(world.socket, "list", timeout=5)
            except Exception:  # not up yet
                time.sleep(0.1)
        assert restored, f"the new daemon restored nothing:\n{log.read_text(errors='replace')[-3000:]}"
        assert restored[0]["plain_http"] == [world.reg]
        assert restored[0]["writable"].startswith(str(root) + "/")
        with open(disk, "rb") as f:
            assert f.read(8192) == head
        unexported = world.lazyfs("umount", directory)
        assert unexported.returncode == 0, unexported.stderr
        assert leftovers(world) == []
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
