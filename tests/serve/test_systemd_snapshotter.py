"""contrib/containerd/lazyfs-snapshotter.service, hardened, under a real systemd (PID 1 of a qemu guest).

Like tests/serve/test_systemd.py (same guest, tests/support/systemd_guest.py), with both contrib
units installed. Starting the snapshotter unit starts lazyfs.service (Requires=). There is no
containerd: a root shell outside both services plays it, with a small gRPC client
(``CLIENT`` below) on the snapshotter's socket. It prepares a lazyfs layer (the labels
containerd's CRI plugin sends; the image is in a docker-registry inside the guest, whose storage
was filled on the host), takes a view of it and mounts what the view returns, as containerd
would: a bind of the layer's ext4, which the sandboxed snapshotter mounted from a loop device.
Reading the image's file through that mount shows the snapshotter's mounts land in the host's
namespace. Removing the snapshots unmounts it there again.

Break-test (done once, see the report of the change that added this file): with
``Environment=LAZYFS_MOUNT_NAMESPACE=`` removed from the snapshotter unit, its losetup runs in its
own namespace, where the daemon's FUSE export is not mounted, and the Prepare fails: red.
"""

import json
import os
import re
import shlex

import pytest
import trio

from lazyfs.config import load_config
from lazyfs.format.oci import parse_manifest
from lazyfs.format.reference import parse_reference
from lazyfs.image.layout import OciLayout
from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.serve.snapshotter import api
from tests.serve.conftest import ROOT
from tests.support.guest import require_qemu
from tests.support.registry import registry_fixture
from tests.support.systemd_guest import SYSTEMD_GUEST_MODULES, run_systemd_guest

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.registry, pytest.mark.timeout(420)]
registry = registry_fixture()

CONTRIB = os.path.join(ROOT, "contrib", "containerd")
PROTO_CACHE = "/var/cache/lazyfs/containerd-api"

CLIENT = r'''
import subprocess, sys
import grpc
from lazyfs.serve.snapshotter import api

def say(k, v):
    print(f"RESULT {k}={v}", flush=True)

ref, layer, target = sys.argv[1:4]
pb = api.load()
stub = pb.snapshots_grpc.SnapshotsStub(grpc.insecure_channel("unix:/run/lazyfs/snapshotter.sock"))
md = [("containerd-namespace", "default")]
labels = {"containerd.io/snapshot.ref": target, "containerd.io/snapshot/cri.image-ref": ref,
          "containerd.io/snapshot/cri.layer-digest": layer}
try:
    stub.Prepare(pb.snapshots.PrepareSnapshotRequest(key="default/1/extract-1 " + target, labels=labels),
                 metadata=md, timeout=240)
    say("prepare", "mounts")
except grpc.RpcError as exc:
    say("prepare", exc.code().name + " " + (exc.details() or "").replace("\n", " ")[:300])
try:
    mounts = stub.View(pb.snapshots.ViewSnapshotRequest(key="view", parent=target), metadata=md, timeout=120).mounts
except grpc.RpcError as exc:
    say("view", exc.code().name + " " + (exc.details() or "").replace("\n", " ")[:300])
    sys.exit(0)
say("view", " ".join(f"{m.type}:{m.source}" for m in mounts))
lower = mounts[0].source
say("lower_in_host", subprocess.run(["findmnt", "-n", "-o", "FSTYPE", lower], capture_output=True,
                                    text=True).stdout.strip())
for m in mounts:
    subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, "/mnt/view"], check=True)
say("read", open("/mnt/view/hello").read().strip())
subprocess.run(["umount", "/mnt/view"], check=True)
stub.Remove(pb.snapshots.RemoveSnapshotRequest(key="view"), metadata=md, timeout=120)
stub.Remove(pb.snapshots.RemoveSnapshotRequest(key=target), metadata=md, timeout=120)
say("lower_after_remove", "mounted" if subprocess.run(["findmnt", lower], capture_output=True).returncode == 0
    else "gone")
'''

