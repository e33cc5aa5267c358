"""Running containers keep working across ``systemctl restart lazyfs`` (issue 13), under a real
systemd (PID 1 of a qemu guest, tests/support/systemd_guest.py) with the unit
contrib/containerd/lazyfs.service (this worktree's venv, no Restart=, as in test_systemd.py).

A root shell outside the service ``lazyfs mount``s an image from a registry in the guest and
starts a reader (tests/support/reader.py) that checksums every file of the mounted ext4 pass after
pass, dropping the page cache each time, so every pass reads through the loop device and the
daemon's FUSE export. While it runs, ``systemctl restart lazyfs`` twice: systemd kills the whole
control group (the keeper too), the FUSE connection lives on in the service's fd store, and the
next daemon takes it over. The test wants zero read errors, every checksum matching, at least one
reader pass overlapping each restart, the fd store holding 2 fds (the host's mount namespace and
the FUSE connection: no copies piled up), ``lazyfs umount`` succeeding and no ext4 of a loop
device left in /proc/fs/ext4. It prints the reader's longest stall per restart (the longest read
overlapping the ``systemctl restart``).

``LAZYFS_SYSTEMD_RESTARTS=N`` restarts N times instead of 2 (a benchmark run: BENCHMARKS.md).

About 2.5-4 min under TCG on a loaded 2-core host.

Break-test (2026-12-06, run once): with ``mount --make-rshared /newroot`` removed from the
systemd guest's init, the guest's ``/`` stays private (busybox ``switch_root``), each restarted
daemon's namespace holds a private copy of the image's ext4, and the test goes red: the reader
still passes (0 errors), but the daemon logs ``the copy of /mnt/img in the daemon's mount namespace
is no slave of the host's mount: the host's / must be a shared mount ...`` at both restarts
(``not_slave`` 2 instead of 0), and although it detached its copy both times, ``lazyfs umount``
fails with ``export '...' is still open 1 time(s); detach it first``, leaving ``loop0`` in
/proc/fs/ext4 and the loop device on ``disk.img``. And with the ``FDSTOREREMOVE=1`` of
``keeper.sd_store_fd`` removed (run once), each start's ``lazyfs store-mount-namespace`` adds a
namespace fd: ``NFileDescriptorStore`` is 3 after the first restart and 4 after the second, and the
test goes red on those counts (the reader and the umount still fine).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex

import pytest
import trio

from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from tests.serve.test_live_restart import READER, checksums
from tests.serve.test_systemd import _guest_and_venv, _push_for_guest, _results, _unit
from tests.support.registry import registry_fixture
from tests.support.systemd_guest import run_systemd_guest

RESTARTS = int(os.environ.get("LAZYFS_SYSTEMD_RESTARTS") or 2)

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.registry, pytest.mark.timeout(360 + 120 * RESTARTS)]
registry = registry_fixture()

SCRIPT = r"""
L={lazyfs}
PY={python}
say() {{ echo "RESULT $*"; }}
now() {{ cut -d' ' -f1 /proc/uptime; }}  # CLOCK_BOOTTIME: the reader's CLOCK_MONOTONIC (no suspend here)
passes() {{ sed -n 's/.*"passes": \([0-9]*\).*/\1/p' /srv/progress.json 2>/dev/null; }}
# wait until the reader has done pass $1 (0.5 s steps, at most $2 of them); "timeout" if not
wait_passes() {{ i=0; while :; do c=$(passes); [ "${{c:-0}}" -ge "$1" ] && {{ echo ok; return 0; }}
    [ $i -ge $2 ] && {{ echo timeout; return 1; }}; sleep 0.5; i=$((i+1)); done; }}
