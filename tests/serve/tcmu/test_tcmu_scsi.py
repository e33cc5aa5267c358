"""The SCSI target core: robustness over every opcode, and field-by-field checks against SBC-3/SPC-4."""

from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.device.source import BlockSource
from lazyfs.errors import FetchError, IntegrityError
from lazyfs.serve.tcmu import scsi
from lazyfs.serve.tcmu.scsi import CHECK_CONDITION, GOOD, DeviceInfo, SenseKey
from tests.support.memory import MemorySource

SIZE = 1 << 20


def info_for(size=SIZE, block_size=512, read_only=False, name="disk0"):
    return DeviceInfo(name=name, size=size, block_size=block_size, read_only=read_only)


def assert_well_formed(result: scsi.Result, cdb: bytes, info: DeviceInfo) -> None:
    assert isinstance(result, scsi.Result)
    assert result.status in (GOOD, CHECK_CONDITION)
    if result.status == CHECK_CONDITION:
        s = result.sense
        assert len(s) == 18 and s[0] & 0x7F == 0x70 and s[7] == 10, s.hex()
        assert s[2] & 0x0F in {k.value for k in SenseKey}
        assert result.data_in == b""
    else:
        assert result.sense == b""
        assert len(result.data_in) <= info.max_transfer_bytes


def sense_of(result):
    assert result.status == CHECK_CONDITION, result
    return result.sense[2] & 0x0F, result.sense[12], result.sense[13]


def run(source, cdb, data_out=None, info=None):
    info = info or DeviceInfo.for_source(source, "disk0")
    return trio.run(scsi.execute, source, bytes(cdb), data_out, info)


# --- (b) robustness ---------------------------------------------------------------------------------


def test_every_opcode_and_cdb_length_gives_a_well_formed_result():
    """All 256 opcodes x CDB lengths 0..32, random tails, with and without data-out."""
    import random

    rng = random.Random(1)
    info = info_for()

    async def main():
        src = MemorySource(SIZE)
        for opcode in range(256):
            for length in range(0, 33):
                for _ in range(3):
                    cdb = (bytes([opcode]) + rng.randbytes(32))[:length]
                    data_out = rng.choice([None, b"", rng.randbytes(rng.choice([8, 24, 512, 4096]))])
                    result = await scsi.execute(src, cdb, data_out, info)
                    assert_well_formed(result, cdb, info)

    trio.run(main)


@settings(max_examples=400, deadline=None)
@given(opcode=st.integers(0, 255), tail=st.binary(max_size=32), length=st.integers(0, 32),
       data_out=st.one_of(st.none(), st.binary(max_size=2048)), read_only=st.booleans(),
       block_size=st.sampled_from([512, 4096]))
def test_random_cdbs_never_raise(opcode, tail, length, data_out, read_only, block_size):
    cdb = (bytes([opcode]) + tail)[:length]
    info = info_for(read_only=read_only, block_size=block_size)
    outcome = scsi.handle(cdb, data_out, info)
    assert isinstance(outcome, (scsi.Result, scsi.ReadOp, scsi.WriteOp, scsi.WriteSameOp, scsi.DiscardOp,
                                scsi.FlushOp))
    result = trio.run(scsi.execute, MemorySource(SIZE, read_only=read_only), cdb, data_out, info)
    assert_well_formed(result, cdb, info)
    if read_only and result.ok:
        assert not isinstance(outcome, (scsi.WriteOp, scsi.WriteSameOp, scsi.DiscardOp))


