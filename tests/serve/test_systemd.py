"""contrib/containerd/lazyfs.service, hardened, under a real systemd (PID 1 of a qemu guest).

The guest runs the host's own systemd, Python and this worktree's lazyfs (tests/support/
systemd_guest.py). The unit file is the one in contrib/, with /usr/local/bin/lazyfs replaced by this
worktree's venv and no restarts. A root shell outside the service then does what a user does:
``lazyfs mount --writable`` a local OCI layout, reads and writes, unmounts; and it
checks that the sandbox is real (systemctl's view, a separate mount namespace, a private /tmp,
a read-only /usr) while the daemon still writes its run dir, cache root and writable root.

About 80 s under TCG on a 2-core host (boot to the script: ~11 s; each Python start ~10 s).

Break-test (done once, see the report of the change that added this file): with
``Environment=LAZYFS_MOUNT_NAMESPACE=`` removed from the unit, the daemon's FUSE export lives
only in the service's namespace and ``lazyfs mount`` fails in losetup ("No such file or
directory"): this test goes red.
"""

import os
import re
import shlex

import pytest
import trio

from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from tests.serve.conftest import ROOT
from tests.support.guest import require_qemu
from tests.support.systemd_guest import SYSTEMD_GUEST_MODULES, run_systemd_guest

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(420)]

UNIT = os.path.join(ROOT, "contrib", "containerd", "lazyfs.service")

SCRIPT = r"""
L={lazyfs}
say() {{ echo "RESULT $*"; }}
mkdir -p /etc/lazyfs /srv /mnt/rw
# the guest's disk is a 2 GiB tmpfs: keep the chunk cache's reserve below it
echo '{{"trace_record_seconds": 0, "cache_size": 268435456, "flat_cache_size": 268435456}}' > /etc/lazyfs/config.json
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
systemctl stop lazyfs.service && say stopped=ok
say export_after_stop=$(findmnt -n /run/lazyfs/export >/dev/null && echo yes || echo no)
journalctl -u lazyfs --no-pager -o cat | grep -E 'WARNING|ERROR|Traceback' | head -5
exit 0
"""


def _results(output: str) -> dict[str, str]:
    # anywhere in a line: systemd's status output on the same console may precede it
    return dict(m.groups() for m in re.finditer(r"RESULT (\w+)=(.*)$", output, re.M))


def test_hardened_daemon_unit_serves_lazyfs_mount(tmp_path):
    guest = require_qemu(SYSTEMD_GUEST_MODULES)
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello from the image\n")
    layout = LocalRef(str(tmp_path / "layout"), "v1")
    trio.run(lambda: create_image(layout, from_dir=str(src)))
    venv_lazyfs = os.path.join(ROOT, ".venv", "bin", "lazyfs")
    if not os.access(venv_lazyfs, os.X_OK):
        pytest.skip(f"{venv_lazyfs} is missing (run scripts/setup.sh)")
    with open(UNIT) as f:
        unit = f.read()
    # this worktree's lazyfs instead of /usr/local/bin/lazyfs, and no restarts (a failure shows at once)
    unit = unit.replace("/usr/local/bin/lazyfs", venv_lazyfs).replace("Restart=on-failure", "Restart=no")
    assert venv_lazyfs + " daemon" in unit
    script = SCRIPT.format(lazyfs=shlex.quote(venv_lazyfs))
    # The image goes in with the initrd, to /srv (not /tmp: the guest's boot empties /tmp, and the
    # daemon's /tmp is its own anyway).
    image = {}
    for dirpath, _, names in os.walk(layout.path):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                image["/srv/image/" + os.path.relpath(path, layout.path)] = f.read()
    result = run_systemd_guest(script, {"lazyfs.service": unit}, image,
                               guest=guest, timeout=300)
    assert result.returncode == 0, result.console[-6000:]
    got = _results(result.output)
    print(result.output)
    print(f"guest run: {result.seconds:.0f} s")
    expected = {
        "ProtectSystem": "strict", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "own_namespace": "yes", "export_in_host": "fuse.lazyfs",
        "rw_mount": "ok", "rw_read": "hello from the image", "rw_write": "written in the guest",
        "host_tmp_has_daemon_marker": "no", "daemon_usr": "Read-only file system",
        "rw_umount": "ok", "rw_still_mounted": "no", "stopped": "ok", "export_after_stop": "no",
    }
    assert {k: got.get(k) for k in expected} == expected, result.output
    assert set(got["caps"].split()) == {"cap_sys_admin", "cap_sys_chroot", "cap_dac_override", "cap_dac_read_search",
                                        "cap_fowner", "cap_chown"}
    assert int(got["cache_files"]) > 0  # chunks cached under the cache root
    assert int(got["writable_files"]) > 0  # the writable layer under the writable root
    mode, _, files = got["run_dir"].partition(" ")
    assert mode == "700" and "lazyfs.sock" in files and "export" in files
    assert "host-marker" not in got["daemon_tmp"] and got["daemon_tmp"].endswith("writable")