say root_propagation=$(findmnt -n -o PROPAGATION /)
mkdir -p /etc/lazyfs /mnt/img
/usr/bin/docker-registry serve /srv/registry.json >/srv/registry.log 2>&1 &
systemctl start lazyfs.service || {{ systemctl status lazyfs --no-pager; journalctl -u lazyfs --no-pager; exit 1; }}
i=0; while [ ! -S /run/lazyfs/lazyfs.sock ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
$L mount {ref} /mnt/img && say mount=ok || {{ journalctl -u lazyfs --no-pager | tail -30; exit 1; }}
$PY {reader} /mnt/img /srv/expected.json /srv/progress.json /srv/stop --log /srv/reads.log 2>/srv/reader.err &
READER_PID=$!
say first_pass=$(wait_passes 1 600)
windows=""
n=1
while [ $n -le {restarts} ]; do
    t0=$(now)
    systemctl restart lazyfs || say restart_$n=failed
    t1=$(now)
    p=$(passes)
    windows="$windows $t0 $t1"
    say restart_${{n}}_seconds=$(echo "$t0 $t1" | awk '{{printf "%.2f", $2 - $1}}')
    say restart_${{n}}_fdstore=$(systemctl show -p NFileDescriptorStore --value lazyfs)
    # two more passes: the one the restart stalled, and one wholly after it (and so after the
    # new daemon is serving: a restart before it would kill a daemon still starting)
    say passes_after_$n=$(wait_passes $((p + 2)) 600)
    n=$((n+1))
done
touch /srv/stop
wait $READER_PID
say reader_rc=$?
say reader_err="$(head -c 300 /srv/reader.err | tr '\n' ' ')"
say passes=$(passes)
say fdstore=$(systemctl show -p NFileDescriptorStore --value lazyfs)
say taken_over=$(journalctl -u lazyfs -o cat --no-pager | grep -c 'taking over the FUSE connection .* from the systemd fd store')
say copies_detached=$(journalctl -u lazyfs -o cat --no-pager | grep -c 'detached the copy of')
say not_slave=$(journalctl -u lazyfs -o cat --no-pager | grep -c 'is no slave')
# the longest read overlapping each restart, and the passes overlapping it
awk -v n={files} -v w="$windows" '
BEGIN {{ k = split(w, t, " ") / 2 }}
{{ s = $1; e = $1 + $2; p = int((NR - 1) / n); if (!(p in ps)) ps[p] = s; pe[p] = e
   for (j = 1; j <= k; j++) if (s <= t[2*j] && e >= t[2*j-1] && $2 > stall[j]) stall[j] = $2 }}
END {{ for (j = 1; j <= k; j++) {{ c = 0; for (p in ps) if (ps[p] <= t[2*j] && pe[p] >= t[2*j-1]) c++
         printf "RESULT stall_%d=%.3f\nRESULT overlapping_passes_%d=%d\n", j, stall[j], j, c }} }}' /srv/reads.log
$L umount /mnt/img && say umount=ok || journalctl -u lazyfs --no-pager -o cat | tail -20
say ext4="$(ls /proc/fs/ext4 | tr '\n' ' ')"
say loops="$(losetup -a | tr '\n' ' ')"
journalctl -u lazyfs --no-pager -o cat | grep -E 'WARNING|ERROR|Traceback' | head -5
journalctl -u lazyfs --no-pager -o cat | grep -E 'taking over|took over|detached|handing over|stored|kept by|starting for'
systemctl stop lazyfs.service && say stopped=ok
exit 0
"""


def _source_tree(path) -> None:
    """Files to checksum: a few of 256 KiB (several chunks each) and small ones, one level down too."""
    rng = random.Random(13)
    (path / "sub").mkdir(parents=True)
    for i in range(4):
        (path / f"blob{i}").write_bytes(rng.randbytes(256 * 1024))
    (path / "sub" / "big").write_bytes(rng.randbytes(1024 * 1024))
    (path / "hello").write_text("hello from the image\n")
    (path / "sub" / "small").write_bytes(rng.randbytes(3000))


def reader_image(tmp_path, registry, repository: str) -> tuple[dict, str, LocalRef]:
    """`_source_tree` as an image: the checksums of its files, its reference in the host's
    *registry* (``guest/REPOSITORY:v1``, pushed by ``_push_for_guest``) and its local layout."""
    src = tmp_path / "src"
    _source_tree(src)
    layout = LocalRef(str(tmp_path / "layout"), "v1")
    trio.run(lambda: create_image(layout, from_dir=str(src)))
    return checksums(str(src)), f"{registry.registry}/guest/{repository}:v1", layout


def test_reader_keeps_reading_across_systemctl_restart(tmp_path, registry):
    guest, venv = _guest_and_venv()
    venv_lazyfs = os.path.join(venv, "lazyfs")
    expected, ref, layout = reader_image(tmp_path, registry, "restart")
    # read_only_loop = direct: the loop device reads disk.img with O_DIRECT, so every read of the
    # reader (which drops its files' pages each pass) reaches the daemon, none is served from the
    # page cache of disk.img (buffered, the default, every pass after the first would be)
    # hydrated_switch off: the image could become fully local meanwhile, and the daemon would move
    # the mount onto its hydrated file (the unit loads dm_mod), away from FUSE and the restarts
    cfg = {"registries": [{"host": registry.registry, "plain_http": True}], "trace_record_seconds": 0,
           "cache_size": 268435456, "flat_cache_size": 268435456, "read_only_loop": "direct",
           "hydrated_switch": "off"}
    files = _push_for_guest(tmp_path, registry, layout, ref, cfg)
    files["/srv/expected.json"] = json.dumps(expected).encode()
    units = {"lazyfs.service": _unit("lazyfs.service", venv)}
    script = SCRIPT.format(lazyfs=shlex.quote(venv_lazyfs), python=shlex.quote(os.path.join(venv, "python")),
                           ref=shlex.quote(ref), reader=shlex.quote(READER), restarts=RESTARTS,
                           files=len(expected))
    result = run_systemd_guest(script, units, files, guest=guest, timeout=240 + 90 * RESTARTS)
    print(result.output)
    print(f"guest run: {result.seconds:.0f} s")
    assert result.returncode == 0, result.console[-6000:]
    got = _results(result.output)
    stalls = [float(got.get(f"stall_{n}", "nan")) for n in range(1, RESTARTS + 1)]
    print("reader's longest stall per restart (s):", " ".join(f"{s:.2f}" for s in stalls))
    expected_results = {
        "root_propagation": "shared", "mount": "ok", "first_pass": "ok",
        "reader_rc": "0", "reader_err": "", "fdstore": "2", "taken_over": str(RESTARTS), "not_slave": "0",
        "umount": "ok", "stopped": "ok",
        **{f"restart_{n}_fdstore": "2" for n in range(1, RESTARTS + 1)},
        **{f"passes_after_{n}": "ok" for n in range(1, RESTARTS + 1)},
    }
    assert {k: got.get(k) for k in expected_results} == expected_results, result.output
    for n in range(1, RESTARTS + 1):
        assert f"restart_{n}" not in got  # "failed"
        assert int(got[f"overlapping_passes_{n}"]) >= 1, f"no reader pass overlapped restart {n}"
    assert int(got["passes"]) >= 2 * RESTARTS + 1
    # no ext4 of a loop device left: nothing pins the image after its umount
    assert not [d for d in got["ext4"].split() if re.fullmatch(r"loop\d+", d)], got["ext4"]
    assert got["loops"].strip() == ""
