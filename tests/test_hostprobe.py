"""Host probes: the parsers on text, the probes on this host's real devices and file systems."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from lazyfs import hostprobe
from tests.conftest import require_root

CONFIG_SAMPLE = """\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_FUSE_FS=y
CONFIG_FUSE_PASSTHROUGH=y
CONFIG_TCM_USER2=m
# CONFIG_FS_VERITY is not set
CONFIG_LOCALVERSION="-lazyfs"
"""


def test_kernel_config_parser():
    config = hostprobe.parse_kernel_config(CONFIG_SAMPLE)
    assert config == {"CONFIG_FUSE_FS": "y", "CONFIG_FUSE_PASSTHROUGH": "y", "CONFIG_TCM_USER2": "m",
                      "CONFIG_FS_VERITY": "n", "CONFIG_LOCALVERSION": "-lazyfs"}


@pytest.mark.parametrize("release, version", [
    ("6.18.44-fc-v1252", (6, 18)), ("6.1.0-57-amd64", (6, 1)), ("5.10.0", (5, 10)), ("weird", (0, 0)),
])
def test_release_parser(release, version):
    assert hostprobe.parse_release(release) == version


def test_filesystems_and_cpuinfo_and_version_parsers():
    assert hostprobe.parse_filesystems("nodev\tsysfs\n\text4\nnodev\tfuse\n") == {"sysfs", "ext4", "fuse"}
    assert hostprobe.cpu_virtualization("processor: 0\nflags\t\t: fpu vme vmx sse\n")
    assert not hostprobe.cpu_virtualization("flags\t\t: fpu vme sse svmx\n")
    assert hostprobe.parse_version("runc version 1.1.5+ds1") == "1.1.5+ds1"
    assert hostprobe.parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)") == "7.2.22"
    assert hostprobe.parse_version("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1") == "1.6.20~ds1"
    assert hostprobe.parse_version("no number here") is None


def test_kernel_config_is_read_only_from_the_running_release():
    """/boot may hold another kernel's config (Debian's guest kernel here): it must not be used."""
    kernel = hostprobe.probe_kernel()
    assert kernel.release == os.uname().release
    if kernel.config_source is not None:
        assert kernel.config_source == "/proc/config.gz" or kernel.release in kernel.config_source
    others = [p for p in glob.glob("/boot/config-*") if not p.endswith(kernel.release)]
    if others and not os.path.exists("/proc/config.gz") and not os.path.exists(f"/boot/config-{kernel.release}"):
        assert kernel.config is None


def test_fuse_device_probe_checks_the_device_number(tmp_path):
    assert not hostprobe.probe_fuse_device(str(tmp_path / "nothing")).ok
    not_fuse = hostprobe.probe_fuse_device("/dev/null")
    assert not not_fuse.ok and "not the FUSE device" in not_fuse.detail and "1:3" in not_fuse.detail
    if os.path.exists("/dev/fuse"):
        assert hostprobe.probe_fuse_device().ok


def test_path_probe_on_a_read_only_and_a_missing_directory(tmp_path):
    require_root()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,ro", "lazyfs-test", str(small)], check=True)
    try:
        facts = hostprobe.probe_path(str(small / "a" / "b"))
        assert (facts.exists, facts.probed, facts.fstype, facts.mountpoint) == (False, str(small), "tmpfs", str(small))
        assert facts.read_only and not facts.writable
        assert facts.total_bytes == 4 << 20
    finally:
        subprocess.run(["umount", str(small)], check=True)
    facts = hostprobe.probe_path(str(tmp_path))
    assert facts.exists and facts.writable and not facts.read_only and facts.free_bytes > 0


def test_verity_probe_on_file_systems_without_it_leaves_nothing_behind(tmp_path):
    require_root()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "lazyfs-test", str(small)], check=True)
    try:
        outcome = hostprobe.probe_verity(str(small))
        assert not outcome.ok and "ENOTTY" in outcome.detail  # tmpfs has no fs-verity ioctls at all
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
    kernel = hostprobe.probe_kernel()
    outcome = hostprobe.probe_verity(str(tmp_path))
    assert os.listdir(tmp_path) == ["small"]
    if hostprobe.kernel_option(kernel, "CONFIG_FS_VERITY") == "n":
        assert not outcome.ok, outcome  # this host: the kernel lacks CONFIG_FS_VERITY


def test_loop_and_io_uring_probes_agree_with_the_tools():
    require_root()
    loop = hostprobe.probe_loop()
    free = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    assert loop.ok == (free.returncode == 0), (loop, free.stderr)
    if loop.ok:
        assert loop.detail.split()[-1].startswith("/dev/loop")
    outcome, disabled = hostprobe.probe_io_uring()
    if disabled == 2:
        assert not outcome.ok
    elif "CONFIG_IO_URING=y" in subprocess.run(["sh", "-c", "zcat /proc/config.gz 2>/dev/null"],
                                               capture_output=True, text=True).stdout and disabled == 0:
        assert outcome.ok, outcome
