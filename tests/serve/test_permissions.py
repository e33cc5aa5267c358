"""What another local user can reach of a lazyfs host: nothing (docs/trust.md, "Local users").

A real daemon (started by `lazyfs mount`) serves an image from the registry; then the
user ``nobody`` (``setpriv``) tries to read every file of the chunk cache, the
exported disk file, the control socket and the daemon's log. Every directory the
test makes is world-traversable, and the run dir and cache root are made 0755
before the daemon starts, so only lazyfs's own modes stand in the way.

`lazyfs mount` honours no device node and no set-user-ID file of the image unless
asked (--dev, --suid).
"""

import json
import os
import shutil
import stat
import subprocess
import tempfile

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from tests.image.test_local import make_busybox_tree
from tests.support.cli import run_lazyfs
from tests.support.cleanup import release_under

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# Run as nobody by the system python (the project's venv may not be readable): try every path,
# report what happened. Sockets are connected, files opened for reading, directories listed.
PROBE = r"""
import errno, json, os, socket, stat, sys
out = {}
for path in json.load(sys.stdin):
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            s = socket.socket(socket.AF_UNIX); s.connect(path); s.close()
        elif stat.S_ISDIR(st.st_mode):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
        out[path] = "OK"
    except OSError as e:
        out[path] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def as_nobody(paths: list[str]) -> dict[str, str]:
    proc = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", PROBE], input=json.dumps(paths), capture_output=True,
                          text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


class Host:
    def __init__(self, base: str, registry):
        self.base = base
        self.doc = {"run_dir": f"{base}/run", "state_dir": f"{base}/state", "cache_root": f"{base}/cache",
                    "writable_root": f"{base}/writable", "trace_record_seconds": 0,
                    "registries": [{"host": registry.registry, "plain_http": True}]}
        self.config = f"{base}/config.json"
        with open(self.config, "w") as f:
            json.dump(self.doc, f)
        os.chmod(self.config, 0o644)

    def lazyfs(self, *args, check=True):
        return run_lazyfs(self.config, *args, check=check, timeout=300)


@pytest.fixture(scope="module")
def host(registry):
    base = tempfile.mkdtemp(prefix="lazyfs-perm-", dir="/tmp")
    os.chmod(base, 0o755)  # anyone may look around: only lazyfs's modes protect what is inside
    h = Host(base, registry)
    src = f"{base}/src"
    make_busybox_tree(src)
    os.makedirs(f"{src}/dev", exist_ok=True)
    os.mknod(f"{src}/dev/zero-copy", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    shutil.copy("/usr/bin/id", f"{src}/bin/id-suid")
    os.chown(f"{src}/bin/id-suid", 0, 0)
    os.chmod(f"{src}/bin/id-suid", 0o4755)
    with open(f"{src}/secret", "w") as f:
        f.write("private image data\n")
    local = LocalRef(f"{base}/layout", "v1")
    trio.run(lambda: create_image(local, from_dir=src))
    h.ref = f"{registry.registry}/perm/app:v1"

    async def push():
        async with ImageOpener(Config(registries=(RegistrySettings(registry.registry, plain_http=True),))) as o:
            await push_image(o, local, parse_reference(h.ref))

    trio.run(push)
    for d in ("run", "cache"):  # made readable first, as by an older lazyfs or another tool
        os.makedirs(f"{base}/{d}", mode=0o755)
        os.chmod(f"{base}/{d}", 0o755)
    try:
        yield h
    finally:
        release_under(base, f"{base}/run/lazyfs.sock")
        shutil.rmtree(base, ignore_errors=True)


def mounted(h: Host, name: str, *args: str) -> str:
    target = f"{h.base}/{name}"
    os.makedirs(target)
    os.chmod(target, 0o755)
    h.lazyfs("mount", h.ref, target, *args)
    return target


def test_another_user_reads_nothing_of_the_host(host):
    h = host
    target = mounted(h, "mnt")
    try:
        with open(f"{target}/secret") as f:  # through the daemon: chunks fetched and cached
            assert f.read() == "private image data\n"
        run = h.doc["run_dir"]
        export_files = [os.path.join(d, n) for d, _, names in os.walk(f"{run}/export") for n in names]
        cache_files = [os.path.join(d, n) for d, dirs, names in os.walk(h.doc["cache_root"]) for n in names + dirs]
        assert export_files and len(cache_files) > 2, (export_files, cache_files)
        probes = [f"{run}/lazyfs.sock", f"{run}/daemon.log", run, f"{run}/export", h.doc["cache_root"],
                  *export_files, *cache_files]
        got = as_nobody(probes)
        assert {p: r for p, r in got.items() if r == "OK"} == {}
        # and not only because the directories are closed: each thing's own mode keeps others out
        assert {p: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in (run, f"{run}/export", h.doc["cache_root"])} == \
            {p: "0o700" for p in (run, f"{run}/export", h.doc["cache_root"])}
        for path in cache_files + [f"{run}/daemon.log", f"{run}/lazyfs.sock"]:
            mode = os.stat(path).st_mode
            assert stat.S_IMODE(mode) & 0o077 == 0, f"{path} is {oct(stat.S_IMODE(mode))}"
        assert {oct(stat.S_IMODE(os.stat(p).st_mode)) for p in export_files} == {"0o400"}  # read-only export
        # what the daemon logged at INFO names no URL (a presigned redirect would carry its credentials)
        with open(f"{run}/daemon.log") as f:
            log = f.read()
        assert "attach" in log and "http://" not in log and "https://" not in log, log[-2000:]
    finally:
        h.lazyfs("umount", target)


def test_device_nodes_and_setuid_files_of_an_image_are_not_honoured(host):
    h = host
    target = mounted(h, "mnt-default")
    try:
        options = next(line.split()[3] for line in open("/proc/self/mounts") if line.split()[1] == target)
        assert {"nodev", "nosuid"} <= set(options.split(",")), options
        with pytest.raises(PermissionError):
            open(f"{target}/dev/zero-copy", "rb")
        euid = subprocess.run([*NOBODY, f"{target}/bin/id-suid", "-u"], capture_output=True, text=True, timeout=30)
        assert euid.stdout.strip() == "65534", euid  # set-user-ID root ignored
    finally:
        h.lazyfs("umount", target)

    target = mounted(h, "mnt-allowed", "--dev", "--suid")  # asked for: honoured
    try:
        with open(f"{target}/dev/zero-copy", "rb") as f:
            assert f.read(4) == b"\0\0\0\0"
        euid = subprocess.run([*NOBODY, f"{target}/bin/id-suid", "-u"], capture_output=True, text=True, timeout=30)
        assert euid.stdout.strip() == "0", euid
    finally:
        h.lazyfs("umount", target)
