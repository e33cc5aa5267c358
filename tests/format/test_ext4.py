"""ext4 superblock, group descriptors and inode normalization (on bytes mkfs.ext4 really wrote)."""

import os
import struct
import subprocess

import pytest

from lazyfs.errors import FormatError
from lazyfs.format import ext4


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ext4") / "fs.img")
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-O", "^metadata_csum", path], check=True)
    with open(path, "rb") as f:
        return f.read()


def test_parse_superblock(image):
    sb = ext4.parse_superblock(image[1024:2048])
    assert sb.block_size == 4096 and sb.blocks_count == (64 << 20) // 4096 and sb.size == 64 << 20
    assert sb.inode_size == 256 and sb.has_journal and sb.first_ino == 11
    assert sb.inodes_count == sb.inodes_per_group * sb.groups
    ext4.check_editable(sb)
    offset, length = ext4.gdt_location(sb)
    groups = ext4.groups(image[offset : offset + length], sb)
    assert len(groups) == sb.groups and all(0 < g.inode_table < sb.blocks_count for g in groups)
    root = groups[0].inode_table * 4096 + 1 * 256  # inode 2
    assert struct.unpack_from("<H", image, root)[0] & 0o170000 == 0o040000  # a directory
    bitmap = image[groups[0].inode_bitmap * 4096 :][:4096]
    assert ext4.inode_in_use(bitmap, 1) and ext4.inode_in_use(bitmap, 10)  # root, lost+found
    assert not ext4.inode_in_use(bitmap, 11)


def test_bad_superblocks_are_rejected(image):
    raw = bytearray(image[1024:2048])
    with pytest.raises(FormatError, match="magic"):
        ext4.parse_superblock(raw[:0x38] + b"\0\0" + raw[0x3A:])
    with pytest.raises(FormatError, match="need 1024"):
        ext4.parse_superblock(raw[:100])
    csum = bytearray(raw)
    struct.pack_into("<I", csum, 0x64, struct.unpack_from("<I", raw, 0x64)[0] | ext4.RO_COMPAT_METADATA_CSUM)
    with pytest.raises(FormatError, match="metadata_csum"):
        ext4.check_editable(ext4.parse_superblock(csum))
    dirty = bytearray(raw)
    struct.pack_into("<H", dirty, 0x3A, ext4.STATE_ERROR)
    with pytest.raises(FormatError, match="not clean"):
        ext4.check_editable(ext4.parse_superblock(dirty))


def test_journal_flag_and_superblock_normalization(image):
    raw = bytearray(image[1024:2048])
    ext4.set_journal_flag(raw, False)
    assert not ext4.parse_superblock(raw).has_journal
    ext4.set_journal_flag(raw, True)
    assert ext4.parse_superblock(raw) == ext4.parse_superblock(image[1024:2048])
    struct.pack_into("<IIH", raw, 0x2C, 123, 456, 7)
    raw[0x88:0x90] = b"/mnt/xyz"
    assert ext4.normalize_superblock(raw, 1000)
    assert struct.unpack_from("<IIH", raw, 0x2C) == (1000, 1000, 0) and not any(raw[0x88:0xC8])
    assert not ext4.normalize_superblock(raw, 1000)  # idempotent


def test_inode_normalization():
    slot = bytearray(256)
    struct.pack_into("<HH", slot, 0, 0o100644, 0)
    struct.pack_into("<III", slot, 0x08, 111, 222, 333)  # atime, ctime, mtime
    struct.pack_into("<I", slot, 0x64, 0xDEADBEEF)  # generation
    struct.pack_into("<I", slot, 0x24, 5)  # version
    struct.pack_into("<H", slot, 0x80, 32)  # extra isize
    struct.pack_into("<IIII", slot, 0x84, 9, 8, 7, 444)  # ctime, mtime, atime extra; crtime
    struct.pack_into("<I", slot, 0x94, 6)
    assert ext4.normalize_inode(slot, 0, 256, 1000)
    assert struct.unpack_from("<III", slot, 0x08) == (111, 333, 333)
    assert struct.unpack_from("<I", slot, 0x14)[0] == 0  # not deleted: no dtime invented
    assert struct.unpack_from("<I", slot, 0x64)[0] == 0 and struct.unpack_from("<I", slot, 0x24)[0] == 0
    assert struct.unpack_from("<IIIII", slot, 0x84) == (8, 8, 7, 333, 8)
    assert not ext4.normalize_inode(slot, 0, 256, 1000)
    deleted = bytearray(slot)
    struct.pack_into("<I", deleted, 0x14, 1234567)
    assert ext4.normalize_inode(deleted, 0, 256, 1000) and struct.unpack_from("<I", deleted, 0x14)[0] == 1000
    empty = bytearray(256)
    assert not ext4.normalize_inode(empty, 0, 256, 1000) and empty == bytearray(256)
    assert ext4.clear_inode(deleted, 0, 256) and deleted == bytearray(256)
    assert not ext4.clear_inode(deleted, 0, 256)
    small = bytearray(slot[:128])  # 128-byte inodes have no extra fields
    struct.pack_into("<I", small, 0x0C, 1)
    assert ext4.normalize_inode(small, 0, 128, 1000) and struct.unpack_from("<I", small, 0x0C)[0] == 333


def test_normalizing_a_real_filesystem_keeps_it_valid(tmp_path, image):
    path = str(tmp_path / "fs.img")
    with open(path, "wb") as f:
        f.write(image)
    raw = bytearray(image[1024:2048])
    sb = ext4.parse_superblock(raw)
    offset, length = ext4.gdt_location(sb)
    changed = 0
    with open(path, "r+b") as f:
        for group in ext4.groups(image[offset : offset + length], sb):
            block = group.inode_table
            table = bytearray(image[block * 4096 : block * 4096 + sb.inodes_per_group * 256])
            changed += sum(ext4.normalize_inode(table, i, 256, 1000) for i in range(0, len(table), 256))
            os.pwrite(f.fileno(), bytes(table), block * 4096)
        ext4.normalize_superblock(raw, 1000)
        os.pwrite(f.fileno(), bytes(raw), 1024)
    fsck = subprocess.run(["e2fsck", "-fn", path], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
