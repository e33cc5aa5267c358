"""contrib/containerd/lazyfs.service and lazyfs-snapshotter.service, hardened, under a real systemd
(PID 1 of a qemu guest).

The guest runs the host's own systemd, Python and this worktree's lazyfs (tests/support/
systemd_guest.py). The unit files are the ones in contrib/, with /usr/local/bin/lazyfs replaced by
this worktree's venv and no restarts. A root shell outside the services then does what a user does:
``lazyfs mount --writable`` a local OCI layout, reads and writes, unmounts; and it
checks that the sandbox is real (systemctl's view, a separate mount namespace, a private /tmp,
a read-only /usr) while the daemon still writes its run dir, cache root and writable root.

Then the snapshotter unit starts, with no containerd: the shell plays containerd with a small
gRPC client (``SNAPSHOTTER_CLIENT``) on the snapshotter's socket. It prepares a lazyfs layer with
the labels CRI sends (the image is in a docker-registry inside the guest, its storage filled on
the host), takes a view of it and mounts what the view returns, as containerd would: a bind of the
layer's ext4, which the sandboxed snapshotter mounted from a switchable device-mapper device over
a loop device (the daemon's unit loads dm_mod; docs/warm.md §3). Reading the image's file through
it shows the snapshotter's losetup, dmsetup and mounts land in the host's namespace; removing the
snapshots unmounts the layer there again and leaves no device-mapper or loop device.

About 60-80 s under TCG on a loaded 2-core host (boot to the script: ~11 s; each Python start ~10 s).

Break-tests (done once each, see the reports of the changes that added them): with
``Environment=LAZYFS_MOUNT_NAMESPACE=`` removed from lazyfs.service, the daemon's FUSE export lives
only in the service's namespace and ``lazyfs mount`` fails in losetup ("No such file or
directory"); removed from lazyfs-snapshotter.service instead, the snapshotter mounts the layer's ext4 in its
own namespace: the View returns a bind of a directory the host sees nothing mounted on
(``sn_lower_in_host`` empty, no ``sn_read``). (When the snapshotter starts together with the daemon,
its losetup fails outright: the export is not in its namespace.) Either way this test goes red.
"""

import json
import os
import re
import shlex

import pytest
import trio

from lazyfs.config import load_config
from lazyfs.errors import ConfigError
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
from tests.support.systemd_guest import SYSTEMD_GUEST_MODULES, hidden_host_dirs, run_systemd_guest

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.registry, pytest.mark.timeout(480)]
registry = registry_fixture()

CONTRIB = os.path.join(ROOT, "contrib", "containerd")
PROTO_CACHE = "/var/cache/lazyfs/containerd-api"  # the snapshotter unit's CacheDirectory=

# containerd's side of the snapshotter, run in the guest's root shell (the host's namespace): the
# calls CRI makes for a lazy layer (Prepare with its labels: ALREADY_EXISTS, a remote snapshot),
# a View of it, and the mount of what the View returns.
SNAPSHOTTER_CLIENT = r'''
import subprocess, sys
import grpc
from lazyfs.serve.snapshotter import api

def say(k, v):
    print(f"RESULT sn_{k}={v}", flush=True)

ref, layer = sys.argv[1:3]
target = "sha256:" + "c" * 64
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
    say("prepare", exc.code().name)
try:
    mounts = stub.View(pb.snapshots.ViewSnapshotRequest(key="view", parent=target), metadata=md, timeout=120).mounts
except grpc.RpcError as exc:
    say("view", exc.code().name + " " + (exc.details() or "").replace("\\n", " ")[:300])
    sys.exit(0)
say("view", " ".join(f"{m.type}:{m.source}" for m in mounts))
lower = mounts[0].source
say("lower_in_host", subprocess.run(["findmnt", "-n", "-o", "FSTYPE", lower], capture_output=True,
                                    text=True).stdout.strip())
# the layer's ext4 is on a switchable device-mapper device (the unit loads dm_mod): the daemon can
# move it onto the image's hydrated file while containers run (docs/warm.md §3)
say("lower_source", subprocess.run(["findmnt", "-n", "-o", "SOURCE", lower], capture_output=True,
                                   text=True).stdout.strip())
for m in mounts:
    subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, "/mnt/view"], check=True)
say("read", open("/mnt/view/hello").read().strip())
# local readahead (docs/warm.md §4): the sandboxed daemon opened the layer's exported file itself
# (its own mount namespace sees the export the host's namespace holds)
import time
from lazyfs.serve.control import call
for _ in range(150):
    files = call("/run/lazyfs/lazyfs.sock", "fuse-stats", timeout=30)["local_readahead"].get("files")
    if files:
        break
    time.sleep(0.2)
say("hint_files", files)
subprocess.run(["umount", "/mnt/view"], check=True)
stub.Remove(pb.snapshots.RemoveSnapshotRequest(key="view"), metadata=md, timeout=120)
stub.Remove(pb.snapshots.RemoveSnapshotRequest(key=target), metadata=md, timeout=120)
gone = subprocess.run(["findmnt", lower], capture_output=True).returncode != 0
say("lower_after_remove", "gone" if gone else "mounted")
say("dm_after_remove", subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout.count("lazyfs-"))
say("loops_after_remove", len(subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()))
'''