# --- (c) field checks --------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [512, 4096])
def test_read_capacity_16(block_size):
    info = info_for(size=(3 << 30) + 500, block_size=block_size)  # a partial last block is hidden
    r = scsi.handle(bytes([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]), None, info)
    assert r.status == GOOD and len(r.data_in) == 32
    last, bs = struct.unpack_from(">QI", r.data_in)
    assert last == (3 << 30) // block_size - 1 and bs == block_size
    assert r.data_in[13] & 0x0F == {512: 3, 4096: 0}[block_size]  # 4 KiB physical blocks
    assert r.data_in[14] & 0x80  # LBPME: UNMAP is served
    ro = scsi.handle(bytes([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]), None, info_for(read_only=True))
    assert not ro.data_in[14] & 0x80
    short = scsi.handle(bytes([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 12, 0, 0]), None, info)
    assert short.data_in == r.data_in[:12]  # allocation length
    assert sense_of(scsi.handle(bytes([0x9E, 0x11] + [0] * 14), None, info)) == (5, 0x24, 0)


def test_read_capacity_10_saturates_beyond_2tib():
    big = info_for(size=3 << 40)
    r = scsi.handle(bytes([0x25] + [0] * 9), None, big)
    assert struct.unpack(">II", r.data_in) == (0xFFFFFFFF, 512)
    small = scsi.handle(bytes([0x25] + [0] * 9), None, info_for())
    assert struct.unpack(">II", small.data_in) == (SIZE // 512 - 1, 512)
    assert sense_of(scsi.handle(bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]), None, big)) == (5, 0x24, 0)


def test_standard_inquiry():
    info = info_for()
    r = scsi.handle(bytes([0x12, 0, 0, 0, 255, 0]), None, info)
    d = r.data_in
    assert len(d) == 36 and d[0] == 0x00 and d[2] == 0x06 and d[3] & 0x0F == 2 and d[4] == len(d) - 5
    assert d[7] & 0x02  # CMDQUE
    assert d[8:16] == b"LAZYFS  "
    assert scsi.handle(bytes([0x12, 0, 0, 0, 5, 0]), None, info).data_in == d[:5]
    assert scsi.handle(bytes([0x12, 0, 0, 0, 0, 0]), None, info) == scsi.Result(GOOD)
    assert sense_of(scsi.handle(bytes([0x12, 0, 0x80, 0, 255, 0]), None, info)) == (5, 0x24, 0)  # page w/o EVPD


def vpd(page, info):
    r = scsi.handle(bytes([0x12, 1, page, 0x10, 0, 0]), None, info)
    assert r.status == GOOD, r
    d = r.data_in
    assert d[1] == page and struct.unpack_from(">H", d, 2)[0] == len(d) - 4
    return d


def test_vpd_supported_pages_are_all_served():
    info = info_for()
    pages = vpd(0x00, info)[4:]
    assert set(pages) >= {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2} and list(pages) == sorted(pages)
    for page in pages:
        vpd(page, info)
    assert sense_of(scsi.handle(bytes([0x12, 1, 0x86, 0, 255, 0]), None, info)) == (5, 0x24, 0)


