"""Boot a qemu guest whose PID 1 is the host's own systemd, to test systemd units for real.

The guest's root file system is the host's ``/`` shared read-only over 9p (virtfs), with a
tmpfs overlay on top: the guest runs the host's systemd, Python and lazyfs (the worktree's
``.venv`` included), and everything it writes is thrown away with the guest. The guest's /tmp and
/var/tmp are empty tmpfs: put files for the guest elsewhere (*files* of :func:`run_systemd_guest`). The initrd's /init
(busybox) loads the modules, builds that overlay, copies the caller's files into it (units, a
script), makes it a shared mount (as systemd makes ``/`` on a host) and hands over to ``/lib/systemd/systemd`` with ``switch_root``.

The guest boots ``lazyfs-guest.target``, which starts ``lazyfs-guest.service``: it runs the
caller's script outside any service sandbox (like a root shell), frames the output with the
markers of :mod:`tests.support.guest` on the serial console and powers off. Nothing else of the
host's boot (its default target, fstab mounts, daemons) runs.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.support.guest import BEGIN_MARKER, END_MARKER, Guest, GuestResult, boot, build_initrd, prepare_guest

#: virtio + 9p for the host root, overlay over it. Everything else (fuse, loop, ext4) is loaded by
#: the guest's systemd/udev/modprobe from the host's /lib/modules, seen through the share.
SYSTEMD_GUEST_MODULES: tuple[str, ...] = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

SHARE_TAG = "hostroot"
SYSTEMD = "/lib/systemd/systemd"

_INIT = f"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
fail() {{ echo "lazyfs-init: $*"; echo {BEGIN_MARKER}; printf '\\n{END_MARKER} rc=99\\n'; poweroff -f; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/lib/modules/$m" || echo "lazyfs-init: insmod $m failed"; done < /lazyfs/modules
mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose {SHARE_TAG} /host || fail "9p mount"
mount -t tmpfs -o mode=0755,size=2g tmpfs /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "overlay"
# the host's /tmp and /var/tmp stay out: systemd-tmpfiles would empty them at boot, through 9p
# (a minute and more on a busy host)
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp
# ...except the checkout and its venv when they live there (a CI clone under /tmp): bound back in
while read -r d; do
    mkdir -p "/newroot$d" && mount -o bind "/host$d" "/newroot$d" || fail "bind $d"
done < /lazyfs/binds
cp -a /lazyfs/root/. /newroot/ || fail "copy files"
# systemd makes / shared (MS_SHARED|MS_REC) when it boots a host, but not here: behind
# switch_root it leaves the overlay private. Then the mount namespace a sandboxed service gets at
# each start holds private copies of the host's mounts that no unmount of the host reaches (a
# restarted lazyfs daemon's copy of an image's ext4 kept the loop device and the export open).
# Done here, before any unit starts, as on a real host.
mount --make-rshared /newroot || fail "make-rshared"
find /newroot/etc/systemd/system -type f -exec chmod 0644 {{}} +
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot {SYSTEMD} systemd.unit=lazyfs-guest.target
"""

_TARGET = """[Unit]
Description=lazyfs guest test
Requires=lazyfs-guest.service
After=lazyfs-guest.service
AllowIsolate=yes
"""

_SERVICE = """[Unit]
Description=lazyfs guest test script (a root shell outside any sandbox)
After=basic.target

[Service]
Type=oneshot
ExecStart=/bin/sh /lazyfs-guest/run
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate
"""

_RUN = f"""#!/bin/sh
exec >/dev/ttyS0 2>&1
echo {BEGIN_MARKER}
cd /
/bin/sh /lazyfs-guest/script
rc=$?
printf '\\n{END_MARKER} rc=%d\\n' "$rc"
sync
# SuccessAction= should do this, but under TCG it was seen not to: power off right away
systemctl poweroff --force --force || echo o > /proc/sysrq-trigger
exit 0
"""


def hidden_host_dirs() -> list[str]:
    """The checkout and the venv the guest must run, where they sit under /tmp or /var/tmp (which
    the guest replaces with empty tmpfs)."""
    repo = Path(__file__).resolve().parents[2]
    out = []
    for d in (os.fspath(repo), os.path.realpath(sys.prefix)):
        if d.startswith(("/tmp/", "/var/tmp/")) and not any(d == o or d.startswith(o + "/") for o in out):
            out.append(d)
    return out


def systemd_files(script: str, units: Mapping[str, str], files: Mapping[str, bytes] | None = None) -> dict[str, bytes]:
    """The initrd members that become the guest root's extra files (pure).

    *units*: unit file name (or ``NAME.d/FILE.conf`` drop-in) -> text, installed under
    /etc/systemd/system. *files*: more guest paths -> bytes.
    """
    out = {
        "/init": _INIT.encode(),
        "/lazyfs/binds": "".join(f"{d}\n" for d in hidden_host_dirs()).encode(),
        "/lazyfs/root/etc/systemd/system/lazyfs-guest.target": _TARGET.encode(),
        "/lazyfs/root/etc/systemd/system/lazyfs-guest.service": _SERVICE.encode(),
        "/lazyfs/root/lazyfs-guest/run": _RUN.encode(),
        "/lazyfs/root/lazyfs-guest/script": script.encode(),
    }
    for name, text in units.items():
        out[f"/lazyfs/root/etc/systemd/system/{name}"] = text.encode()
    for path, data in (files or {}).items():
        out[f"/lazyfs/root/{path.lstrip('/')}"] = data
    return out


def accelerator() -> str:
    """$LAZYFS_GUEST_ACCEL, else tcg: software emulation works everywhere (nested KVM often does
    not: on the CI host, qemu's ``-cpu max`` under KVM aborts setting an MSR)."""
    return os.environ.get("LAZYFS_GUEST_ACCEL") or "tcg"


def run_systemd_guest(
    script: str,
    units: Mapping[str, str],
    files: Mapping[str, bytes] | None = None,
    *,
    guest: Guest | None = None,
    timeout: float = 150.0,
    memory_mb: int = 1536,
    accel: str | None = None,
) -> GuestResult:
    """Boot the host's systemd in a guest with *units* installed and run *script* (/bin/sh) as root."""
    guest = guest or prepare_guest(SYSTEMD_GUEST_MODULES)
    initrd = build_initrd(
        modules=SYSTEMD_GUEST_MODULES, init_script="true\n", kernel=guest.kernel,
        files=systemd_files(script, units, files),
    )
    virtfs = f"local,path=/,mount_tag={SHARE_TAG},security_model=none,readonly=on,multidevs=remap"
    append = "systemd.show_status=0 loglevel=3 systemd.log_level=warning rw"
    return boot(
        guest.vmlinux, initrd, append=append, timeout=timeout, memory_mb=memory_mb,
        accel=accel or accelerator(), cpus=2, extra_args=["-virtfs", virtfs],
    )


def shell_quote(path: str | Path) -> str:
    return shlex.quote(os.fspath(path))


__all__ = ["SYSTEMD_GUEST_MODULES", "accelerator", "run_systemd_guest", "shell_quote", "systemd_files"]