SCRIPT = r"""
L={lazyfs}
say() {{ echo "RESULT $*"; }}
mkdir -p /etc/lazyfs /srv /mnt/rw
# /etc/lazyfs/config.json comes with the initrd (the guest's disk is a 2 GiB tmpfs: the chunk
# cache's and the flat cache's reserves stay below it; the registry runs in the guest, its storage filled on the host)
/usr/bin/docker-registry serve /srv/registry.json >/srv/registry.log 2>&1 &
systemctl start lazyfs.service || {{ systemctl status lazyfs --no-pager; journalctl -u lazyfs --no-pager; exit 1; }}
i=0; while [ ! -S /run/lazyfs/lazyfs.sock ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
PID=$(systemctl show -p MainPID --value lazyfs)
say pid=$PID
for p in ProtectSystem PrivateTmp NoNewPrivileges; do say $p=$(systemctl show -p $p --value lazyfs); done
say caps="$(systemctl show -p CapabilityBoundingSet --value lazyfs)"
say own_namespace=$([ "$(readlink /proc/$PID/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] && echo yes || echo no)
say export_in_host=$(findmnt -n -o FSTYPE /run/lazyfs/export)
# one writable mount (a Python start costs ~10 s under TCG): reads, chunks in the cache root,
# writes in the writable root
$L mount oci:/srv/image:v1 /mnt/rw --writable && say rw_mount=ok
say rw_read="$(cat /mnt/rw/hello)"
echo "written in the guest" > /mnt/rw/new && sync && say rw_write="$(cat /mnt/rw/new)"
say cache_files=$(find /var/lib/lazyfs/cache -type f | wc -l)
say writable_files=$(find /var/lib/lazyfs/writable -type f | wc -l)
say run_dir="$(stat -c %a /run/lazyfs) $(ls /run/lazyfs | tr '\n' ' ')"
touch /tmp/host-marker
say daemon_tmp="$(nsenter -t $PID -m sh -c 'ls -A /tmp | tr "\n" " "; touch /tmp/daemon-marker && echo writable')"
say host_tmp_has_daemon_marker=$([ -e /tmp/daemon-marker ] && echo yes || echo no)
say daemon_usr="$(nsenter -t $PID -m sh -c 'touch /usr/lazyfs-probe 2>&1 || true' | grep -o 'Read-only file system')"
$L umount /mnt/rw && say rw_umount=ok
say rw_still_mounted=$(findmnt -n /mnt/rw >/dev/null && echo yes || echo no)
# the snapshotter unit: containerd's side played by a gRPC client in this shell (SNAPSHOTTER_CLIENT)
systemctl start lazyfs-snapshotter.service || {{ systemctl status lazyfs-snapshotter --no-pager; journalctl -u lazyfs-snapshotter --no-pager; }}
i=0; while [ ! -S /run/lazyfs/snapshotter.sock ] && [ $i -lt 900 ]; do sleep 0.2; i=$((i+1)); done
SPID=$(systemctl show -p MainPID --value lazyfs-snapshotter)
for p in ProtectSystem PrivateTmp NoNewPrivileges; do say sn_$p=$(systemctl show -p $p --value lazyfs-snapshotter); done
say sn_caps="$(systemctl show -p CapabilityBoundingSet --value lazyfs-snapshotter)"
say sn_own_namespace=$([ -n "$SPID" ] && [ "$(readlink /proc/$SPID/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] && echo yes || echo no)
mkdir -p /mnt/view
LAZYFS_PROTO_CACHE={proto_cache} {python} /srv/client.py {ref} {layer}
systemctl stop lazyfs-snapshotter.service && say sn_stopped=ok
journalctl -u lazyfs-snapshotter --no-pager -o cat | grep -E 'WARNING|ERROR|Traceback' | head -5
systemctl stop lazyfs.service && say stopped=ok
say export_after_stop=$(findmnt -n /run/lazyfs/export >/dev/null && echo yes || echo no)
journalctl -u lazyfs --no-pager -o cat | grep -E 'WARNING|ERROR|Traceback' | head -5
exit 0
"""