def designators(page83: bytes):
    out, pos = [], 4
    while pos < len(page83):
        code_set, kind, length = page83[pos] & 0x0F, page83[pos + 1], page83[pos + 3]
        out.append((code_set, kind & 0x30, kind & 0x0F, page83[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    assert pos == len(page83)
    return out


def test_vpd_83_has_a_stable_naa_identifier():
    a1, a2, b = (designators(vpd(0x83, info_for(name=n))) for n in ("alpha", "alpha", "beta"))
    naa = [d for d in a1 if d[2] == 3]
    assert len(naa) == 1
    code_set, association, _, value = naa[0]
    assert code_set == 1 and association == 0 and len(value) == 8 and value[0] >> 4 == 3  # NAA 3, binary, LU
    assert a1 == a2  # same name, same identity
    assert [d for d in b if d[2] == 3][0][3] != value
    assert vpd(0x80, info_for(name="alpha")) == vpd(0x80, info_for(name="alpha"))
    assert vpd(0x80, info_for(name="alpha")) != vpd(0x80, info_for(name="beta"))


def test_vpd_block_limits_characteristics_provisioning():
    info = info_for()
    b0 = vpd(0xB0, info)
    assert len(b0) == 64
    assert struct.unpack_from(">I", b0, 8)[0] == info.max_transfer_blocks
    assert struct.unpack_from(">I", b0, 20)[0] == info.max_unmap_blocks
    assert struct.unpack_from(">I", b0, 24)[0] == info.max_unmap_descriptors
    assert struct.unpack_from(">Q", b0, 36)[0] == info.max_unmap_blocks  # MAXIMUM WRITE SAME LENGTH
    b1 = vpd(0xB1, info)
    assert struct.unpack_from(">H", b1, 4)[0] == 1  # non-rotating
    b2 = vpd(0xB2, info)
    assert b2[5] & 0x80 and b2[5] & 0x40 and b2[5] & 0x20  # LBPU, LBPWS, LBPWS10
    assert b2[6] & 0x07 == 2
    assert vpd(0xB2, info_for(read_only=True))[5] & 0xE0 == 0


@pytest.mark.parametrize("ten", [False, True])
@pytest.mark.parametrize("read_only", [False, True])
def test_mode_sense(ten, read_only):
    info = info_for(read_only=read_only)

    def sense(page, dbd=False, pc=0, llbaa=False):
        if ten:
            cdb = bytes([0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0), pc << 6 | page, 0, 0, 0, 0, 0x10,
                         0, 0])
        else:
            cdb = bytes([0x1A, 0x08 if dbd else 0, pc << 6 | page, 0, 255, 0])
        return scsi.handle(cdb, None, info)

    r = sense(0x3F)
    d = r.data_in
    hdr = 8 if ten else 4
    mode_len = struct.unpack_from(">H", d)[0] + 2 if ten else d[0] + 1
    assert mode_len == len(d)
    assert bool(d[3 if ten else 2] & 0x80) == read_only  # WP
    desc_len = struct.unpack_from(">H", d, 6)[0] if ten else d[3]
    assert desc_len == 8
    blocks, block_len = struct.unpack_from(">I", d, hdr)[0], struct.unpack_from(">I", d, hdr + 4)[0] & 0xFFFFFF
    assert (blocks, block_len) == (SIZE // 512, 512)
    pages = d[hdr + desc_len :]
    assert pages[0] == 0x08 and pages[1] == 0x12 and pages[20] == 0x0A and pages[21] == 0x0A and len(pages) == 32
    assert bool(pages[2] & 0x04) == (not read_only)  # WCE
    caching = sense(0x08, dbd=True).data_in
    assert caching[hdr:] == pages[:20]
    assert sense(0x0A, dbd=True).data_in[hdr:] == pages[20:32]
    changeable = sense(0x08, dbd=True, pc=1).data_in[hdr:]
    assert changeable[:2] == b"\x08\x12" and not any(changeable[2:])
    assert sense_of(sense(0x08, pc=3)) == (5, 0x39, 0)
    assert sense_of(sense(0x19)) == (5, 0x24, 0)
    if ten:
        long = sense(0x08, llbaa=True).data_in
        assert long[4] & 0x01 and struct.unpack_from(">H", long, 6)[0] == 16
        assert struct.unpack_from(">Q4xI", long, 8) == (SIZE // 512, 512)


@pytest.mark.parametrize("ten", [False, True])
def test_mode_select_accepts_current_values_only(ten):
    info = info_for()
    page = scsi.handle(bytes([0x1A, 0x08, 0x08, 0, 255, 0]), None, info).data_in[4:]
    header = bytes(8) if ten else bytes(4)
    params = header + page

    def select(data, length=None):
        length = len(data) if length is None else length
        cdb = bytes([0x55, 0x10, 0, 0, 0, 0, 0, length >> 8, length & 0xFF, 0]) if ten else \
            bytes([0x15, 0x10, 0, 0, length, 0])
        return scsi.handle(cdb, data, info)

    assert select(params).status == GOOD
    assert select(b"", 0).status == GOOD
    changed = bytearray(params)
    changed[len(header) + 2] ^= 0x04  # flip WCE
    assert sense_of(select(bytes(changed))) == (5, 0x26, 0)
    assert sense_of(select(params[:-3])) == (5, 0x1A, 0)  # page runs past the list
    assert sense_of(select(params, len(params) + 10)) == (5, 0x1A, 0)  # list longer than the data


def test_unsupported_opcode_sense_is_fixed_format_invalid_opcode():
    r = scsi.handle(bytes([0xC7] + [0] * 9), None, info_for())
    s = r.sense
    assert r.status == CHECK_CONDITION and s[0] == 0x70 and s[2] == 0x05 and (s[12], s[13]) == (0x20, 0x00)
    assert s[7] == 10 and s[15] & 0x80 and s[15] & 0x40  # SKSV, C/D: points into the CDB
    assert sense_of(scsi.handle(b"", None, info_for())) == (5, 0x20, 0)


def test_short_cdb_and_naca_are_invalid_fields():
    info = info_for()
    r = scsi.handle(bytes([0x28, 0, 0, 0]), None, info)
    assert sense_of(r) == (5, 0x24, 0)
    assert sense_of(scsi.handle(bytes([0x00, 0, 0, 0, 0, 0x04]), None, info)) == (5, 0x24, 0)
    r = scsi.handle(bytes([0x28, 0xE0, 0, 0, 0, 0, 0, 0, 1, 0]), None, info)  # RDPROTECT
    assert sense_of(r) == (5, 0x24, 0) and struct.unpack_from(">H", r.sense, 16)[0] == 1


def read16(lba, blocks):
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba, blocks, fua=False):
    return struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, blocks, 0, 0)


def test_lba_out_of_range():
    info = info_for()
    last = SIZE // 512 - 1
    assert isinstance(scsi.handle(read16(last, 1), None, info), scsi.ReadOp)
    assert sense_of(scsi.handle(read16(last, 2), None, info)) == (5, 0x21, 0)
    assert sense_of(scsi.handle(read16(2**64 - 1, 2), None, info)) == (5, 0x21, 0)
    assert sense_of(scsi.handle(write16(last + 1, 1), bytes(512), info)) == (5, 0x21, 0)
    assert sense_of(scsi.handle(bytes([0x35, 0, 0, 0, 0x10, 0, 0, 0, 0, 0]), None, info)) == (5, 0x21, 0)


def test_transfer_length_zero_and_six_byte_forms():
    info = info_for()
    assert scsi.handle(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None, info) == scsi.Result(GOOD)
    op = scsi.handle(bytes([0x08, 0, 0, 2, 0, 0]), None, info)  # READ(6): 0 blocks means 256
    assert op == scsi.ReadOp(2 * 512, 256 * 512)
    op = scsi.handle(bytes([0x0A, 0x1F, 0xFF, 0xFF, 1, 0]), bytes(512), info)  # 21-bit LBA
    assert sense_of(op) == (5, 0x21, 0)


def test_write_needs_its_data_and_honours_fua():
    info = info_for()
    assert sense_of(scsi.handle(write16(0, 2), bytes(512), info)) == (5, 0x24, 0)
    op = scsi.handle(write16(4, 1, fua=True), b"x" * 512, info)
    assert op == scsi.WriteOp(2048, b"x" * 512, True)


def test_write_same_and_unmap_decoding():
    info = info_for()
    ws16 = struct.pack(">BBQIBB", 0x93, 0x08, 10, 4, 0, 0)  # UNMAP bit
    assert scsi.handle(ws16, bytes(512), info) == scsi.DiscardOp(((5120, 2048),))
    assert scsi.handle(ws16, b"\1" * 512, info) == scsi.WriteSameOp(5120, 2048, b"\1" * 512)
    ndob = struct.pack(">BBQIBB", 0x93, 0x09, 10, 4, 0, 0)
    assert scsi.handle(ndob, None, info) == scsi.DiscardOp(((5120, 2048),))
    ws10_all = bytes([0x41, 0, 0, 0, 0, 8, 0, 0, 0, 0])  # 0 blocks: to the end of the medium
    assert scsi.handle(ws10_all, b"\2" * 512, info) == scsi.WriteSameOp(8 * 512, SIZE - 8 * 512, b"\2" * 512)
    assert sense_of(scsi.handle(bytes([0x41, 0x10, 0, 0, 0, 0, 0, 0, 1, 0]), bytes(512), info)) == (5, 0x24, 0)

    def unmap(*descs, length=None):
        body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in descs)
        params = struct.pack(">HH4x", 6 + len(body), len(body)) + body
        n = len(params) if length is None else length
        return scsi.handle(bytes([0x42, 0, 0, 0, 0, 0, 0, n >> 8, n & 0xFF, 0]), params, info)

    assert unmap((0, 8), (100, 1)) == scsi.DiscardOp(((0, 4096), (51200, 512)))
    assert unmap((0, 0)) == scsi.Result(GOOD)
    assert sense_of(unmap((SIZE // 512, 1))) == (5, 0x21, 0)
    assert sense_of(unmap((0, 1), length=4)) == (5, 0x1A, 0)
    assert sense_of(unmap(*[(i, 1) for i in range(info.max_unmap_descriptors + 1)])) == (5, 0x26, 0)


def test_read_only_device_refuses_writes_with_data_protect():
    info = info_for(read_only=True)
    for cdb, data in [(write16(0, 1), bytes(512)), (bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), bytes(512)),
                      (bytes([0x41, 0x08, 0, 0, 0, 0, 0, 0, 1, 0]), bytes(512)),
                      (bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), bytes(24))]:
        assert sense_of(scsi.handle(cdb, data, info)) == (7, 0x27, 0)


def test_report_luns_and_simple_commands():
    info = info_for()
    r = scsi.handle(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]), None, info)
    assert r.data_in == struct.pack(">II8x", 8, 0)
    assert sense_of(scsi.handle(bytes([0xA0] + [0] * 8 + [8, 0, 0]), None, info)) == (5, 0x24, 0)
    for cdb in ([0x00] + [0] * 5, [0x1B, 0, 0, 0, 1, 0], [0x1E, 0, 0, 0, 1, 0], [0x2F] + [0] * 9):
        assert scsi.handle(bytes(cdb), None, info) == scsi.Result(GOOD)
    rs = scsi.handle(bytes([0x03, 0, 0, 0, 252, 0]), None, info)
    assert rs.data_in[0] == 0x70 and rs.data_in[2] == 0


