"""The working ext4 of a conversion: one sparse raw file the layers are applied to in turn.

After each layer the file is unmounted, its time-stamped and random fields are
normalized (``lazyfs.format.ext4``) and the 4 KiB blocks that differ from the
state after the previous layer become the new lazyfs layer. Which blocks
differ is found by comparing a 128-bit digest per block with the digests
recorded after the previous layer (16 bytes of memory per 4 KiB of disk).

Reproducibility: mkfs gets fixed features, UUID, hash seed and time; the
journal is switched off while the kernel writes (so no timing-dependent
transactions land in it) and on again afterwards; the applier thread is pinned
to one CPU with delayed allocation off (ext4's small-file allocator keeps
per-CPU state); the applier frees no inode before the layer's last entry (without
a journal ext4 skips inodes freed in an earlier wall-clock second: see
``tarapply.GRAVEYARD``); then only the fields ``normalize_*`` rewrites still vary.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import uuid as uuid_mod
from collections.abc import AsyncIterator, Iterator, Sequence

import trio

from lazyfs.device.chunks import ChunkSource
from lazyfs.device.merged import MergedDevice
from lazyfs.durable import pwrite_all
from lazyfs.errors import FormatError, LazyfsError
from lazyfs.format import ext4
from lazyfs.format.layer import BLOCK_SIZE, LayerMeta
from lazyfs.format.tarplan import BYTES_PER_INODE, FsUsage, LayerStats, next_fs_size
from lazyfs.nursery import open_nursery
from lazyfs.serve import system

STAMP = 946684800  # 2000-01-01T00:00:00Z: every time mkfs, resize2fs and the normalizer write
JOURNAL_MB = 32
FEATURES = ("none,has_journal,ext_attr,resize_inode,dir_index,filetype,extent,64bit,flex_bg,sparse_super,"
            "large_file,huge_file,dir_nlink,extra_isize")
# nodev, nosuid, noexec: device nodes and set-id files from a registry image are data here, never honoured
MOUNT_OPTIONS = ("noatime", "nodelalloc", "noinit_itable", "nodiscard", "errors=remount-ro", "nodev", "nosuid", "noexec")
DIGEST_SIZE = 16
READ_WINDOW = 4 << 20
_ZERO_DIGEST = hashlib.blake2b(bytes(BLOCK_SIZE), digest_size=DIGEST_SIZE).digest()


# Our own mke2fs.conf, so the host's (which may add features such as orphan_file) changes nothing.
MKE2FS_CONF = """[defaults]
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t}
\tfloppy = {
\t}
\tsmall = {
\t}
\tdefault = {
\t}
\tbig = {
\t}
\thuge = {
\t}
"""


def _env(directory: str) -> dict[str, str]:
    conf = os.path.join(directory, "mke2fs.conf")
    if not os.path.exists(conf):
        with open(conf, "w") as f:
            f.write(MKE2FS_CONF)
    return {**os.environ, "E2FSPROGS_FAKE_TIME": str(STAMP), "LC_ALL": "C", "MKE2FS_CONFIG": conf}


def fs_uuid(seed: str, purpose: str) -> str:
    return str(uuid_mod.UUID(bytes=hashlib.sha256(f"lazyfs-convert {purpose} {seed}".encode()).digest()[:16]))


async def _run(cmd: list[str], directory: str, timeout: float = 600.0) -> str:
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False,
                                          env=_env(directory))
    except trio.TooSlowError:
        raise LazyfsError(f"{' '.join(cmd)}: no answer after {timeout:g} s") from None
    if done.returncode:
        raise LazyfsError(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace")


def _block_digests(data: bytes) -> bytes:
    out = bytearray()
    view = memoryview(data)
    for off in range(0, len(data), BLOCK_SIZE):
        out += hashlib.blake2b(view[off : off + BLOCK_SIZE], digest_size=DIGEST_SIZE).digest()
    return bytes(out)


class WorkFs:
    """A raw ext4 file under *directory*, its mount point, and the block digests of its last state."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "disk.ext4")
        self.mountpoint = os.path.join(directory, "root")
        self.size = 0
        self.digests = bytearray()  # DIGEST_SIZE per block: the state the next layer is a diff against

    # ------------------------------------------------------------ making the file

    async def create(self, size: int, seed: str) -> None:
        """A new, empty, reproducible ext4 of *size* bytes (*seed* picks its UUID and hash seed)."""
        with open(self.path, "wb") as f:
            f.truncate(size)
        await _run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-i", str(BYTES_PER_INODE),
                    "-m", "0", "-O", FEATURES, "-J", f"size={JOURNAL_MB}", "-U", fs_uuid(seed, "uuid"),
                    "-E", f"nodiscard,lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0,"
                          f"hash_seed={fs_uuid(seed, 'hash-seed')}",
                    self.path], self.directory)
        self.size = size
        self.digests = bytearray(_ZERO_DIGEST * (size // BLOCK_SIZE))
        # mkfs's own blocks belong to the first layer: the digests stay "all zero" until then

    async def load(self, layers: Sequence[tuple[LayerMeta, str]], store: ChunkSource, size: int,
                   progress=None, concurrency: int = 8) -> None:
        """Materialize a stack of lazyfs layers as the raw file (the state to convert the next layer over)."""
        device = MergedDevice(layers, store, size=size)
        with open(self.path, "wb") as f:
            f.truncate(size)
        self.size = size
        self.digests = bytearray(_ZERO_DIGEST * (size // BLOCK_SIZE))
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        limiter = trio.CapacityLimiter(concurrency)
        windows: set[int] = set()  # READ_WINDOW-sized windows holding data
        for s in device.index.segments:
            windows.update(range(s.start * BLOCK_SIZE // READ_WINDOW, (s.end * BLOCK_SIZE - 1) // READ_WINDOW + 1))

        async def one(window: int) -> None:
            async with limiter:
                offset = window * READ_WINDOW
                data = await device.read(offset, min(READ_WINDOW, size - offset))
                digests = await trio.to_thread.run_sync(_block_digests, data)
                await trio.to_thread.run_sync(pwrite_all, fd, data, offset)
                first = offset // BLOCK_SIZE * DIGEST_SIZE
                self.digests[first : first + len(digests)] = digests
                if progress is not None:
                    progress(len(data))

        try:
            async with open_nursery() as nursery:
                for window in sorted(windows):
                    nursery.start_soon(one, window)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ superblock

    def _read_superblock(self) -> bytearray:
        with open(self.path, "rb") as f:
            return bytearray(os.pread(f.fileno(), ext4.SUPERBLOCK_SIZE, ext4.SUPERBLOCK_OFFSET))

    def superblock(self) -> ext4.Superblock:
        return ext4.parse_superblock(self._read_superblock())

    def usage(self) -> FsUsage:
        sb = self.superblock()
        return FsUsage(sb.size, sb.free_blocks * sb.block_size, sb.inodes_count, sb.free_inodes)

    def _set_journal(self, on: bool) -> None:
        raw = self._read_superblock()
        ext4.set_journal_flag(raw, on)
        with open(self.path, "r+b") as f:
            pwrite_all(f.fileno(), bytes(raw), ext4.SUPERBLOCK_OFFSET)

    async def make_room(self, stats: LayerStats, seed: str) -> None:
        """Create the filesystem, or grow it, so that a layer with *stats* fits (``next_fs_size``)."""
        if self.size == 0:
            await self.create(next_fs_size(None, stats), seed)
            return
        grown = next_fs_size(await trio.to_thread.run_sync(self.usage), stats)
        if grown is not None:
            await self.grow(grown)

    async def grow(self, size: int) -> None:
        """Grow the filesystem (offline) to *size* bytes; the new blocks read as zeros until used."""
        if size <= self.size:
            return
        with open(self.path, "r+b") as f:
            f.truncate(size)
        await _run(["resize2fs", "-f", self.path, f"{size // 1024}K"], self.directory)
        self.digests += _ZERO_DIGEST * ((size - self.size) // BLOCK_SIZE)
        self.size = size

    # ------------------------------------------------------------ applying

    @contextlib.asynccontextmanager
    async def mounted(self) -> AsyncIterator[str]:
        """Mount the file read-write (without its journal) at ``self.mountpoint``; normalize afterwards."""
        os.makedirs(self.mountpoint, exist_ok=True)
        self._set_journal(False)
        dev = await system.losetup_attach(self.path, read_only=False, direct_io=False)
        try:
            await system.mount(dev, self.mountpoint, "ext4", options=MOUNT_OPTIONS)
            try:
                yield self.mountpoint
            finally:
                with trio.CancelScope(shield=True):
                    await system.umount(self.mountpoint)
        finally:
            with trio.CancelScope(shield=True):
                await system.losetup_detach(dev)
        self._set_journal(True)
        await trio.to_thread.run_sync(self.normalize)

    def normalize(self) -> int:
        """Rewrite the kernel's time-stamped and random fields; the number of inodes changed."""
        changed = 0
        with open(self.path, "r+b") as f:
            fd = f.fileno()
            raw = bytearray(os.pread(fd, ext4.SUPERBLOCK_SIZE, ext4.SUPERBLOCK_OFFSET))
            sb = ext4.parse_superblock(raw)
            ext4.check_editable(sb)
            gdt_offset, gdt_length = ext4.gdt_location(sb)
            gdt = os.pread(fd, gdt_length, gdt_offset)
            table_bytes = sb.inodes_per_group * sb.inode_size
            per_window = READ_WINDOW // sb.inode_size
            for group in ext4.groups(gdt, sb):
                if group.inode_table < 0:
                    continue
                bitmap = os.pread(fd, sb.block_size, group.inode_bitmap * sb.block_size)
                start = group.inode_table * sb.block_size
                for first in range(0, sb.inodes_per_group, per_window):
                    off = start + first * sb.inode_size
                    length = min(READ_WINDOW, table_bytes - first * sb.inode_size)
                    if not _has_data(fd, off, length):
                        continue
                    buf = bytearray(os.pread(fd, length, off))
                    dirty = False
                    for i in range(length // sb.inode_size):
                        at = i * sb.inode_size
                        if ext4.inode_in_use(bitmap, first + i):
                            touched = ext4.normalize_inode(buf, at, sb.inode_size, STAMP)
                        else:
                            touched = ext4.clear_inode(buf, at, sb.inode_size)
                        changed += touched
                        dirty |= touched
                    if dirty:
                        pwrite_all(fd, bytes(buf), off)
            if ext4.normalize_superblock(raw, STAMP):
                pwrite_all(fd, bytes(raw), ext4.SUPERBLOCK_OFFSET)
        return changed

    # ------------------------------------------------------------ the diff

    def changed_pieces(self, chunk_size: int) -> Iterator[tuple[int, bytes, int]]:
        """``(start block, bytes, block count)`` runs of blocks that differ from the recorded state.

        Cut at *chunk_size* windows, ascending; all-zero blocks in them stand
        for blocks that became zero. Updates the recorded digests as it goes.
        """
        regions = _data_regions(self.path, self.size)
        starts = [r[0] for r in regions]
        per = chunk_size // BLOCK_SIZE
        zero_window = _ZERO_DIGEST * per
        with open(self.path, "rb") as f:
            fd = f.fileno()
            for window in range(0, self.size, chunk_size):
                length = min(chunk_size, self.size - window)
                n = length // BLOCK_SIZE
                first = window // BLOCK_SIZE
                old = self.digests[first * DIGEST_SIZE : (first + n) * DIGEST_SIZE]
                if not _overlaps(regions, starts, window, window + length):
                    if old == zero_window[: n * DIGEST_SIZE]:
                        continue
                    data = bytes(length)
                    new = zero_window[: n * DIGEST_SIZE]
                else:
                    data = os.pread(fd, length, window)
                    if len(data) != length:
                        raise FormatError(f"{self.path}: short read at {window}")
                    new = _block_digests(data)
                if new == old:
                    continue
                run = None
                for i in range(n + 1):
                    lo, hi = i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE
                    differs = i < n and new[lo:hi] != old[lo:hi]
                    if differs and run is None:
                        run = i
                    elif not differs and run is not None:
                        yield first + run, data[run * BLOCK_SIZE : i * BLOCK_SIZE], i - run
                        run = None
                self.digests[first * DIGEST_SIZE : (first + n) * DIGEST_SIZE] = new


def _has_data(fd: int, offset: int, length: int) -> bool:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
    except OSError:  # ENXIO: nothing but a hole after offset
        return False


def _data_regions(path: str, size: int) -> list[tuple[int, int]]:
    regions = []
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            regions.append((start, end))
            pos = end
    return regions


def _overlaps(regions: list[tuple[int, int]], starts: list[int], lo: int, hi: int) -> bool:
    i = bisect.bisect_right(starts, lo) - 1
    if i >= 0 and regions[i][1] > lo:
        return True
    return i + 1 < len(regions) and regions[i + 1][0] < hi