def _results(output: str) -> dict[str, str]:
    # anywhere in a line: systemd's status output on the same console may precede it
    return dict(m.groups() for m in re.finditer(r"RESULT (\w+)=(.*)$", output, re.M))


def _tree(path: str, guest_path: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.join(guest_path, os.path.relpath(full, path))] = f.read()
    return out


def _unit(name: str, venv: str) -> str:
    """A contrib unit with this worktree's lazyfs instead of /usr/local/bin/lazyfs, and no restarts
    (a failure shows at once)."""
    with open(os.path.join(CONTRIB, name)) as f:
        text = f.read()
    text = (text.replace("/usr/local/bin/lazyfs", os.path.join(venv, "lazyfs"))
            .replace("Restart=on-failure", "Restart=no").replace("Restart=always", "Restart=no"))
    hidden = hidden_host_dirs()
    if hidden:
        # a checkout under /tmp (a CI clone) would vanish behind the unit's PrivateTmp: bind it back
        # in read-only (systemd mounts the private /tmp first, then binds below it)
        text = text.replace("[Service]\n", "[Service]\nBindReadOnlyPaths=" + " ".join(hidden) + "\n", 1)
    return text


def _guest_and_venv() -> tuple:
    """The systemd guest's kernel and modules, and this checkout's venv bin dir (the units run
    its lazyfs); skips without either."""
    guest = require_qemu(SYSTEMD_GUEST_MODULES)
    venv = os.path.join(ROOT, ".venv", "bin")
    if not os.access(os.path.join(venv, "lazyfs"), os.X_OK):
        pytest.skip(f"{os.path.join(venv, 'lazyfs')} is missing (run scripts/setup.sh)")
    return guest, venv


def _push_for_guest(tmp_path, registry, layout: LocalRef, ref: str, cfg: dict) -> dict[str, bytes]:
    """Push *layout* to *ref* in the host's *registry* and return the guest's files for it: the
    registry's storage and config under /srv (the guest's docker-registry serves them on the same
    port), and *cfg* as /etc/lazyfs/config.json."""
    (tmp_path / "push.json").write_text(json.dumps(cfg))

    async def push():
        async with ImageOpener(load_config(str(tmp_path / "push.json"))) as opener:
            await push_image(opener, layout, parse_reference(ref))

    trio.run(push)
    files = _tree(str(registry.root), "/srv/registry-storage")
    files["/srv/registry.json"] = json.dumps({
        "version": "0.1", "storage": {"filesystem": {"rootdirectory": "/srv/registry-storage"}},
        "http": {"addr": f"127.0.0.1:{registry.port}"}}).encode()
    files["/etc/lazyfs/config.json"] = json.dumps(cfg).encode()
    return files