class FailingSource(BlockSource):
    """Raises *exc* from every read and write (a fault-injecting wrapper of a memory source)."""

    def __init__(self, exc):
        self.inner = MemorySource(SIZE)
        self.size = SIZE
        self.read_only = False
        self.exc = exc

    async def read(self, offset, length):
        raise self.exc

    async def write(self, offset, data):
        raise self.exc


@pytest.mark.parametrize("exc", [IntegrityError("chunk", "aa", "bb"), FetchError("registry gone", 503)])
def test_integrity_and_fetch_errors_are_medium_errors(exc):
    src = FailingSource(exc)
    assert sense_of(run(src, read16(0, 8))) == (3, 0x11, 0)
    assert sense_of(run(src, write16(0, 1), bytes(512))) == (3, 0x11, 0)


def test_io_through_execute_matches_the_source():
    async def main():
        src = MemorySource(SIZE)
        info = DeviceInfo.for_source(src, "d", block_size=4096)
        data = bytes(range(256)) * 32
        assert (await scsi.execute(src, write16(3, 2, fua=True), data, info)).ok
        assert src.flushes == 1
        assert (await scsi.execute(src, read16(3, 2), None, info)).data_in == data
        ws = struct.pack(">BBIBHB", 0x41, 0, 1, 0, 5, 0)
        assert (await scsi.execute(src, ws, b"\7" * 4096, info)).ok
        assert bytes(src.data[4096 : 6 * 4096]) == b"\7" * 5 * 4096
        sync = await scsi.execute(src, bytes([0x91] + [0] * 15), None, info)
        assert sync.ok and src.flushes == 2

    trio.run(main)
