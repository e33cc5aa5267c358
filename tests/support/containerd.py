"""Real containerd + runc for tests, with `lazyfs snapshotter` as a proxy plugin, and OCI images to run.

* `oci_image_from_trees` builds an ordinary OCI image (gzip tar layers, with whiteouts) from
  directory trees; `push_oci_image` puts it in a registry.
* `SnapshotterProcess` runs ``lazyfs snapshotter`` (stop, or kill -9 to test restarts).
* `running_containerd` runs Debian's containerd with its own root, state, socket and config whose
  ``[proxy_plugins]`` point at the snapshotter; `Containerd.ctr` runs ``ctr`` against it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from lazyfs.format.oci import MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST

MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class OciImage:
    manifest: bytes
    config: bytes
    layers: tuple[bytes, ...]  # gzip-compressed tars, bottom first

    @property
    def manifest_digest(self) -> str:
        return _sha256(self.manifest)

    @property
    def blob_bytes(self) -> int:
        return len(self.config) + sum(len(b) for b in self.layers)


def tar_tree(root: str, whiteouts: tuple[str, ...] = ()) -> bytes:
    """An uncompressed layer tar of the tree at *root*, plus ``.wh.`` entries deleting *whiteouts*."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                tar.add(path, arcname=os.path.relpath(path, root), recursive=False)
        for path in whiteouts:
            head, tail = os.path.split(path.strip("/"))
            info = tarfile.TarInfo(os.path.join(head, ".wh." + tail))
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


def oci_image_from_trees(layers: list[tuple[str, tuple[str, ...]]], *, cmd: tuple[str, ...] = ("/bin/sh",)) -> OciImage:
    """An OCI image with one gzip layer per ``(tree, whiteouts)``, bottom first."""
    diff_ids, blobs, descriptors = [], [], []
    for root, whiteouts in layers:
        raw = tar_tree(root, whiteouts)
        diff_ids.append(_sha256(raw))
        blob = gzip.compress(raw, compresslevel=6, mtime=0)
        blobs.append(blob)
        descriptors.append({"mediaType": MEDIA_TYPE_OCI_LAYER_GZIP, "digest": _sha256(blob), "size": len(blob)})
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": list(cmd), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "tests.support.containerd"} for _ in layers],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": _sha256(config), "size": len(config)},
        "layers": descriptors,
    }, sort_keys=True).encode()
    return OciImage(manifest, config, tuple(blobs))


def with_config(image: OciImage, change) -> OciImage:
    """*image* with its config document changed by ``change(doc)`` (in place), and its manifest to match."""
    doc = json.loads(image.config)
    change(doc)
    config = json.dumps(doc, sort_keys=True).encode()
    manifest = json.loads(image.manifest)
    manifest["config"].update({"digest": _sha256(config), "size": len(config)})
    return OciImage(json.dumps(manifest, sort_keys=True).encode(), config, image.layers)


async def push_oci_image(client, ref, image: OciImage) -> str:
    """Upload *image* with a lazyfs `RegistryClient` to *ref*; return the manifest digest."""
    repo = ref.repo()
    for blob in (image.config, *image.layers):
        await client.push_blob(repo, blob, _sha256(blob))
    return await client.put_manifest(ref, image.manifest, MEDIA_TYPE_MANIFEST)


# ------------------------------------------------------------------ processes


def _wait_for_socket(path: str, process: subprocess.Popen, timeout: float, log: str) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; log {log}:\n{_tail(log)}")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {path} after {timeout:.0f} s; log {log}:\n{_tail(log)}")


def _tail(path: str, lines: int = 60) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class SnapshotterProcess:
    """``lazyfs snapshotter`` in the background; `start` again after `kill` to test restarts."""

    address: str
    root: str
    writable_root: str
    config_path: str | None = None
    log: str = ""
    mode: str = "overlay"
    prefix: tuple[str, ...] = ()  # e.g. ("nsenter", "--net=/run/netns/X"): run it (and its daemon) there
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float = 60.0) -> "SnapshotterProcess":
        self.log = self.log or os.path.join(os.path.dirname(self.address), "snapshotter.log")
        cmd = [*self.prefix, sys.executable, "-m", "lazyfs.cli", "snapshotter", "--address", self.address, "--root", self.root,
               "--writable-root", self.writable_root, "--mode", self.mode]
        if self.config_path:
            cmd += ["--config", self.config_path]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/")
        _wait_for_socket(self.address, self.process, timeout, self.log)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to clean anything up."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@dataclass
