"""A running mount moves onto its image's hydrated file under a reader, with no remount (issue 14),
on the real kernel's device-mapper: a qemu guest booted with Debian's kernel under the host's own
systemd (tests/support/systemd_guest.py), as in test_systemd_restart.py. This host's kernel has
no device-mapper; tests/serve/test_dmswitch.py drives the same steps against a model of it.

In the guest: the contrib unit runs the daemon (``read_only_loop = direct``, so every read of the
reader reaches the loop device below the ext4 and, before the switch, the daemon's FUSE export).
A root shell loads dm_mod, ``lazyfs mount --hydrate``s an image from a registry in the guest, and
starts the reader (tests/support/reader.py), which checksums every file pass after pass, dropping
its cached pages each time. The image downloads in the background; once it is fully local the
daemon writes its hydrated file and swaps the mount's device-mapper table onto a loop device over
that file. The test wants:

* the mount on ``/dev/mapper/lazyfs-…`` from the start, and the table moved to a loop device whose
  backing file is the hydrated file, the loop device over the FUSE file gone;
* zero read errors and every checksum matching, with reader passes before and after the switch;
* no FUSE READ reaching the daemon over the two reader passes after the switch (there were some
  over every pass before it);
* ``lazyfs umount`` removing the device-mapper device and leaving no loop device and no ext4.

The switch is asked for with the ``hydrate-file`` control request while the reader runs (the
daemon's own check, every ``hydrated_check_interval``, calls the same code; a first version of this
test saw that check switch the mount two seconds after the image became local, before the reader
started). It prints the reader's longest single read around the switch. About 3-4 min under TCG.

Break-tests (2026-12-07, once each): with the ``losetup -d`` of both loop devices taken out of
dmswitch.py, the loop device over ``disk.img`` stays attached after the switch (``loops_on_export``
1) and after the unmount, and the test goes red. With the daemon writing other bytes over the
hydrated file (from 1 MiB on) just before it attaches it, the reader stops at
``checksum mismatch on sub/small in pass 32`` (exit 8) and the test goes red.
"""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest

from tests.serve.test_live_restart import READER
from tests.serve.test_systemd import _guest_and_venv, _push_for_guest, _results, _unit
from tests.serve.test_systemd_restart import reader_image
from tests.support.registry import registry_fixture
from tests.support.systemd_guest import run_systemd_guest

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.registry, pytest.mark.timeout(600)]
registry = registry_fixture()

# asks the daemon to hydrate and switch NAME (hydrate-file) until it has, at most TRIES times, 1 s apart
SWITCH = r"""
import sys, time
from lazyfs.serve.control import call
name, tries = sys.argv[1], int(sys.argv[2])
for _ in range(tries):
    answer = call("/run/lazyfs/lazyfs.sock", "hydrate-file", name=name, timeout=120)
    if answer.get("switched"):
        break
    time.sleep(1)
print("RESULT switch_answer=" + " ".join(f"{k}:{answer.get(k)}" for k in ("missing_chunks", "passthrough", "switched")))
"""

