"""The TCMU command ring, sans-IO: a state machine over the shared memory region.

Layout and rules follow the kernel uapi ``include/uapi/linux/target_core_user.h``
(struct offsets are checked against the C header by a test):

* offset 0: ``struct tcmu_mailbox`` — ``version, flags, cmdr_off, cmdr_size,
  cmd_head`` written by the kernel, ``cmd_tail`` (own cache line, offset 64)
  written by us;
* ``[cmdr_off, cmdr_off + cmdr_size)``: the command ring of entries, each
  8-byte aligned and contiguous (the kernel inserts a PAD entry instead of
  wrapping an entry around the end);
* after the ring: the data area, addressed by iovecs whose ``iov_base`` is an
  offset from the start of the region.

``Ring.receive()`` parses the entries the kernel added since the last call
(between our cursor and ``cmd_head``) into :class:`Command` and
:class:`TaskManagement` events. ``Ring.complete()`` writes a response and moves
``cmd_tail``. The kernel consumes responses strictly in ring order starting at
``cmd_tail`` and finds the command by the ``cmd_id`` in each slot, so:

* with ``TCMU_MAILBOX_FLAG_CAP_OOOC`` (every kernel since 4.x sets it) a
  response goes into the oldest unanswered CMD slot, whatever command it
  originally held, and the tail moves at once — a slow command never holds
  back the others (this is what tcmu-runner does);
* without it, a response is written into its own slot and the tail only moves
  over the prefix of answered slots (completed set, advanced in order).

A *restartable* ring (``Ring(..., restartable=True)``, what the daemon uses) survives the death
of its owner: the uio fd is kept (docs/daemon.md "TCMU LUNs across a restart") and a new
``Ring`` over the same region re-parses every entry between ``cmd_tail`` and ``cmd_head``.
That is only sound when the ring says, by itself, which of those entries are still requests:

* completion is in order (no OOOC): a response only ever goes into its own command's slot, so
  an out-of-order response never overwrites the request of a command still in flight (with
  OOOC it does, and that request then lives only in the dead owner's memory);
* a response is written in two marked steps: the slot's uflags get ``UFLAG_ANSWERING`` first,
  then the response fields, then one 4-byte store of ``cmd_id, kflags, uflags`` with
  ``UFLAG_ANSWERED``; the kernel ignores uflags bits it does not know.

A new owner then finds, in ``[cmd_tail, cmd_head)``: requests (uflags 0: served again —
every SCSI command lazyfs implements is idempotent), answered slots (``UFLAG_ANSWERED``:
the tail moves over them) and at most one torn response (``UFLAG_ANSWERING`` alone: the
request is garbled, so it is answered with BUSY, which the initiator's SCSI layer retries).

PAD and TMR entries need no response; the tail moves over them as soon as
everything before them is answered. An entry with an opcode we do not know is
answered with ``TCMU_UFLAG_UNKNOWN_OP``.

Nothing from the ring is trusted: lengths, counts and offsets are checked
against the region before use, and a violation raises FormatError (the ring is
then broken; the caller stops serving it).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Union

from lazyfs.errors import FormatError

# --- constants from target_core_user.h -------------------------------------------------

MAILBOX_VERSION = 2  # TCMU_MAILBOX_VERSION
ALIGN_SIZE = 64  # ALIGN_SIZE: cmd_tail sits on its own cache line
CAP_OOOC = 1 << 0  # TCMU_MAILBOX_FLAG_CAP_OOOC: out-of-order completions
CAP_READ_LEN = 1 << 1  # TCMU_MAILBOX_FLAG_CAP_READ_LEN
CAP_TMR = 1 << 2  # TCMU_MAILBOX_FLAG_CAP_TMR
CAP_KEEP_BUF = 1 << 3  # TCMU_MAILBOX_FLAG_CAP_KEEP_BUF

OP_PAD = 0  # TCMU_OP_PAD
OP_CMD = 1  # TCMU_OP_CMD
OP_TMR = 2  # TCMU_OP_TMR
OP_MASK = 0x7  # TCMU_OP_MASK
OP_ALIGN_SIZE = 8  # TCMU_OP_ALIGN_SIZE == sizeof(__u64)

UFLAG_UNKNOWN_OP = 0x1  # TCMU_UFLAG_UNKNOWN_OP
UFLAG_READ_LEN = 0x2  # TCMU_UFLAG_READ_LEN
UFLAG_KEEP_BUF = 0x4  # TCMU_UFLAG_KEEP_BUF
# lazyfs's own marks in a response's uflags (the kernel ignores bits it does not know): a new
# owner of a restartable ring tells responses from requests by them
UFLAG_ANSWERING = 0x40  # response being written: the slot's request is no longer intact
UFLAG_ANSWERED = 0x80  # response complete
STATUS_BUSY = 0x08  # SAM_STAT_BUSY: the initiator retries the command

SENSE_BUFFERSIZE = 96  # TCMU_SENSE_BUFFERSIZE

TMR_UNKNOWN = 0
TMR_ABORT_TASK = 1
TMR_ABORT_TASK_SET = 2
TMR_CLEAR_ACA = 3
TMR_CLEAR_TASK_SET = 4
TMR_LUN_RESET = 5
TMR_TARGET_WARM_RESET = 6
TMR_TARGET_COLD_RESET = 7
TMR_LUN_RESET_PRO = 128

# --- struct layout (native byte order, as the kernel writes it) ------------------------

# struct tcmu_mailbox (packed, cmd_tail aligned to ALIGN_SIZE => sizeof == 128)
MB_VERSION = 0
MB_FLAGS = 2
MB_CMDR_OFF = 4
MB_CMDR_SIZE = 8
MB_CMD_HEAD = 12
MB_CMD_TAIL = 64
MAILBOX_SIZE = 128
_MAILBOX_HEAD = struct.Struct("=HHIII")  # version .. cmd_head

# struct tcmu_cmd_entry_hdr
HDR_LEN_OP = 0
HDR_CMD_ID = 4
HDR_KFLAGS = 6
HDR_UFLAGS = 7
HDR_SIZE = 8
_HDR = struct.Struct("=IHBB")

# struct tcmu_cmd_entry: the req/rsp union is an unpacked struct inside the packed entry
REQ_IOV_CNT = 8
REQ_IOV_BIDI_CNT = 12
REQ_IOV_DIF_CNT = 16
REQ_CDB_OFF = 24
REQ_IOV = 48
RSP_SCSI_STATUS = 8
RSP_READ_LEN = 12
RSP_SENSE_BUFFER = 16
CMD_ENTRY_SIZE = 112  # sizeof(struct tcmu_cmd_entry)
IOVEC_SIZE = 16  # sizeof(struct iovec) on 64-bit
IOVEC_BASE = 0
IOVEC_LEN = 8

# struct tcmu_tmr_entry
TMR_TYPE = 8
TMR_CMD_CNT = 12
TMR_CMD_IDS = 32
TMR_ENTRY_SIZE = 32

# Every field below is read and written at its own offset constant (checked against the
# C header), never through a multi-field format whose padding could drift.
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_HDR_ID_FLAGS_PACK = struct.Struct("=HBB")  # cmd_id, kflags, uflags: header bytes 4..8
_HDR_ID_FLAGS = struct.Struct("=I")

# scsi_command_size(): CDB length by opcode group; 0x7f is variable length
_GROUP_CDB_SIZE = (6, 10, 10, 12, 16, 12, 10, 10)
VARIABLE_LENGTH_CMD = 0x7F
MAX_CDB_SIZE = 260  # 8 + 252, the largest variable-length CDB


def scsi_command_size(cdb: bytes) -> int:
    """The CDB length the kernel copies into the ring for a CDB starting with *cdb*."""
    if not cdb:
        return 6
    if cdb[0] == VARIABLE_LENGTH_CMD:
        return (cdb[7] if len(cdb) > 7 else 0) + 8
    return _GROUP_CDB_SIZE[(cdb[0] >> 5) & 7]


def align_up(value: int, alignment: int = OP_ALIGN_SIZE) -> int:
    """*value* rounded up to a multiple of *alignment*."""
    return (value + alignment - 1) // alignment * alignment


def cmd_entry_size(iov_count: int, cdb_length: int) -> tuple[int, int]:
    """``(base_size, entry_size)`` of a CMD entry, exactly as the kernel sizes it.

    The base is ``max(offsetof(req.iov[iov_count]), sizeof(tcmu_cmd_entry))``
    (room for the response); the CDB follows the base, padded to 8 bytes.
    """
    base = max(REQ_IOV + IOVEC_SIZE * iov_count, CMD_ENTRY_SIZE)
    return base, base + align_up(cdb_length)


def tmr_entry_size(cmd_count: int) -> int:
    """Size of a TMR entry listing *cmd_count* command ids."""
    return align_up(TMR_ENTRY_SIZE + 2 * cmd_count)


# --- values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mailbox:
    """The mailbox at offset 0 of the region."""

    version: int
    flags: int
    cmdr_off: int
    cmdr_size: int
    cmd_head: int
    cmd_tail: int


@dataclass(frozen=True, slots=True)
class Iovec:
    """A data buffer: *offset* from the start of the region, *length* bytes."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Command:
    """A SCSI command taken from the ring.

    ``iovecs`` is the data buffer (data-out for writes, data-in for reads);
    ``bidi_iovecs`` the data-in buffer of a bidirectional command.
    """

    cmd_id: int
    cdb: bytes
    iovecs: tuple[Iovec, ...]
    bidi_iovecs: tuple[Iovec, ...] = ()
    kflags: int = 0

    @property
    def data_length(self) -> int:
        return sum(iov.length for iov in self.iovecs)