class Containerd:
    directory: str
    address: str
    process: subprocess.Popen
    log: str
    prefix: tuple[str, ...] = ()

    def ctr_command(self, *args: str, namespace: str = "default") -> list[str]:
        return [*self.prefix, "ctr", "--address", self.address, "--namespace", namespace, *args]

    def ctr(self, *args: str, namespace: str = "default", timeout: float = 300.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
        log = None
        if args and args[0] == "run" and "-d" not in args and input is None:
            # `ctr run` copies the output through FIFOs and can lose all of it when the container
            # exits at once (containerd#770); a file:// log URI makes the shim hand the container
            # the file itself as stdout/stderr, so nothing is copied and nothing can be lost.
            fd, log = tempfile.mkstemp(prefix="ctr-run-", suffix=".log")
            os.close(fd)
            args = ("run", "--log-uri", f"file://{log}", *args[1:])
        proc = subprocess.run(self.ctr_command(*args, namespace=namespace),
                              capture_output=True, text=True, timeout=timeout, input=input)
        if log is not None:
            with open(log, errors="replace") as f:
                proc = subprocess.CompletedProcess(proc.args, proc.returncode, f.read(), proc.stderr)
            os.unlink(log)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}\n"
                                 f"containerd log:\n{_tail(self.log, 30)}")
        return proc

    def remove_everything(self, namespace: str = "default") -> None:
        """Kill and delete every task and container, then every image, in *namespace*."""
        for cid in self.ctr("containers", "list", "-q", namespace=namespace, check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=namespace, check=False)
            for _ in range(100):  # the task needs a moment to stop after SIGKILL
                done = self.ctr("tasks", "delete", cid, namespace=namespace, check=False)
                if done.returncode == 0 or "not found" in done.stderr:
                    break
                time.sleep(0.1)
            self.ctr("containers", "delete", cid, namespace=namespace, check=False)
        images = self.ctr("images", "list", "-q", namespace=namespace, check=False).stdout.split()
        if images:
            self.ctr("images", "remove", "--sync", *images, namespace=namespace, check=False)


def containerd_config(directory: str, proxy_plugins: dict[str, str]) -> str:
    """containerd's config.toml: its own root, state and sockets; CRI off; *proxy_plugins* as snapshotters."""
    plugins = "".join(f'  [proxy_plugins.{name}]\n    type = "snapshot"\n    address = "{address}"\n'
                      for name, address in proxy_plugins.items())
    return f"""version = 2
root = "{directory}/root"
state = "{directory}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing",
                    "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{directory}/containerd.sock"

[ttrpc]
  address = "{directory}/containerd.sock.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

# No garbage collection but the synchronous kind (`--sync`, a lease deleted with sync): a test
# that finds a snapshot gone only because a periodic collection happened to run first fails
# every time, not once in a while under load.
[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.0001
  deletion_threshold = 0
  mutation_threshold = 1000000

[proxy_plugins]
{plugins}"""


@contextlib.contextmanager
def running_containerd(directory: str, proxy_plugins: dict[str, str], timeout: float = 60.0,
                       prefix: tuple[str, ...] = ()) -> Iterator[Containerd]:
    """Run containerd under *directory* (behind command *prefix*, if any; ``ctr`` too); on exit remove
    every container and image, then stop it."""
    if shutil.which("containerd") is None or shutil.which("runc") is None or shutil.which("ctr") is None:
        raise RuntimeError("containerd, ctr and runc are needed (apt-get install containerd runc)")
    os.makedirs(directory, exist_ok=True)
    config = os.path.join(directory, "config.toml")
    with open(config, "w") as f:
        f.write(containerd_config(directory, proxy_plugins))
    log = os.path.join(directory, "containerd.log")
    address = os.path.join(directory, "containerd.sock")
    with open(log, "ab") as out:
        process = subprocess.Popen([*prefix, "containerd", "--config", config], stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=out, cwd="/")
    try:
        _wait_for_socket(address, process, timeout, log)
        yield Containerd(directory, address, process, log, prefix)
    finally:
        if process.poll() is None:
            try:
                Containerd(directory, address, process, log, prefix).remove_everything()
            except Exception:
                pass
        _stop(process)
        for pid in shim_pids(address):  # shims of containers that outlived a failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def shim_pids(address: str) -> list[int]:
    """Process ids of the containerd shims serving the containerd at *address*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and address.encode() in argv:
            found.append(int(entry))
    return found
