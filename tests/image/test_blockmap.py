"""blockmap: FIEMAP extents and tar data segments -> mapped extents, proven against the disk file."""

from __future__ import annotations

import os

from lazyfs.format.spanindex import MappedExtent
from lazyfs.image.blockmap import data_segments, file_extents, verified_extents, without_mapped

BS = 4096


def test_a_plain_file_maps_whole_blocks_and_its_tail():
    segs = data_segments(1536, 3 * BS + 100, None)
    got = list(file_extents([(0, 40 * BS, 4 * BS)], segs))
    assert got == [MappedExtent(40, 4, 1536, 3 * BS + 100)]
    # two physical extents: two mapped extents, tar offsets following the file
    got = list(file_extents([(0, 40 * BS, 2 * BS), (2 * BS, 90 * BS, 2 * BS)], segs))
    assert got == [MappedExtent(40, 2, 1536, 2 * BS), MappedExtent(90, 2, 1536 + 2 * BS, BS + 100)]


def test_sparse_regions_map_separately_and_unaligned_starts_skip_a_block():
    segs = data_segments(512, 0, [(0, BS), (10 * BS, 2 * BS), (20 * BS + 7, BS)])
    assert segs == [(0, BS, 512), (10 * BS, 2 * BS, 512 + BS), (20 * BS + 7, BS, 512 + 3 * BS)]
    got = list(file_extents([(0, 100 * BS, BS), (10 * BS, 200 * BS, 2 * BS), (20 * BS, 300 * BS, 2 * BS)], segs))
    # the region starting 7 bytes into a block has no whole block of its own start: its second block maps
    assert got == [MappedExtent(100, 1, 512, BS), MappedExtent(200, 2, 512 + BS, 2 * BS),
                   MappedExtent(301, 1, 512 + 3 * BS + BS - 7, 7)]


def test_only_blocks_holding_their_bytes_are_kept(tmp_path):
    spool = os.urandom(8 * BS)
    disk = bytearray(64 * BS)
    disk[10 * BS:13 * BS] = spool[0:3 * BS]  # extent A: good
    disk[20 * BS:22 * BS] = spool[BS:3 * BS]
    disk[21 * BS + 5] ^= 1  # extent B: its second block differs
    disk[30 * BS:30 * BS + 100] = spool[5 * BS:5 * BS + 100]  # extent C: a tail, zeros after it
    disk[30 * BS + 200] = 1  # ...but not zeros: refused
    (tmp_path / "disk").write_bytes(bytes(disk))
    (tmp_path / "spool").write_bytes(spool)
    got = verified_extents(str(tmp_path / "disk"), str(tmp_path / "spool"), [
        MappedExtent(10, 3, 0, 3 * BS), MappedExtent(20, 2, BS, 2 * BS), MappedExtent(30, 1, 5 * BS, 100),
        MappedExtent(11, 1, 0, BS)])  # claims a block already proven by A: dropped
    assert got == [MappedExtent(10, 3, 0, 3 * BS), MappedExtent(20, 1, BS, BS)]


def test_pieces_lose_their_mapped_blocks():
    data = bytes(range(256)) * 16 * 10  # 10 blocks
    pieces = [(100, data, 10), (200, None, 5)]
    mapped = [MappedExtent(102, 3, 0, 3 * BS), MappedExtent(109, 5, 0, 5 * BS), MappedExtent(201, 1, 0, 10)]
    got = list(without_mapped(pieces, mapped))
    assert [(s, n) for s, _, n in got] == [(100, 2), (105, 4), (200, 1), (202, 3)]
    assert got[1][1] == data[5 * BS:9 * BS] and got[2][1] is None
