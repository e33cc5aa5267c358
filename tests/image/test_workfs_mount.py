"""Convert's working ext4 is mounted nodev,nosuid,noexec: a layer's device nodes and set-id files are data."""

import os
import stat

import pytest
import trio

from lazyfs.image.workfs import WorkFs

pytestmark = [pytest.mark.loop]


def test_working_ext4_honours_no_device_node(tmp_path):
    fs = WorkFs(str(tmp_path / "fs"))
    os.makedirs(fs.directory)

    async def main():
        await fs.create(256 << 20, "seed")
        async with fs.mounted() as root:
            options = next(line.split()[3] for line in open("/proc/self/mounts") if line.split()[1] == root)
            assert {"nodev", "nosuid", "noexec"} <= set(options.split(",")), options
            os.mknod(f"{root}/mem", 0o666 | stat.S_IFCHR, os.makedev(1, 1))  # /dev/mem, as a layer could carry
            with pytest.raises(PermissionError):
                open(f"{root}/mem", "rb")

    trio.run(main)
