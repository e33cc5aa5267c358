"""Power loss under the flat cache: the map never lists a block whose data did not survive.

The data file is fdatasynced before the map records of its blocks are appended
(and fdatasynced), so after a power cut at any request every block the map
lists still holds the bytes it was hashed from. A SIGKILL cannot show this (the
page cache survives it), so the cache lives on the fault file system of
tests/support/faultfs.py, which keeps only synced pages at a cut.

Broken on purpose once (``FlatFile.persist`` appending and fdatasyncing the map
before the data's fdatasync): "listed blocks whose data was lost" in several
rounds, red.
"""

from __future__ import annotations

import os
import random

import pytest
import trio

from lazyfs.device.merged import MergedDevice
from lazyfs.errors import LazyfsError
from lazyfs.fetch.flatfile import FlatCache, FlatFile, LayerFlats
from lazyfs.format.layer import BLOCK_SIZE
from tests.support.faultfs import FaultFs
from tests.support.layers import STACK_SIZE, make_stack
from tests.support.sources import CountingSource

pytestmark = [pytest.mark.fuse, pytest.mark.slow]


@pytest.fixture(scope="module")
def faultfs(tmp_path_factory):
    with FaultFs(tmp_path_factory.mktemp("flatpower") / "mnt") as fs:
        yield fs


def _generation(root: str, layers, backend) -> None:
    async def main():
        cache = await FlatCache.load(root, 1 << 30)
        dev = MergedDevice(layers, CountingSource(backend))
        dev.block_cache = await LayerFlats.open(cache, layers)
        half = STACK_SIZE // 2 // BLOCK_SIZE * BLOCK_SIZE
        await dev.read(0, half)
        await cache.persist_all()
        await dev.read(half, STACK_SIZE - half)
        await dev.aclose()
        await cache.aclose()

    try:
        trio.run(main)
    except (OSError, LazyfsError):
        pass  # the power went: what matters is what the disk holds now


def _listed_but_lost(root: str, layers) -> list[tuple[str, int]]:
    bad = []
    for meta, digest in layers:
        key = digest.split(":")[1]
        if not os.path.exists(os.path.join(root, f"{key}.data")):
            continue
        f = FlatFile(__import__("pathlib").Path(root), key, meta.virtual_size, meta.block_size)
        try:
            bad += [(key[:8], b) for b in f.verify_listed()]
        finally:
            f.close()
    return bad


def test_power_cut_never_leaves_a_listed_block_without_its_data(faultfs):
    layers, backend, _ = make_stack(31, nlayers=2)
    root = os.path.join(faultfs.mountpoint, "flat")
    faultfs.reset()
    before = faultfs.status()["ops"]
    _generation(root, layers, backend)
    total = faultfs.status()["ops"] - before
    assert _listed_but_lost(root, layers) == []
    rng = random.Random(5)
    problems = []
    for _ in range(12):
        faultfs.reset()
        faultfs.arm(rng.randint(1, total), seed=rng.randrange(1 << 30))
        _generation(root, layers, backend)
        if not faultfs.status()["dead"]:
            faultfs.cut(seed=rng.randrange(1 << 30))
        faultfs.power_on()
        lost = _listed_but_lost(root, layers)
        if lost:
            problems.append(f"listed blocks whose data was lost: {lost[:4]}")
    assert problems == []
