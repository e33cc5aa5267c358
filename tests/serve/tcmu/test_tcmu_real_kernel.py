"""The TCMU front end against the real kernel: configfs user backstore + loopback LUN -> /dev/sdX.

Runs where ``target_core_user`` (and tcm_loop, configfs) exist and we are root; skips with the
reason printed elsewhere. ``test_real_kernel_in_qemu_guest`` runs the same test inside a qemu
guest booted with the host's Debian kernel and its TCMU modules, so hosts without the module
(like CI containers) still exercise the real kernel ring.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import trio

from lazyfs.errors import ConfigError
from lazyfs.serve.tcmu import configfs as C
from tests.support.memory import MemorySource

SIZE = 64 << 20


def unavailable_reason() -> str | None:
    try:
        C.check_available()
    except ConfigError as exc:
        return str(exc)
    if os.geteuid() != 0:
        return "target_core_user not available to this user: configfs setup needs root"
    for tool in ("mkfs.ext4", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def read_disk(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks, done = [], 0
        while done < size:
            chunk = os.pread(fd, min(1 << 20, size - done), done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


async def run(*cmd: str) -> None:
    await trio.run_process(list(cmd), capture_stdout=True, capture_stderr=True)


async def exercise(tmp_path: Path, block_size: int) -> None:
    rng = random.Random(block_size)
    data = bytearray(SIZE)
    data[: 4 << 20] = rng.randbytes(4 << 20)
    data[-(1 << 20):] = rng.randbytes(1 << 20)
    src = MemorySource(bytes(data))
    name = f"lazyfs-test-{os.getpid()}-{block_size}"
    mnt = tmp_path / f"mnt{block_size}"
    mnt.mkdir()
    mounted = False
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            dev = await C.attach(src, name, nursery=nursery, block_size=block_size)
            try:
                assert dev.disk is not None and dev.disk.exists()
                with trio.fail_after(240):  # abandonable: a dead handler fails the test now, not at I/O timeout
                    got = await trio.to_thread.run_sync(read_disk, dev.disk, SIZE, abandon_on_cancel=True)
                assert len(got) == SIZE and got == bytes(data), "the disk does not read back the source"
                sys_block = Path("/sys/class/block") / dev.disk.name
                assert int((sys_block / "queue" / "logical_block_size").read_text()) == block_size
                assert int((sys_block / "size").read_text()) * 512 == SIZE

                await run("mkfs.ext4", "-F", "-q", str(dev.disk))
                assert src.data[1024 + 56 : 1024 + 58] == b"\x53\xef", "no ext4 superblock in the source"
                await run("mount", str(dev.disk), str(mnt))
                mounted = True
                payload = rng.randbytes(3 << 20)
                # File I/O on the LUN must leave the trio thread free: it is the one serving the LUN.
                await trio.to_thread.run_sync((mnt / "file").write_bytes, payload, abandon_on_cancel=True)
                await run("sync")
                await run("umount", str(mnt))
                mounted = False
                flushes = src.flushes
                assert flushes > 0, "no SYNCHRONIZE CACHE reached the source"
                await run("e2fsck", "-f", "-n", str(dev.disk))
                await run("mount", "-o", "ro", str(dev.disk), str(mnt))
                mounted = True
                assert await trio.to_thread.run_sync((mnt / "file").read_bytes, abandon_on_cancel=True) == payload
                stats = dev.statistics()
                assert stats["check_conditions"] < stats["completed"] and stats["bytes_written"] > len(payload)
            finally:
                if mounted:
                    await run("umount", str(mnt))
                await C.detach(name)
            layout = C.Layout(name)
            assert not layout.backstore.exists() and not layout.fabric_dir.exists()
            assert C.find_uio(layout) is None


@pytest.mark.parametrize("block_size", [512, 4096])
def test_real_kernel_lun(tmp_path, block_size):
    reason = unavailable_reason()
    if reason:
        print(f"SKIP real-kernel TCMU: {reason}")
        pytest.skip(reason)
    trio.run(exercise, tmp_path, block_size)


GUEST_MODULES = ("virtio_pci", "virtiofs", "crc32c_generic", "ext4", "sd_mod", "target_core_user", "tcm_loop")

GUEST_SCRIPT = r"""
set -e
mount -t configfs none /sys/kernel/config
mkdir -p /host
mount -t virtiofs -o ro root /host
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t configfs none /host/sys/kernel/config
mount -t devtmpfs devtmpfs /host/dev
# the checkout may live under /tmp or /run (CI clones anywhere): keep it visible under the tmpfs mounts
mkdir -p /repo
mount --bind /host{repo} /repo
mount -t tmpfs tmpfs /host/tmp
mount -t tmpfs tmpfs /host/run
mkdir -p /host{repo}
mount --bind /repo /host{repo}
chroot /host /bin/sh -c 'cd {repo} && PYTHONDONTWRITEBYTECODE=1 HOME=/tmp {python} -m pytest -q -x -p no:cacheprovider \
    --basetemp=/tmp/pt -s -o log_cli=true --log-cli-level={log_level} \
    tests/serve/tcmu/test_tcmu_real_kernel.py -k test_real_kernel_lun'
"""


@pytest.mark.qemu
@pytest.mark.slow
def test_real_kernel_in_qemu_guest():
    """Boot the host's kernel with target_core_user + tcm_loop and run test_real_kernel_lun inside it."""
    from tests.support import guest as G

    if unavailable_reason() is None:
        pytest.skip("the host kernel has target_core_user; test_real_kernel_lun ran on it directly")
    vm = G.require_qemu(GUEST_MODULES, virtiofs=True)
    repo = Path(__file__).resolve().parents[3]
    script = GUEST_SCRIPT.format(repo=repo, python=sys.executable,
                                 log_level=os.environ.get("LAZYFS_TCMU_GUEST_LOG", "WARNING"))
    initrd = G.build_initrd(modules=vm.modules, init_script=script, kernel=vm.kernel)
    # TCG: the guest helper asks for "-cpu max", which nested KVM here cannot provide.
    # LAZYFS_TCMU_GUEST_APPEND adds kernel arguments, e.g. "loglevel=7 scsi_mod.scsi_logging_level=16777216"
    result = G.boot(vm.vmlinux, initrd, virtiofs=G.Share(Path("/"), "root"), timeout=900, memory_mb=1024,
                    append=os.environ.get("LAZYFS_TCMU_GUEST_APPEND", ""))
    print(result.output)
    result.check()
    assert "2 passed" in result.output, result.output
