"""The few ext4 on-disk structures conversion needs, sans-IO: superblock, group descriptors, inodes.

Used to make a kernel-written ext4 reproducible: after a layer is applied by
the kernel, the fields that record *when* or *at random* (inode ctime, crtime
and generation, deletion times, mount times, the last mount point, lifetime
write counters) are rewritten to values that depend only on the content.
Only filesystems without ``metadata_csum`` are edited (lazyfs creates them so):
then no checksum covers those fields.

Offsets follow the kernel's ``struct ext4_super_block``, ``struct
ext4_group_desc`` and ``struct ext4_inode`` (fs/ext4/ext4.h), little endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lazyfs.errors import FormatError

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
MAGIC = 0xEF53
STATE_VALID = 0x1
STATE_ERROR = 0x2

COMPAT_HAS_JOURNAL = 0x4
INCOMPAT_RECOVER = 0x4
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400
RO_COMPAT_ORPHAN_PRESENT = 0x10000

GOOD_OLD_INODE_SIZE = 128
BG_INODE_UNINIT = 0x1


@dataclass(frozen=True, slots=True)
class Superblock:
    inodes_count: int
    blocks_count: int
    free_blocks: int
    free_inodes: int
    first_data_block: int
    block_size: int
    blocks_per_group: int
    inodes_per_group: int
    state: int
    first_ino: int
    inode_size: int
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    desc_size: int
    error_count: int

    @property
    def groups(self) -> int:
        return -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)

    @property
    def has_journal(self) -> bool:
        return bool(self.feature_compat & COMPAT_HAS_JOURNAL)

    @property
    def size(self) -> int:
        return self.blocks_count * self.block_size


def _u16(b: bytes | bytearray, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0]


def _u32(b: bytes | bytearray, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def parse_superblock(raw: bytes | bytearray) -> Superblock:
    """The superblock from its 1024 bytes (those at offset 1024 of the device)."""
    if len(raw) < SUPERBLOCK_SIZE:
        raise FormatError(f"ext4 superblock: {len(raw)} bytes, need {SUPERBLOCK_SIZE}")
    if _u16(raw, 0x38) != MAGIC:
        raise FormatError(f"ext4 superblock: bad magic {_u16(raw, 0x38):#x}")
    log_block = _u32(raw, 0x18)
    if log_block > 6:
        raise FormatError(f"ext4 superblock: block size 2^{10 + log_block} is out of range")
    incompat = _u32(raw, 0x60)
    wide = bool(incompat & INCOMPAT_64BIT)
    blocks = _u32(raw, 0x04) | ((_u32(raw, 0x150) << 32) if wide else 0)
    free_blocks = _u32(raw, 0x0C) | ((_u32(raw, 0x158) << 32) if wide else 0)
    rev = _u32(raw, 0x4C)
    sb = Superblock(
        inodes_count=_u32(raw, 0x00), blocks_count=blocks, free_blocks=free_blocks, free_inodes=_u32(raw, 0x10),
        first_data_block=_u32(raw, 0x14), block_size=1024 << log_block, blocks_per_group=_u32(raw, 0x20),
        inodes_per_group=_u32(raw, 0x28), state=_u16(raw, 0x3A),
        first_ino=_u32(raw, 0x54) if rev else 11, inode_size=_u16(raw, 0x58) if rev else GOOD_OLD_INODE_SIZE,
        feature_compat=_u32(raw, 0x5C), feature_incompat=incompat, feature_ro_compat=_u32(raw, 0x64),
        desc_size=(_u16(raw, 0xFE) or 32) if wide else 32, error_count=_u32(raw, 0x194),
    )
    if sb.blocks_per_group == 0 or sb.inodes_per_group == 0 or sb.blocks_count == 0:
        raise FormatError("ext4 superblock: zero blocks, blocks per group or inodes per group")
    if sb.inode_size < GOOD_OLD_INODE_SIZE or sb.inode_size > sb.block_size or sb.inode_size & (sb.inode_size - 1):
        raise FormatError(f"ext4 superblock: inode size {sb.inode_size} is not valid")
    if sb.desc_size < 32 or sb.desc_size > 1024:
        raise FormatError(f"ext4 superblock: group descriptor size {sb.desc_size} is not valid")
    if sb.inodes_per_group * sb.groups != sb.inodes_count:
        raise FormatError(f"ext4 superblock: {sb.inodes_count} inodes is not "
                          f"{sb.inodes_per_group} x {sb.groups} groups")
    return sb


def check_editable(sb: Superblock) -> None:
    """FormatError unless lazyfs can rewrite this filesystem's metadata in place."""
    if sb.feature_ro_compat & RO_COMPAT_METADATA_CSUM:
        raise FormatError("ext4 has metadata_csum: its inodes cannot be normalized without recomputing checksums")
    if sb.feature_incompat & INCOMPAT_META_BG:
        raise FormatError("ext4 uses meta_bg group descriptors, which lazyfs does not edit")
    if sb.feature_incompat & INCOMPAT_RECOVER:
        raise FormatError("ext4 needs journal recovery (it was not unmounted cleanly)")
    if not sb.state & STATE_VALID or sb.state & STATE_ERROR or sb.error_count:
        raise FormatError(f"ext4 is not clean (state {sb.state:#x}, {sb.error_count} errors recorded)")


