"""The sans-IO ring over hand-built regions: parsing, PAD/TMR, completion disciplines, bad input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.errors import FormatError
from lazyfs.serve.tcmu import ring as R

CMDR_OFF = 128
CMDR_SIZE = 2048
DATA_OFF = CMDR_OFF + CMDR_SIZE
REGION = DATA_OFF + 64 * 1024


class Builder:
    """Writes entries the way the kernel lays them out (independent of tests.support.tcmu_kernel)."""

    def __init__(self, flags=R.CAP_OOOC | R.CAP_READ_LEN | R.CAP_TMR, head=0):
        self.mem = bytearray(REGION)
        struct.pack_into("<HHIII", self.mem, 0, 2, flags, CMDR_OFF, CMDR_SIZE, head)
        struct.pack_into("<I", self.mem, 64, head)
        self.head = head

    def _publish(self, size):
        self.head = (self.head + size) % CMDR_SIZE
        struct.pack_into("<I", self.mem, 12, self.head)

    def cmd(self, cmd_id, cdb, iovecs=()):
        base_size = max(48 + 16 * len(iovecs), 112)
        size = base_size + (len(cdb) + 7) // 8 * 8
        if CMDR_SIZE - self.head < size:
            self.pad()
        base = CMDR_OFF + self.head
        self.mem[base : base + size] = bytes(size)
        struct.pack_into("<IHBB", self.mem, base, size | 1, cmd_id, 0, 0)
        struct.pack_into("<I", self.mem, base + R.REQ_IOV_CNT, len(iovecs))
        struct.pack_into("<Q", self.mem, base + R.REQ_CDB_OFF, base + base_size)
        for i, (off, n) in enumerate(iovecs):
            struct.pack_into("<QQ", self.mem, base + R.REQ_IOV + 16 * i, off, n)
        self.mem[base + base_size : base + base_size + len(cdb)] = cdb
        pos = self.head
        self._publish(size)
        return pos

    def pad(self):
        size = CMDR_SIZE - self.head
        struct.pack_into("<IHBB", self.mem, CMDR_OFF + self.head, size | 0, 0, 0, 0)
        self._publish(size)

    def raw(self, len_op, body=b""):
        base = CMDR_OFF + self.head
        struct.pack_into("<I", self.mem, base, len_op)
        self.mem[base + 8 : base + 8 + len(body)] = body
        self._publish(len_op & ~7)

    def tmr(self, tmr_type, ids):
        size = (32 + 2 * len(ids) + 7) // 8 * 8
        if CMDR_SIZE - self.head < size:
            self.pad()
        base = CMDR_OFF + self.head
        struct.pack_into("<IHBB", self.mem, base, size | 2, 0, 0, 0)
        self.mem[base + R.TMR_TYPE] = tmr_type
        struct.pack_into("<I", self.mem, base + R.TMR_CMD_CNT, len(ids))
        struct.pack_into(f"<{len(ids)}H", self.mem, base + 32, *ids)
        self._publish(size)

    @property
    def tail(self):
        return struct.unpack_from("<I", self.mem, 64)[0]

    def slot(self, pos):
        base = CMDR_OFF + pos
        len_op, cmd_id, kflags, uflags = struct.unpack_from("<IHBB", self.mem, base)
        status = self.mem[base + R.RSP_SCSI_STATUS]
        read_len = struct.unpack_from("<I", self.mem, base + R.RSP_READ_LEN)[0]
        sense = bytes(self.mem[base + 16 : base + 112])
        return dict(len=len_op & ~7, op=len_op & 7, cmd_id=cmd_id, uflags=uflags, status=status,
                    read_len=read_len, sense=sense)


READ10 = bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0])


def test_parses_commands_with_iovecs_and_cdb():
    b = Builder()
    ring = R.Ring(memoryview(b.mem))
    b.cmd(7, READ10, [(DATA_OFF, 4096), (DATA_OFF + 8192, 100)])
    b.cmd(9, bytes(16))
    events = ring.receive()
    assert events == [
        R.Command(7, READ10, (R.Iovec(DATA_OFF, 4096), R.Iovec(DATA_OFF + 8192, 100))),
        R.Command(9, bytes(6), ()),  # opcode 0 is a 6-byte CDB; the rest of the room is padding
    ]
    assert events[0].data_length == 4196
    assert ring.receive() == []
    assert ring.inflight == 2


def test_in_order_completion_advances_only_over_the_answered_prefix():
    b = Builder(flags=R.CAP_READ_LEN)  # no CAP_OOOC
    ring = R.Ring(memoryview(b.mem))
    assert not ring.out_of_order
    p1, p2, p3 = b.cmd(1, READ10), b.cmd(2, READ10), b.cmd(3, READ10)
    ring.receive()
    assert ring.complete(2, 0) is False
    assert b.tail == 0
    assert ring.complete(3, 0) is False
    assert b.slot(p2)["cmd_id"] == 2 and b.slot(p3)["cmd_id"] == 3
    assert ring.complete(1, 2, b"\x70\x00\x05") is True
    assert b.tail == b.head
    assert b.slot(p1)["status"] == 2 and b.slot(p1)["sense"].startswith(b"\x70\x00\x05")


def test_out_of_order_completion_uses_the_oldest_slot():
    b = Builder()
    ring = R.Ring(memoryview(b.mem))
    assert ring.out_of_order
    p1, p2 = b.cmd(1, READ10), b.cmd(2, READ10)
    ring.receive()
    assert ring.complete(2, 0, read_len=512) is True
    assert b.tail == p2  # the first slot now carries command 2's answer
    s = b.slot(p1)
    assert (s["cmd_id"], s["status"], s["read_len"], s["uflags"]) == (2, 0, 512, R.UFLAG_READ_LEN)
    assert s["len"] == p2 - p1  # the length is never touched
    assert ring.complete(1, 0) is True
    assert b.slot(p2)["cmd_id"] == 1 and b.tail == b.head


def test_read_len_only_when_the_kernel_offers_it():
    b = Builder(flags=R.CAP_OOOC)
    ring = R.Ring(memoryview(b.mem))
    p = b.cmd(1, READ10)
    ring.receive()
    ring.complete(1, 0, read_len=100)
    assert b.slot(p)["uflags"] == 0 and b.slot(p)["read_len"] == 0


def test_pad_and_wrap_around():
    b = Builder(head=CMDR_SIZE - 200)  # the first entry fits, the second needs a PAD and wraps
    ring = R.Ring(memoryview(b.mem))
    b.cmd(1, READ10)
    pos2 = b.cmd(2, READ10)
    assert pos2 == 0
    ids = [e.cmd_id for e in ring.receive()]
    assert ids == [1, 2]
    ring.complete(1, 0)
    ring.complete(2, 0)
    assert b.tail == b.head == 128


def test_tmr_entries_are_events_and_need_no_answer():
    b = Builder()
    ring = R.Ring(memoryview(b.mem))
    b.cmd(1, READ10)
    b.tmr(R.TMR_ABORT_TASK, [1, 77])
    b.cmd(2, READ10)
    events = ring.receive()
    assert events[1] == R.TaskManagement(R.TMR_ABORT_TASK, (1, 77))
    ring.complete(2, 0)
    ring.complete(1, 0)
    assert b.tail == b.head


def test_unknown_entry_opcode_gets_unknown_op_and_is_passed():
    b = Builder()
    ring = R.Ring(memoryview(b.mem))
    b.raw(64 | 5)
    assert ring.receive() == []
    assert b.slot(0)["uflags"] & R.UFLAG_UNKNOWN_OP
    assert b.tail == 64


def test_unknown_op_completion_flag():
    b = Builder()
    ring = R.Ring(memoryview(b.mem))
    p = b.cmd(1, bytes([0xC0] + [0] * 15))
    ring.receive()
    ring.complete(1, 0, unknown_op=True)
    assert b.slot(p)["uflags"] == R.UFLAG_UNKNOWN_OP


def test_completing_a_command_not_in_flight_is_an_error():
    b = Builder()
    ring = R.Ring(memoryview(b.mem))
    with pytest.raises(KeyError):
        ring.complete(5, 0)


@pytest.mark.parametrize("case", ["zero-length", "past-head", "huge-iov-count", "iov-outside", "cdb-outside",
                                  "short-cmd", "misaligned-head", "duplicate-id"])
def test_malformed_entries_raise_format_error(case):
    b = Builder()
    ring = R.Ring(memoryview(b.mem))
    if case == "zero-length":
        struct.pack_into("<I", b.mem, 12, 64)
    elif case == "past-head":
        b.cmd(1, READ10)
        struct.pack_into("<I", b.mem, CMDR_OFF, 1024 | 1)
    elif case == "huge-iov-count":
        b.cmd(1, READ10)
        struct.pack_into("<I", b.mem, CMDR_OFF + 8, 0xFFFFFFFF)
    elif case == "iov-outside":
        b.cmd(1, READ10, [(REGION - 10, 4096)])
    elif case == "cdb-outside":
        b.cmd(1, READ10)
        struct.pack_into("<Q", b.mem, CMDR_OFF + 24, REGION + 5)
    elif case == "short-cmd":
        b.raw(16 | 1)
    elif case == "misaligned-head":
        struct.pack_into("<I", b.mem, 12, 13)
    elif case == "duplicate-id":
        b.cmd(1, READ10)
        b.cmd(1, READ10)
    with pytest.raises(FormatError):
        ring.receive()


@pytest.mark.parametrize("field,value", [("version", 1), ("cmdr_off", 8), ("cmdr_size", 1 << 30), ("tail", 3)])
def test_bad_mailbox_is_rejected(field, value):
    b = Builder()
    offsets = {"version": (0, "<H"), "cmdr_off": (4, "<I"), "cmdr_size": (8, "<I"), "tail": (64, "<I")}
    off, fmt = offsets[field]
    struct.pack_into(fmt, b.mem, off, value)
    with pytest.raises(FormatError):
        R.Ring(memoryview(b.mem))


def test_scsi_command_size_follows_the_opcode_group():
    assert [R.scsi_command_size(bytes([op])) for op in (0x00, 0x28, 0x5A, 0xA8, 0x88, 0xA0, 0xC0, 0xE0)] == \
        [6, 10, 10, 12, 16, 12, 10, 10]
    assert R.scsi_command_size(bytes([0x7F, 0, 0, 0, 0, 0, 0, 24])) == 32


iovec_lists = st.lists(st.integers(1, 300), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(lengths=iovec_lists, data=st.data())
def test_gather_scatter_cross_every_iovec_boundary(lengths, data):
    region = bytearray(8192)
    mem = memoryview(region)
    # non-contiguous, out-of-order pieces
    slots = data.draw(st.permutations(range(len(lengths))))
    iovecs = tuple(R.Iovec(slot * 400 + 7, n) for slot, n in zip(slots, lengths))
    total = sum(lengths)
    offset = data.draw(st.integers(0, total))
    payload = data.draw(st.binary(min_size=0, max_size=total + 50))
    copied = R.scatter(mem, iovecs, payload, offset)
    assert copied == min(len(payload), total - offset)
    model = bytearray(b"".join(bytes(region[i.offset : i.offset + i.length]) for i in iovecs))
    assert model[offset : offset + copied] == payload[:copied]
    length = data.draw(st.integers(0, total + 10))
    start = data.draw(st.integers(0, total))
    assert R.gather(mem, iovecs, start, length) == bytes(model[start : start + length])
    R.fill(mem, iovecs, start)
    assert R.gather(mem, iovecs) == bytes(model[:start]) + bytes(total - start)