SCRIPT = r"""
L={lazyfs}
PY={python}
say() {{ echo "RESULT $*"; }}
now() {{ cut -d' ' -f1 /proc/uptime; }}  # the reader's CLOCK_MONOTONIC (no suspend here)
passes() {{ sed -n 's/.*"passes": \([0-9]*\).*/\1/p' /srv/progress.json 2>/dev/null; }}
# wait until the reader has done pass $1 (0.5 s steps, at most $2 of them); "timeout" if not, and
# "reader_exited" at once if the reader stopped (a read error or a wrong checksum)
wait_passes() {{ i=0; while :; do c=$(passes); [ "${{c:-0}}" -ge "$1" ] && {{ echo ok; return 0; }}
    kill -0 $READER_PID 2>/dev/null || {{ echo reader_exited; return 1; }}
    [ $i -ge $2 ] && {{ echo timeout; return 1; }}; sleep 0.5; i=$((i+1)); done; }}
fuse_reads() {{ $PY -c 'from lazyfs.serve.control import call
print(call("/run/lazyfs/lazyfs.sock", "fuse-stats")["reads"])'; }}
mkdir -p /etc/lazyfs /mnt/img
/usr/bin/docker-registry serve /srv/registry.json >/srv/registry.log 2>&1 &
systemctl start lazyfs.service || {{ systemctl status lazyfs --no-pager; journalctl -u lazyfs --no-pager; exit 1; }}
i=0; while [ ! -S /run/lazyfs/lazyfs.sock ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
say dm_control=$(test -c /dev/mapper/control && echo ok)  # the unit loads dm_mod
$L mount --json --hydrate {ref} /mnt/img >/srv/mount.json && say mount=ok || {{ journalctl -u lazyfs --no-pager | tail -30; exit 1; }}
DM=$(sed -n 's/.*"dm": "\/dev\/mapper\/\([^"]*\)".*/\1/p' /srv/mount.json)
NAME=$(sed -n 's/.*"name": "\([^"]*\)".*/\1/p' /srv/mount.json)
say source_is_dm=$([ "$(findmnt -n -o SOURCE /mnt/img)" = "/dev/mapper/$DM" ] && echo yes)
first=$(dmsetup table "$DM")
say table_before_is_linear=$(echo "$first" | grep -c ' linear ')
$PY {reader} /mnt/img /srv/expected.json /srv/progress.json /srv/stop --log /srv/reads.log 2>/srv/reader.err &
READER_PID=$!
say first_pass=$(wait_passes 1 600)
r_first=$(fuse_reads)
say second_pass=$(wait_passes 2 600)
say fuse_reads_over_a_pass=$(( $(fuse_reads) - r_first ))
# the switch, asked for now (the daemon's own check would do it within hydrated_check_interval)
t_prev=$(now)
$PY /srv/switch.py "$NAME" 120
t_seen=$(now)
say switched=$([ "$(dmsetup table "$DM")" != "$first" ] && echo yes)
say passes_at_switch=$(passes)
p=$(passes)
# one whole pass after the switch, then two more: none of their reads may reach FUSE
say pass_after=$(wait_passes $((p + 2)) 600)
r0=$(fuse_reads); p=$(passes)
say two_more=$(wait_passes $((p + 2)) 600)
r1=$(fuse_reads)
say fuse_reads_after_switch=$((r1 - r0))
mm=$(dmsetup table "$DM" | cut -d' ' -f4)
for l in /sys/block/loop*; do [ "$(cat $l/dev 2>/dev/null)" = "$mm" ] && back=$(cat $l/loop/backing_file); done
say backing_is_hydrated=$(case "$back" in */hydrated/*.img) echo yes;; esac)
say loops_on_export=$(losetup -a | grep -c 'disk.img')
touch /srv/stop
wait $READER_PID
say reader_rc=$?
say reader_err="$(head -c 300 /srv/reader.err | tr '\n' ' ')"
say passes=$(passes)
awk -v s="$t_prev" -v e="$t_seen" '{{ if ($1 <= e && $1 + $2 >= s && $2 > m) m = $2 }} END {{ printf "RESULT stall=%.3f\n", m }}' /srv/reads.log
journalctl -u lazyfs --no-pager -o cat | grep -E 'audit: moved|WARNING|ERROR|Traceback' | head -5
$L umount /mnt/img && say umount=ok || journalctl -u lazyfs --no-pager -o cat | tail -20
say dm_left="$(dmsetup ls --noheadings 2>&1 | grep -c lazyfs-)"
say ext4="$(ls /proc/fs/ext4 | tr '\n' ' ')"
say loops="$(losetup -a | tr '\n' ' ')"
systemctl stop lazyfs.service && say stopped=ok
exit 0
"""


def test_a_running_mount_moves_onto_the_hydrated_file_under_a_reader(tmp_path, registry):
    guest, venv = _guest_and_venv()
    expected, ref, layout = reader_image(tmp_path, registry, "switch")
    cfg = {"registries": [{"host": registry.registry, "plain_http": True}], "trace_record_seconds": 0,
           "read_only_loop": "direct", "hydrated_check_interval": 3600}
    files = _push_for_guest(tmp_path, registry, layout, ref, cfg)
    files["/srv/expected.json"] = json.dumps(expected).encode()
    files["/srv/switch.py"] = SWITCH.encode()
    units = {"lazyfs.service": _unit("lazyfs.service", venv)}
    script = SCRIPT.format(lazyfs=shlex.quote(os.path.join(venv, "lazyfs")),
                           python=shlex.quote(os.path.join(venv, "python")), ref=shlex.quote(ref),
                           reader=shlex.quote(READER))
    result = run_systemd_guest(script, units, files, guest=guest, timeout=540)
    print(result.output)
    print(f"guest run: {result.seconds:.0f} s")
    assert result.returncode == 0, result.console[-6000:]
    got = _results(result.output)
    print("reader's longest read around the switch (s):", got.get("stall"))
    expected_results = {
        "dm_control": "ok", "mount": "ok", "source_is_dm": "yes", "table_before_is_linear": "1",
        "first_pass": "ok", "second_pass": "ok", "switched": "yes",
        "switch_answer": "missing_chunks:None passthrough:False switched:True", "pass_after": "ok", "two_more": "ok",
        "fuse_reads_after_switch": "0", "backing_is_hydrated": "yes", "loops_on_export": "0",
        "reader_rc": "0", "reader_err": "", "umount": "ok", "dm_left": "0", "stopped": "ok",
    }
    assert {k: got.get(k) for k in expected_results} == expected_results, result.output
    assert int(got["fuse_reads_over_a_pass"]) > 0  # a pass did go through FUSE before the switch
    assert int(got["passes"]) >= int(got["passes_at_switch"]) + 4
    assert not [d for d in got["ext4"].split() if re.fullmatch(r"(loop|dm-)\d+", d)], got["ext4"]
    assert got["loops"].strip() == ""
