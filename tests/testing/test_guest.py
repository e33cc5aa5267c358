"""The qemu guest helper: boots a real guest against real ext4 disks and a virtio-fs share."""

from __future__ import annotations

import gzip
import os
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from lazyfs.errors import FormatError, NotFoundError
from tests.support.guest import (
    BEGIN_MARKER,
    END_MARKER,
    CpioEntry,
    Drive,
    GuestError,
    Share,
    _prune_initrds,
    decompress_vmlinux,
    find_kernel,
    find_busybox,
    newc_archive,
    parse_console,
    parse_modules_dep,
    payload_candidates,
    require_qemu,
    resolve_modules,
)

GUEST_TIMEOUT = 120.0


# ----------------------------------------------------------------- pure parts (no qemu)


def test_parse_console_extracts_output_and_status():
    console = f"[ 1.0] noise\r\n{BEGIN_MARKER}\r\nhello\r\nworld\r\n\r\n{END_MARKER} rc=7\r\n[ 2.0] reboot\r\n"
    assert parse_console(console) == ("hello\nworld\n", 7)


def test_parse_console_without_markers():
    assert parse_console("Kernel panic\n") == ("", None)
    assert parse_console(f"{BEGIN_MARKER}\npartial") == ("partial", None)


def test_resolve_modules_orders_dependencies_first_and_skips_builtins():
    dep = parse_modules_dep(
        "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
        "kernel/fs/jbd2/jbd2.ko:\n"
        "kernel/fs/mbcache.ko:\n"
        "kernel/lib/crc16.ko.xz:\n"
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\n"
    )
    order = resolve_modules(dep, ["virtio-blk", "ext4"], builtin=["kernel/fs/mbcache.ko"])
    assert order == [
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/lib/crc16.ko.xz",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/ext4/ext4.ko.xz",
    ]
    with pytest.raises(NotFoundError):
        resolve_modules(dep, ["btrfs"])
    with pytest.raises(FormatError):
        parse_modules_dep("no colon here\n")


def test_the_initrd_cache_keeps_the_newest(tmp_path):
    """Initrds whose script names a test's ports are new every run: the cache keeps the newest few."""
    for i in range(30):
        path = tmp_path / f"initrd-6.1-{i:02d}.cpio.gz"
        path.write_bytes(b"x")
        os.utime(path, ns=(i * 10**9, i * 10**9))
    (tmp_path / "vmlinux-6.1-x").write_bytes(b"kept")
    _prune_initrds(tmp_path, keep=24)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f"initrd-6.1-{i:02d}.cpio.gz" for i in range(6, 30)] + ["vmlinux-6.1-x"]


def test_newc_archive_is_read_by_cpio(tmp_path):
    if shutil.which("cpio") is None:
        pytest.skip("cpio tool not installed")
    archive = newc_archive(
        [
            CpioEntry("d", 0o040755),
            CpioEntry("d/file", 0o100644, b"abc"),
            CpioEntry("d/link", 0o120777, b"file"),
        ]
    )
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True, timeout=30, check=True)
    lines = listing.stdout.decode().splitlines()
    names = [line.split()[-3] if "->" in line else line.split()[-1] for line in lines]
    assert names == ["d", "d/file", "d/link"]
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=tmp_path, timeout=30, check=True)
    assert (tmp_path / "d/file").read_bytes() == b"abc"
    assert (tmp_path / "d/link").readlink() == Path("file")


def test_find_kernel_picks_newest_with_modules(tmp_path):
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64", "6.12.0-1-amd64"):
        (boot / f"vmlinuz-{version}").write_bytes(b"")
    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64"):  # 6.12 has no modules: not usable
        (mods / version).mkdir(parents=True)
        (mods / version / "modules.dep").write_text("")
    kernel = find_kernel(boot, mods)
    assert kernel.version == "6.1.0-10-amd64"
    assert kernel.modules_dir == mods / "6.1.0-10-amd64"
    with pytest.raises(NotFoundError):
        find_kernel(tmp_path / "empty", mods)


def _fake_bzimage(payload: bytes) -> bytes:
    # Just enough of a boot header (protocol 2.15) for payload_offset to be honoured.
    setup_sects = 1
    image = bytearray((setup_sects + 1) * 512 + 64)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x20F).to_bytes(2, "little")
    image[0x248:0x24C] = (64).to_bytes(4, "little")
    image[0x24C:0x250] = len(payload).to_bytes(4, "little")
    return bytes(image) + payload + b"\0" * 16