def set_journal_flag(raw: bytearray, on: bool) -> None:
    """Switch ``has_journal`` in superblock bytes *raw* (the journal inode itself is kept)."""
    compat = _u32(raw, 0x5C)
    compat = compat | COMPAT_HAS_JOURNAL if on else compat & ~COMPAT_HAS_JOURNAL
    struct.pack_into("<I", raw, 0x5C, compat)


def normalize_superblock(raw: bytearray, stamp: int) -> bool:
    """Mount and write times := *stamp*; mount count, last mount point and write counter := 0."""
    before = bytes(raw)
    struct.pack_into("<II", raw, 0x2C, stamp, stamp)  # s_mtime, s_wtime
    struct.pack_into("<H", raw, 0x34, 0)  # s_mnt_count
    raw[0x88:0xC8] = bytes(64)  # s_last_mounted
    struct.pack_into("<Q", raw, 0x178, 0)  # s_kbytes_written
    raw[0x274] = raw[0x275] = 0  # s_wtime_hi, s_mtime_hi
    return bytes(raw) != before


@dataclass(frozen=True, slots=True)
class Group:
    inode_bitmap: int  # block numbers; -1 when the group's inodes are uninitialised
    inode_table: int


def groups(gdt: bytes | bytearray, sb: Superblock) -> list[Group]:
    """Where each group keeps its inode bitmap and inode table."""
    need = sb.groups * sb.desc_size
    if len(gdt) < need:
        raise FormatError(f"ext4 group descriptors: {len(gdt)} bytes, need {need}")
    out = []
    for g in range(sb.groups):
        off = g * sb.desc_size
        bitmap, table = _u32(gdt, off + 0x04), _u32(gdt, off + 0x08)
        if sb.desc_size >= 64:
            bitmap |= _u32(gdt, off + 0x24) << 32
            table |= _u32(gdt, off + 0x28) << 32
        flags = _u16(gdt, off + 0x12)
        if flags & BG_INODE_UNINIT and sb.feature_ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM):
            out.append(Group(-1, -1))
            continue
        for what, block in (("inode bitmap", bitmap), ("inode table", table)):
            if not 0 < block < sb.blocks_count:
                raise FormatError(f"ext4 group {g}: {what} at block {block} is outside the filesystem")
        out.append(Group(bitmap, table))
    return out


def inode_in_use(bitmap: bytes | bytearray, index: int) -> bool:
    """Whether the group's *index*-th inode (0-based) is allocated in its inode *bitmap*."""
    return bool(bitmap[index >> 3] >> (index & 7) & 1)


def gdt_location(sb: Superblock) -> tuple[int, int]:
    """Byte offset and length of the (primary) group descriptor table."""
    return (sb.first_data_block + 1) * sb.block_size, sb.groups * sb.desc_size


def _has(extra_end: int, offset: int, size: int) -> bool:
    return offset + size <= extra_end


def clear_inode(raw: bytearray, offset: int, inode_size: int) -> bool:
    """Zero a free inode's slot (the kernel leaves deletion times and old fields there)."""
    if not any(raw[offset : offset + inode_size]):
        return False
    raw[offset : offset + inode_size] = bytes(inode_size)
    return True


def normalize_inode(raw: bytearray, offset: int, inode_size: int, stamp: int) -> bool:
    """Make the allocated inode at *offset* of *raw* independent of when and by whom it was written.

    ctime and crtime := mtime (seconds and the extra nanosecond/epoch word),
    generation and the i_version counter := 0, a deletion time := *stamp*.
    All-zero slots are left alone. Returns whether anything changed.
    """
    slot = raw[offset : offset + inode_size]
    if not any(slot):
        return False
    before = bytes(slot)
    mtime = _u32(raw, offset + 0x10)
    struct.pack_into("<I", raw, offset + 0x0C, mtime)  # i_ctime
    if _u32(raw, offset + 0x14):
        struct.pack_into("<I", raw, offset + 0x14, stamp)  # i_dtime
    struct.pack_into("<I", raw, offset + 0x24, 0)  # osd1.l_i_version
    struct.pack_into("<I", raw, offset + 0x64, 0)  # i_generation
    if inode_size > GOOD_OLD_INODE_SIZE:
        extra = _u16(raw, offset + 0x80)
        end = GOOD_OLD_INODE_SIZE + min(extra, inode_size - GOOD_OLD_INODE_SIZE)
        mtime_extra = _u32(raw, offset + 0x88) if _has(end, 0x88, 4) else 0
        if _has(end, 0x84, 4):
            struct.pack_into("<I", raw, offset + 0x84, mtime_extra)  # i_ctime_extra
        if _has(end, 0x90, 4):
            struct.pack_into("<I", raw, offset + 0x90, mtime)  # i_crtime
        if _has(end, 0x94, 4):
            struct.pack_into("<I", raw, offset + 0x94, mtime_extra)  # i_crtime_extra
        if _has(end, 0x98, 4):
            struct.pack_into("<I", raw, offset + 0x98, 0)  # i_version_hi
    return bytes(raw[offset : offset + inode_size]) != before