def test_hardened_units_serve_lazyfs_mount_and_the_snapshotter(tmp_path, registry):
    guest, venv = _guest_and_venv()
    venv_lazyfs = os.path.join(venv, "lazyfs")
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello from the image\n")
    layout = LocalRef(str(tmp_path / "layout"), "v1")
    trio.run(lambda: create_image(layout, from_dir=str(src)))
    # the same image in the host's registry, for the snapshotter; its storage goes into the guest's
    ref = f"{registry.registry}/guest/hello:v1"
    cfg = {"registries": [{"host": registry.registry, "plain_http": True}], "trace_record_seconds": 0,
           "cache_size": 268435456, "flat_cache_size": 268435456}
    files = _push_for_guest(tmp_path, registry, layout, ref, cfg)
    layer = parse_manifest(OciLayout(layout.path).read_manifest("v1")[0]).layers[0].digest
    # the containerd API stubs, compiled here (minutes under TCG), shipped into the unit's cache dir
    try:
        stubs = api.load().snapshots.__file__
    except ConfigError as exc:
        pytest.skip(str(exc))
    key_dir = stubs[:stubs.index(f"/{api.PACKAGE}/")]  # <cache root>/<key of the inputs>
    files.update(_tree(key_dir, f"{PROTO_CACHE}/{os.path.basename(key_dir)}"))
    files["/srv/client.py"] = SNAPSHOTTER_CLIENT.encode()
    # The image goes in with the initrd, to /srv (not /tmp: the guest's boot empties /tmp, and the
    # daemon's /tmp is its own anyway).
    files.update(_tree(layout.path, "/srv/image"))
    units = {name: _unit(name, venv) for name in ("lazyfs.service", "lazyfs-snapshotter.service")}
    assert venv_lazyfs + " daemon" in units["lazyfs.service"]
    script = SCRIPT.format(lazyfs=shlex.quote(venv_lazyfs), proto_cache=PROTO_CACHE,
                           python=shlex.quote(os.path.join(venv, "python")), ref=shlex.quote(ref),
                           layer=shlex.quote(layer))
    result = run_systemd_guest(script, units, files, guest=guest, timeout=360)
    assert result.returncode == 0, result.console[-6000:]
    got = _results(result.output)
    print(result.output)
    print(f"guest run: {result.seconds:.0f} s")
    expected = {
        "ProtectSystem": "strict", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "own_namespace": "yes", "export_in_host": "fuse.lazyfs",
        "rw_mount": "ok", "rw_read": "hello from the image", "rw_write": "written in the guest",
        "host_tmp_has_daemon_marker": "no", "daemon_usr": "Read-only file system",
        "rw_umount": "ok", "rw_still_mounted": "no",
        "sn_ProtectSystem": "strict", "sn_PrivateTmp": "yes", "sn_NoNewPrivileges": "yes",
        "sn_own_namespace": "yes", "sn_prepare": "ALREADY_EXISTS", "sn_lower_in_host": "ext4",
        "sn_read": "hello from the image", "sn_hint_files": "1", "sn_lower_after_remove": "gone", "sn_stopped": "ok",
        "sn_dm_after_remove": "0", "sn_loops_after_remove": "0",
        "stopped": "ok", "export_after_stop": "no",
    }
    assert {k: got.get(k) for k in expected} == expected, result.output
    assert set(got["caps"].split()) == {"cap_sys_admin", "cap_sys_chroot", "cap_dac_override", "cap_dac_read_search",
                                        "cap_fowner", "cap_chown"}
    assert set(got["sn_caps"].split()) == {"cap_sys_admin", "cap_sys_chroot", "cap_chown", "cap_fowner",
                                           "cap_fsetid", "cap_dac_override", "cap_dac_read_search", "cap_mknod",
                                           "cap_setfcap"}
    assert got["sn_view"].startswith("bind:/var/lib/lazyfs/snapshotter/")
    assert re.fullmatch(r"/dev/mapper/lazyfs-[0-9a-f]{16}", got["sn_lower_source"]), got["sn_lower_source"]
    assert int(got["cache_files"]) > 0  # chunks cached under the cache root
    assert int(got["writable_files"]) > 0  # the writable layer under the writable root
    mode, _, files_in_run = got["run_dir"].partition(" ")
    assert mode == "700" and "lazyfs.sock" in files_in_run and "export" in files_in_run
    assert "host-marker" not in got["daemon_tmp"] and got["daemon_tmp"].endswith("writable")