@dataclass(frozen=True, slots=True)
class TaskManagement:
    """A task management notification (abort, reset) naming in-flight commands."""

    tmr_type: int
    cmd_ids: tuple[int, ...]


Event = Union[Command, TaskManagement]


def read_mailbox(region: memoryview) -> Mailbox:
    """The mailbox as it is now."""
    if len(region) < MAILBOX_SIZE:
        raise FormatError(f"TCMU region of {len(region)} bytes is smaller than the mailbox")
    version, flags, cmdr_off, cmdr_size, head = _MAILBOX_HEAD.unpack_from(region, 0)
    (tail,) = _U32.unpack_from(region, MB_CMD_TAIL)
    return Mailbox(version, flags, cmdr_off, cmdr_size, head, tail)


def gather(region: memoryview, iovecs: tuple[Iovec, ...], offset: int = 0, length: int | None = None) -> bytes:
    """Bytes ``[offset, offset+length)`` of the buffer described by *iovecs*, across iovec boundaries.

    Short only where the buffer ends.
    """
    want = sum(iov.length for iov in iovecs) - offset if length is None else length
    parts: list[bytes] = []
    for iov in iovecs:
        if want <= 0:
            break
        if offset >= iov.length:
            offset -= iov.length
            continue
        n = min(iov.length - offset, want)
        start = iov.offset + offset
        parts.append(bytes(region[start : start + n]))
        want -= n
        offset = 0
    return b"".join(parts)