@pytest.mark.parametrize("kind", ["xz", "gzip", "zstd"])
def test_decompress_vmlinux_finds_the_elf(kind):
    elf = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64
    if kind == "xz":
        payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif kind == "gzip":
        payload = gzip.compress(elf)
    else:
        import zstandard

        payload = zstandard.ZstdCompressor().compress(elf)
    image = _fake_bzimage(payload)
    assert payload_candidates(image)[0][0] == kind
    assert decompress_vmlinux(image) == elf
    with pytest.raises(FormatError):
        decompress_vmlinux(_fake_bzimage(gzip.compress(b"not an elf")))


# ----------------------------------------------------------------- real guests


def _mkfs(image: Path, tree: Path, size_mb: int = 32) -> None:
    with image.open("wb") as f:
        f.truncate(size_mb << 20)
    cmd = ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0"]
    if tree is not None:
        cmd += ["-d", str(tree)]
    subprocess.run(cmd + [str(image)], check=True, capture_output=True, timeout=60)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(2 * GUEST_TIMEOUT + 60)
def test_guest_reads_marker_from_readonly_ext4_disk(tmp_path):
    guest = require_qemu()
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "marker").write_text("lazyfs marker 1f3a\n")
    shutil.copy(find_busybox(), tree / "bin/busybox")
    disk = tmp_path / "ro.img"
    _mkfs(disk, tree)
    before = disk.read_bytes()

    result = guest.run(
        "set -e\n"
        "mount -t ext4 -o ro /dev/vda /mnt\n"
        "cat /mnt/marker\n"
        # The busybox on the disk runs from the disk: the image is a usable root, not just data.
        "/mnt/bin/busybox echo from-disk-busybox\n"
        "umount /mnt\n",
        drives=[Drive(disk, read_only=True)],
        timeout=GUEST_TIMEOUT,
    )
    print(f"guest boot+run: {result.seconds:.2f}s")
    assert not result.timed_out, result.console
    assert result.returncode == 0, result.console
    assert result.output == "lazyfs marker 1f3a\nfrom-disk-busybox\n"
    assert disk.read_bytes() == before


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(2 * GUEST_TIMEOUT + 60)
def test_guest_writes_to_ext4_disk_and_host_sees_it(tmp_path):
    guest = require_qemu()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "existing").write_text("old\n")
    disk = tmp_path / "rw.img"
    _mkfs(disk, tree)

    result = guest.run(
        "set -e\n"
        "mount -t ext4 /dev/vda /mnt\n"
        "mkdir /mnt/out\n"
        "echo written-by-guest > /mnt/out/hello.txt\n"
        "dd if=/dev/zero of=/mnt/out/zeros bs=4096 count=256 2>/dev/null\n"
        "cat /mnt/existing\n"
        "sync\n"
        "umount /mnt\n",
        drives=[disk],
        timeout=GUEST_TIMEOUT,
    )
    print(f"guest boot+run: {result.seconds:.2f}s")
    assert result.returncode == 0, result.console
    assert result.output == "old\n"

    cat = subprocess.run(
        ["debugfs", "-R", "cat /out/hello.txt", str(disk)], capture_output=True, timeout=60, check=True
    )
    assert cat.stdout == b"written-by-guest\n"
    st = subprocess.run(["debugfs", "-R", "stat /out/zeros", str(disk)], capture_output=True, timeout=60, check=True)
    assert b"Size: 1048576" in st.stdout
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(2 * GUEST_TIMEOUT + 60)
def test_guest_reads_marker_over_virtiofs(tmp_path):
    guest = require_qemu(virtiofs=True)
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    (shared / "sub/marker").write_text("virtiofs marker 77c0\n")

    result = guest.run(
        "set -e\n"
        "mount -t virtiofs hostshare /mnt\n"
        "cat /mnt/sub/marker\n"
        "echo from-guest > /mnt/back.txt\n"
        "umount /mnt\n",
        virtiofs=Share(shared, "hostshare"),
        timeout=GUEST_TIMEOUT,
    )
    print(f"guest boot+run: {result.seconds:.2f}s")
    assert result.returncode == 0, result.console
    assert result.output == "virtiofs marker 77c0\n"
    assert (shared / "back.txt").read_text() == "from-guest\n"


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(2 * GUEST_TIMEOUT + 60)
def test_guest_reports_failure_and_timeout(tmp_path):
    guest = require_qemu()
    failed = guest.run("echo before\nexit 42\n", timeout=GUEST_TIMEOUT)
    assert (failed.output, failed.returncode) == ("before\n", 42)
    with pytest.raises(GuestError, match="returned 42"):
        failed.check()

    hung = guest.run("echo sleeping\nsleep 600\n", timeout=30.0)
    assert hung.timed_out
    assert hung.returncode is None
    assert hung.output.startswith("sleeping\n")
