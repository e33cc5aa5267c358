"""TCMU on real images: a registry image read through the emulated kernel ring, and the daemon's TCMU commands."""

import os
import struct
import subprocess
import sys

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.serve.host import Host
from lazyfs.serve.tcmu import configfs
from tests.support.tcmu_kernel import serve_emulated
from tests.serve.conftest import ROOT

pytestmark = [pytest.mark.registry]
BLOCK = 512


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


@pytest.mark.parametrize("scatter", [True, False], ids=["scattered-buffers", "contiguous-buffers"])
def test_registry_image_through_the_emulated_ring_equals_flatten(env, tmp_path, scatter):
    """Every byte a LUN of a registry image serves equals the flattened image: with data-area buffers
    scattered (read, then copied into the ring) and contiguous (the merged device reads straight
    into the data area: chunk store, flat files and holes; issue 14, item 5)."""
    with open(env.flat, "rb") as f:
        flat = f.read()
    config = Config(cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "w"), trace_record_seconds=0,
                    registries=(RegistrySettings(env.registry.registry, plain_http=True),))

    async def main():
        async with Host.open(config) as host:
            att = await host.attach(env.ref)
            async with serve_emulated(att.device, name="regimg", data_size=8 << 20, scatter=scatter) as (emu, handler):
                step = 256 << 10  # bytes per READ (16)
                chunks = {}

                async def read(offset):
                    done = await emu.submit(read16(offset // BLOCK, step // BLOCK))
                    assert done.status == 0, done.sense.hex()
                    chunks[offset] = done.data_in

                limit = trio.Semaphore(16)  # many commands in flight, scattered over the ring

                async def bounded(offset):
                    async with limit:
                        await read(offset)

                for _ in range(2):  # cold (fetched), then warm (flat files)
                    chunks.clear()
                    async with trio.open_nursery() as n:
                        for offset in range(0, att.device.size, step):
                            n.start_soon(bounded, offset)
                    data = b"".join(chunks[o] for o in sorted(chunks))
                    assert len(data) == len(flat) and data == flat
                return handler.statistics(), att.device.inplace_reads

    stats, inplace = trio.run(main)
    reads = 2 * len(range(0, len(flat), 256 << 10))
    if scatter:
        assert stats["inplace_reads"] < reads
    else:
        assert stats["inplace_reads"] == inplace == reads


def test_tcmu_commands_say_clearly_when_the_kernel_lacks_it(env):
    try:
        configfs.check_available()
    except Exception as exc:
        reason = str(exc)
    else:
        pytest.skip("target_core_user is available here: the real-kernel tests cover it")
    print(f"this host: {reason}")
    proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", "tcmu", "attach", env.ref, "lun0", "--config",
                           env.config_path], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "target_core_user not available" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    from lazyfs.serve.control import call

    assert call(env.socket, "list") == []  # nothing left half-attached
    assert os.path.exists(env.socket)
