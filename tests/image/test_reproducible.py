"""The working ext4 comes out byte-identical however the clock ticks while a layer is applied.

The flake this pins down (tests/image/test_convert.py::test_reconversion_gives_the_same_digests
failed once at load average 13): ext4 without a journal -- and convert switches the journal off
while the kernel writes -- skips, when it allocates an inode, free inodes whose deletion time is
*earlier than the current second* and recent (ialloc.c, recently_deleted()). A layer that removes
lower files (whiteouts, replaced files) and then creates files reused the freed inodes when it
all happened within one wall-clock second and skipped them when a second ticked over in between:
other inode numbers, other inode table and bitmap blocks, another layer digest. Load makes the
tick likelier; here a pause until the next second between the removals and the creations forces
it, so the test does not depend on load.
"""

import hashlib
import io
import os
import tarfile
import time

import pytest
import trio

from lazyfs.errors import FormatError
from lazyfs.image.tarapply import GRAVEYARD, LayerApplier
from lazyfs.image.workfs import WorkFs

pytestmark = [pytest.mark.loop]


def _tar(members: list[tuple[str, bytes | None]]) -> bytes:
    """A layer: (name, data) files, (name/, None) directories; all times fixed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name.rstrip("/"))
            ti.mtime = 1_650_000_000
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            else:
                ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


LOWER = _tar([("d/", None), *[(f"d/f{i:02d}", b"lower %d\n" % i) for i in range(20)],
              ("t/", None), *[(f"t/g{i:02d}", b"tree %d\n" % i) for i in range(10)]])
UPPER = _tar([*[(f"d/.wh.f{i:02d}", b"") for i in range(10)], ("t/.wh..wh..opq", b""), (".wh.t", b""),
              ("d/f15", b"replaced\n"),
              ("new/", None), *[(f"new/x{i:02d}", b"new %d\n" % i) for i in range(20)]])


def _next_second() -> None:
    """Sleep until just after the wall clock's next whole second."""
    now = time.time()
    time.sleep(int(now) + 1.02 - now)


class _Pausing(LayerApplier):
    """Waits for the next wall-clock second before the first entry under new/ (after every removal)."""

    def __init__(self, root: str, what: str, pause: bool) -> None:
        super().__init__(root, what)
        self.pause = pause

    def apply(self, action, entry, data=None) -> None:
        if self.pause and entry.name.startswith("new"):
            _next_second()
            self.pause = False
        super().apply(action, entry, data)


def _build(directory: str, pause: bool, layers=(LOWER, UPPER)) -> str:
    """Both layers applied as convert applies them; the sha256 of the working ext4 after the last."""
    fs = WorkFs(directory)
    os.makedirs(directory)

    def apply(root: str, blob: bytes, pause: bool) -> None:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(before)})
        try:
            with _Pausing(root, "test layer", pause) as applier:
                applier.apply_stream(io.BytesIO(blob))
        finally:
            os.sched_setaffinity(0, before)

    async def main():
        await fs.create(256 << 20, "seed")
        for i, blob in enumerate(layers):
            if i == len(layers) - 1 and not pause:
                _next_second()  # removals and creations within one second (the apply takes milliseconds)
            async with fs.mounted() as root:
                await trio.to_thread.run_sync(apply, root, blob, pause and i == len(layers) - 1)

    trio.run(main)
    with open(fs.path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_a_second_ticking_over_between_removals_and_creations_changes_nothing(tmp_path):
    """Broken on purpose once: ``LayerApplier._remove`` deleting at once (as before, instead of moving
    to the graveyard that ``finish`` empties) -- went red: the digests differed (the paused run did
    not reuse the inodes of d/f00..f09 and t/*)."""
    same_second = _build(str(tmp_path / "a"), pause=False)
    tick_between = _build(str(tmp_path / "b"), pause=True)
    assert same_second == tick_between


def test_the_graveyard_name_is_the_image_s_own_and_refused_to_the_layer(tmp_path):
    """An image that holds /.lazyfs-removed keeps it (the graveyard takes the next free name); a layer
    entry reaching into the graveyard in use is refused, not silently deleted at the layer's end."""
    lower = _tar([(f"{GRAVEYARD}/", None), (f"{GRAVEYARD}/mine", b"the image's own\n"), ("d/", None),
                  ("d/a", b"a\n"), ("d/b", b"b\n")])
    upper = _tar([("d/.wh.a", b""), ("x", b"x\n")])
    _build(str(tmp_path / "ok"), pause=False, layers=(lower, upper))
    fs = WorkFs(str(tmp_path / "ok"))

    async def check():
        async with fs.mounted() as root:
            assert sorted(os.listdir(root)) == sorted([GRAVEYARD, "d", "lost+found", "x"])
            assert open(f"{root}/{GRAVEYARD}/mine", "rb").read() == b"the image's own\n"
            assert os.listdir(f"{root}/d") == ["b"]
            bad = _tar([("d/.wh.b", b""), (f"{GRAVEYARD}.1/sneak", b"s\n")])
            with LayerApplier(root, "bad layer") as applier, pytest.raises(FormatError, match="lazyfs keeps"):
                applier.apply_stream(io.BytesIO(bad))

    trio.run(check)