def scatter(region: memoryview, iovecs: tuple[Iovec, ...], data: bytes, offset: int = 0) -> int:
    """Copy *data* into the buffer described by *iovecs* starting at *offset*; returns bytes copied.

    Data beyond the end of the buffer is dropped.
    """
    src = memoryview(data)
    done = 0
    for iov in iovecs:
        if done >= len(src):
            break
        if offset >= iov.length:
            offset -= iov.length
            continue
        n = min(iov.length - offset, len(src) - done)
        start = iov.offset + offset
        region[start : start + n] = src[done : done + n]
        done += n
        offset = 0
    return done


def fill(region: memoryview, iovecs: tuple[Iovec, ...], offset: int = 0, byte: int = 0) -> None:
    """Set the buffer described by *iovecs* to *byte* from *offset* to its end."""
    for iov in iovecs:
        if offset >= iov.length:
            offset -= iov.length
            continue
        n = iov.length - offset
        start = iov.offset + offset
        region[start : start + n] = bytes([byte]) * n
        offset = 0


@dataclass(slots=True)
class _Slot:
    """A parsed ring entry not yet behind cmd_tail."""

    pos: int
    length: int
    op: int
    cmd_id: int
    answered: bool = False


class Ring:
    """Userspace side of one TCMU command ring over *region* (the mmapped map0).

    *out_of_order* picks the completion discipline; by default it follows the
    kernel's ``CAP_OOOC`` flag. Not thread-safe; drive it from one trio thread.
    """

    def __init__(self, region: memoryview, *, out_of_order: bool | None = None, restartable: bool = False) -> None:
        mem = memoryview(region)
        if mem.format != "B" or mem.ndim != 1:
            mem = mem.cast("B")
        self._mem = mem
        mb = read_mailbox(mem)
        if mb.version != MAILBOX_VERSION:
            raise FormatError(f"TCMU mailbox version {mb.version}, expected {MAILBOX_VERSION}")
        if mb.cmdr_off < MAILBOX_SIZE or mb.cmdr_off % OP_ALIGN_SIZE:
            raise FormatError(f"TCMU cmdr_off {mb.cmdr_off} overlaps the mailbox or is misaligned")
        if mb.cmdr_size < 2 * CMD_ENTRY_SIZE or mb.cmdr_size % OP_ALIGN_SIZE:
            raise FormatError(f"TCMU cmdr_size {mb.cmdr_size} too small or misaligned")
        if mb.cmdr_off + mb.cmdr_size > len(mem):
            raise FormatError(
                f"TCMU ring [{mb.cmdr_off}, {mb.cmdr_off + mb.cmdr_size}) outside the {len(mem)}-byte region")
        if mb.cmd_tail >= mb.cmdr_size or mb.cmd_tail % OP_ALIGN_SIZE:
            raise FormatError(f"TCMU cmd_tail {mb.cmd_tail} invalid for a {mb.cmdr_size}-byte ring")
        self.flags = mb.flags
        self.cmdr_off = mb.cmdr_off
        self.cmdr_size = mb.cmdr_size
        self.data_off = mb.cmdr_off + mb.cmdr_size
        if restartable and out_of_order:
            raise ValueError("a restartable ring completes in order (see the module docstring)")
        if out_of_order is None:
            out_of_order = bool(mb.flags & CAP_OOOC) and not restartable
        elif out_of_order and not mb.flags & CAP_OOOC:
            raise FormatError("out-of-order completion requested but the kernel lacks CAP_OOOC")
        self.out_of_order = out_of_order
        self.read_len = bool(mb.flags & CAP_READ_LEN)
        self._tail = mb.cmd_tail
        self._cursor = mb.cmd_tail  # next entry to parse
        self._pending: deque[_Slot] = deque()  # parsed, not yet behind the tail, in ring order
        self._inflight: dict[int, _Slot] = {}
        self._tail_moves = 0
        self.restartable = restartable
        # what a takeover found on the ring: responses the previous owner wrote whose slot the
        # tail had not passed yet, and torn responses answered BUSY
        self.taken_over = {"answered": 0, "busy": 0}

    # -- reading the ring ----------------------------------------------------------------

    @property
    def region(self) -> memoryview:
        return self._mem

    @property
    def tail(self) -> int:
        return self._tail

    @property
    def inflight(self) -> int:
        """Commands received and not yet completed."""
        return len(self._inflight)

    @property
    def tail_moves(self) -> int:
        """How many times cmd_tail was advanced (a notify is due when this changes)."""
        return self._tail_moves

    def _head(self) -> int:
        (head,) = _U32.unpack_from(self._mem, MB_CMD_HEAD)
        head %= self.cmdr_size  # the kernel's own rule for a value in shared memory
        if head % OP_ALIGN_SIZE:
            raise FormatError(f"TCMU cmd_head {head} is not {OP_ALIGN_SIZE}-byte aligned")
        return head

    def receive(self) -> list[Event]:
        """Parse every entry added since the last call; PAD entries yield nothing."""
        head = self._head()
        events: list[Event] = []
        while self._cursor != head:
            pos = self._cursor
            available = (head - pos) % self.cmdr_size
            base = self.cmdr_off + pos
            len_op, cmd_id, kflags, uflags = _HDR.unpack_from(self._mem, base)
            op, length = len_op & OP_MASK, len_op & ~OP_MASK
            if length < HDR_SIZE or length > available or length > self.cmdr_size - pos:
                raise FormatError(
                    f"TCMU entry at ring offset {pos}: length {length} (op {op}) does not fit "
                    f"({available} bytes queued, {self.cmdr_size - pos} to the ring end)")
            slot = _Slot(pos, length, op, cmd_id)
            if op == OP_CMD and uflags & UFLAG_ANSWERED:
                # a previous owner's complete response (in-order: in its own slot): only the tail
                # has to move over it. The kernel never queues an entry with uflags set.
                slot.answered = True
                self.taken_over["answered"] += 1
            elif op == OP_CMD and uflags & UFLAG_ANSWERING:
                # a previous owner died writing this response: the request is garbled, the
                # cmd_id (written last) is still its own. BUSY: the initiator sends it again.
                self._write_response(slot, cmd_id, STATUS_BUSY, b"", None, False)
                slot.answered = True
                self.taken_over["busy"] += 1
            elif op == OP_CMD:
                if cmd_id in self._inflight:
                    raise FormatError(f"TCMU cmd_id {cmd_id} queued twice")
                events.append(self._parse_cmd(pos, length, cmd_id, kflags))
                self._inflight[cmd_id] = slot
            elif op == OP_TMR:
                events.append(self._parse_tmr(pos, length))
                slot.answered = True
            elif op == OP_PAD:
                slot.answered = True
            else:
                # Not ours to interpret: say so, and let the tail move over it.
                self._mem[base + HDR_UFLAGS] |= UFLAG_UNKNOWN_OP
                slot.answered = True
            self._pending.append(slot)
            self._cursor = (pos + length) % self.cmdr_size
        self._retire()
        return events

    def _parse_cmd(self, pos: int, length: int, cmd_id: int, kflags: int) -> Command:
        base = self.cmdr_off + pos
        end = base + length
        if length < CMD_ENTRY_SIZE:
            raise FormatError(f"TCMU CMD entry {cmd_id} at ring offset {pos} is {length} bytes, < {CMD_ENTRY_SIZE}")
        mem = self._mem
        iov_cnt = _U32.unpack_from(mem, base + REQ_IOV_CNT)[0]
        bidi_cnt = _U32.unpack_from(mem, base + REQ_IOV_BIDI_CNT)[0]
        dif_cnt = _U32.unpack_from(mem, base + REQ_IOV_DIF_CNT)[0]
        cdb_off = _U64.unpack_from(mem, base + REQ_CDB_OFF)[0]
        total = iov_cnt + bidi_cnt + dif_cnt
        if REQ_IOV + IOVEC_SIZE * total > length:
            raise FormatError(
                f"TCMU CMD entry {cmd_id}: {total} iovecs do not fit in a {length}-byte entry")
        iovecs = []
        for i in range(iov_cnt + bidi_cnt):
            at = base + REQ_IOV + IOVEC_SIZE * i
            iov_base = _U64.unpack_from(mem, at + IOVEC_BASE)[0]
            iov_len = _U64.unpack_from(mem, at + IOVEC_LEN)[0]
            if iov_base < self.data_off or iov_base + iov_len > len(self._mem):
                raise FormatError(
                    f"TCMU CMD entry {cmd_id}: iovec {i} [{iov_base}, {iov_base + iov_len}) "
                    f"outside the data area [{self.data_off}, {len(self._mem)})")
            iovecs.append(Iovec(iov_base, iov_len))
        if not base + HDR_SIZE <= cdb_off < end:
            raise FormatError(f"TCMU CMD entry {cmd_id}: cdb_off {cdb_off} outside its entry [{base}, {end})")
        room = end - cdb_off
        first = bytes(self._mem[cdb_off : cdb_off + min(room, 8)])
        size = min(scsi_command_size(first), room)
        cdb = bytes(self._mem[cdb_off : cdb_off + size])
        return Command(cmd_id, cdb, tuple(iovecs[:iov_cnt]), tuple(iovecs[iov_cnt:]), kflags)

    def _parse_tmr(self, pos: int, length: int) -> TaskManagement:
        base = self.cmdr_off + pos
        if length < TMR_ENTRY_SIZE:
            raise FormatError(f"TCMU TMR entry at ring offset {pos} is {length} bytes, < {TMR_ENTRY_SIZE}")
        tmr_type = self._mem[base + TMR_TYPE]
        cmd_cnt = _U32.unpack_from(self._mem, base + TMR_CMD_CNT)[0]
        if TMR_CMD_IDS + 2 * cmd_cnt > length:
            raise FormatError(f"TCMU TMR entry at ring offset {pos}: {cmd_cnt} ids do not fit in {length} bytes")
        ids = struct.unpack_from(f"={cmd_cnt}H", self._mem, base + TMR_CMD_IDS)
        return TaskManagement(tmr_type, tuple(ids))

    # -- data ------------------------------------------------------------------------------

    def read_data(self, cmd: Command, offset: int = 0, length: int | None = None) -> bytes:
        """The command's data-out bytes (all of them by default)."""
        return gather(self._mem, cmd.iovecs, offset, length)

    def write_data(self, cmd: Command, data: bytes, offset: int = 0) -> int:
        """Copy data-in bytes into the command's buffer; returns how many fitted."""
        return scatter(self._mem, cmd.iovecs, data, offset)

    def data_view(self, cmd: Command) -> memoryview | None:
        """The command's data buffer as one writable view when its iovecs are contiguous in the
        data area (the usual case: the kernel merges adjacent data blocks into one iovec); else None."""
        if not cmd.iovecs:
            return None
        first = cmd.iovecs[0]
        end = first.offset
        for iov in cmd.iovecs:
            if iov.offset != end:
                return None
            end += iov.length
        return self._mem[first.offset : end]

    def clear_data(self, cmd: Command, offset: int = 0) -> None:
        """Zero the command's buffer from *offset* on (so stale bytes never reach the initiator)."""
        fill(self._mem, cmd.iovecs, offset)

    # -- completing ------------------------------------------------------------------------

    def complete(self, cmd_id: int, status: int, sense: bytes = b"", *, read_len: int | None = None,
                 unknown_op: bool = False) -> bool:
        """Answer command *cmd_id*; returns True when cmd_tail moved (the kernel should be told).

        *read_len* (data-in bytes actually produced) is passed only when the
        kernel offers ``CAP_READ_LEN``; *unknown_op* sets ``TCMU_UFLAG_UNKNOWN_OP``.
        """
        slot = self._inflight.pop(cmd_id, None)
        if slot is None:
            raise KeyError(f"TCMU cmd_id {cmd_id} is not in flight")
        if self.out_of_order:
            self._retire()
            # The oldest unanswered CMD slot takes this answer; the kernel finds the
            # command by the cmd_id written into it.
            slot = self._pending[0]
        self._write_response(slot, cmd_id, status, sense, read_len, unknown_op)
        slot.answered = True
        before = self._tail_moves
        self._retire()
        return self._tail_moves != before

    def _write_response(self, slot: _Slot, cmd_id: int, status: int, sense: bytes, read_len: int | None,
                        unknown_op: bool) -> None:
        base = self.cmdr_off + slot.pos
        uflags = UFLAG_UNKNOWN_OP if unknown_op else 0
        if read_len is not None and self.read_len:
            uflags |= UFLAG_READ_LEN
        if self.restartable:
            self._mem[base + HDR_UFLAGS] = UFLAG_ANSWERING  # first: the request is about to go
            uflags |= UFLAG_ANSWERED
        self._mem[base + RSP_SCSI_STATUS : base + RSP_READ_LEN] = bytes([status & 0xFF, 0, 0, 0])
        _U32.pack_into(self._mem, base + RSP_READ_LEN, (read_len or 0) if uflags & UFLAG_READ_LEN else 0)
        sense = bytes(sense[:SENSE_BUFFERSIZE]).ljust(SENSE_BUFFERSIZE, b"\0")
        self._mem[base + RSP_SENSE_BUFFER : base + RSP_SENSE_BUFFER + SENSE_BUFFERSIZE] = sense
        # last, in one aligned 4-byte store: cmd_id, kflags (kept), uflags (with ANSWERED)
        kflags = self._mem[base + HDR_KFLAGS]
        _U32.pack_into(self._mem, base + HDR_CMD_ID, _HDR_ID_FLAGS.unpack(_HDR_ID_FLAGS_PACK.pack(
            cmd_id & 0xFFFF, kflags, uflags))[0])

    def _retire(self) -> None:
        """Move cmd_tail over the answered prefix of the parsed entries."""
        moved = False
        while self._pending and self._pending[0].answered:
            slot = self._pending.popleft()
            self._tail = (slot.pos + slot.length) % self.cmdr_size
            moved = True
        if moved:
            # The response bytes are written before the tail (x86 keeps store order;
            # CPython does the stores in program order).
            _U32.pack_into(self._mem, MB_CMD_TAIL, self._tail)
            self._tail_moves += 1

    def release(self) -> None:
        """Drop the view of the region (so the mapping can be closed)."""
        self._mem.release()