SCRIPT = r"""
say() {{ echo "RESULT $*"; }}
mkdir -p /mnt/view
/usr/bin/docker-registry serve /srv/registry.json >/srv/registry.log 2>&1 &
systemctl start lazyfs-snapshotter.service || {{ systemctl status lazyfs-snapshotter lazyfs --no-pager; journalctl -u lazyfs-snapshotter --no-pager; exit 1; }}
i=0; while [ ! -S /run/lazyfs/snapshotter.sock ] && [ $i -lt 900 ]; do sleep 0.2; i=$((i+1)); done
PID=$(systemctl show -p MainPID --value lazyfs-snapshotter)
for p in ProtectSystem PrivateTmp NoNewPrivileges; do say $p=$(systemctl show -p $p --value lazyfs-snapshotter); done
say caps="$(systemctl show -p CapabilityBoundingSet --value lazyfs-snapshotter)"
say own_namespace=$([ -n "$PID" ] && [ "$(readlink /proc/$PID/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] && echo yes || echo no)
LAZYFS_PROTO_CACHE={cache} {python} /srv/client.py {ref} {layer} {target}
journalctl -u lazyfs-snapshotter -u lazyfs --no-pager -o cat | grep -E 'WARNING|ERROR|Traceback|rror' | head -8
exit 0
"""


def _results(output: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"RESULT (\w+)=(.*)$", output, re.M))


def _tree(path: str, guest_path: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.join(guest_path, os.path.relpath(full, path))] = f.read()
    return out


def test_hardened_snapshotter_unit_mounts_in_the_host_namespace(tmp_path, registry):
    guest = require_qemu(SYSTEMD_GUEST_MODULES)
    venv = os.path.join(ROOT, ".venv", "bin")
    if not os.access(os.path.join(venv, "lazyfs"), os.X_OK):
        pytest.skip(f"{venv}/lazyfs is missing (run scripts/setup.sh)")
    # the image, pushed to the host's registry; its storage goes into the guest's registry
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello from the lazy layer\n")
    local = LocalRef(str(tmp_path / "layout"), "v1")
    trio.run(lambda: create_image(local, from_dir=str(src)))
    ref = f"{registry.registry}/guest/hello:v1"
    cfg = {"registries": [{"host": registry.registry, "plain_http": True}], "trace_record_seconds": 0,
           "cache_size": 268435456}
    (tmp_path / "push.json").write_text(json.dumps(cfg))

    async def push():
        async with ImageOpener(load_config(str(tmp_path / "push.json"))) as opener:
            await push_image(opener, local, parse_reference(ref))

    trio.run(push)
    layer = parse_manifest(OciLayout(local.path).read_manifest("v1")[0]).layers[0].digest
    # the containerd API stubs, compiled here once (minutes under TCG) into what becomes the unit's cache
    os.environ.setdefault("LAZYFS_PROTO_CACHE", str(tmp_path / "protos"))
    api.load()
    files = _tree(os.path.join(api._cache_root()), PROTO_CACHE)
    files.update(_tree(str(registry.root), "/srv/registry-storage"))
    files["/srv/registry.json"] = json.dumps({
        "version": "0.1", "storage": {"filesystem": {"rootdirectory": "/srv/registry-storage"}},
        "http": {"addr": f"127.0.0.1:{registry.port}"}}).encode()
    files["/etc/lazyfs/config.json"] = json.dumps(cfg).encode()
    files["/srv/client.py"] = CLIENT.encode()
    units = {}
    for name in ("lazyfs.service", "lazyfs-snapshotter.service"):
        with open(os.path.join(CONTRIB, name)) as f:
            text = f.read()
        units[name] = (text.replace("/usr/local/bin/lazyfs", os.path.join(venv, "lazyfs"))
                       .replace("Restart=on-failure", "Restart=no").replace("Restart=always", "Restart=no"))
    assert "LAZYFS_MOUNT_NAMESPACE" in units["lazyfs-snapshotter.service"]
    target = "sha256:" + "c" * 64
    script = SCRIPT.format(cache=PROTO_CACHE, python=shlex.quote(os.path.join(venv, "python")),
                           ref=shlex.quote(ref), layer=shlex.quote(layer), target=target)
    result = run_systemd_guest(script, units, files, guest=guest, timeout=300)
    print(result.output)
    print(f"guest run: {result.seconds:.0f} s")
    assert result.returncode == 0, result.console[-6000:]
    got = _results(result.output)
    expected = {
        "ProtectSystem": "strict", "PrivateTmp": "yes", "NoNewPrivileges": "yes", "own_namespace": "yes",
        "prepare": "ALREADY_EXISTS", "lower_in_host": "ext4", "read": "hello from the lazy layer",
        "lower_after_remove": "gone",
    }
    assert {k: got.get(k, "").split(" ")[0] if k == "prepare" else got.get(k) for k in expected} == expected, \
        result.output
    assert got["view"].startswith("bind:")
    assert "cap_sys_chroot" in got["caps"].split() and "cap_sys_ptrace" not in got["caps"].split()
