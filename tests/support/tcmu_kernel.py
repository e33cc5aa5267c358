"""An emulation of the kernel side of a TCMU device (``target_core_user``), for tests and benchmarks.

It does what ``drivers/target/target_core_user.c`` does for one device, on a
real shared mapping instead of kernel pages:

* the region is a file (on /dev/shm when present) mmapped by both sides:
  mailbox at 0 (version 2, flags OOOC|READ_LEN|TMR|KEEP_BUF by default,
  ``cmdr_off = sizeof(struct tcmu_mailbox)``), the command ring of
  ``cmdr_size`` bytes after it, the data area after the ring;
* ``submit()`` queues a command like ``queue_cmd_ring``: the lowest free
  cmd_id (1..65535); data-area blocks of ``data_block_size`` bytes taken
  from a bitmap (first fit like the kernel, or at random to force scattered
  iovecs), contiguous blocks merged into one iovec; an entry sized
  ``max(offsetof(req.iov[n]), sizeof(entry)) + align8(cdb)`` with the CDB at
  ``cdb_off``; a PAD entry when the entry does not fit before the ring end;
  waits (FIFO) while the ring or the data area is full; refuses commands
  bigger than half the ring or the data area with INVALID FIELD IN CDB; then
  bumps ``cmd_head`` and sends a 4-byte event on the UIO channel;
* when the handler writes to its UIO channel it walks the ring from the last
  cleaned entry to ``cmd_tail`` like ``tcmu_handle_completions``: PAD/TMR
  skipped by length, CMD looked up by the cmd_id *in the slot*, UNKNOWN_OP
  turned into CHECK CONDITION, READ_LEN honoured, data-in gathered from the
  command's own blocks, blocks freed.

Where the kernel would just break the ring, the emulation raises
:class:`RingViolation` (the test then fails with the reason): a tail that is
misaligned or passes the head, a length field changed by the handler, an
unknown cmd_id, a mailbox field owned by the kernel modified.

The handler side gets a :class:`~lazyfs.serve.tcmu.handler.Uio` built from a
SOCK_SEQPACKET socket (one 4-byte message per event, both directions) and the
region file — the same object shape a real ``/dev/uioN`` gives it.
"""

from __future__ import annotations

import heapq
import mmap
import os
import random
import socket
import struct
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from lazyfs.serve.tcmu import ring as R
from lazyfs.serve.tcmu.handler import Uio

DEFAULT_FLAGS = R.CAP_OOOC | R.CAP_READ_LEN | R.CAP_TMR | R.CAP_KEEP_BUF
CMDR_OFF = R.MAILBOX_SIZE  # the kernel's CMDR_OFF is sizeof(struct tcmu_mailbox)

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


class RingViolation(AssertionError):
    """The handler broke the ring protocol (the kernel would mark the device broken)."""


@dataclass(frozen=True, slots=True)
class Completion:
    """What the initiator sees when a command finishes."""

    cmd_id: int
    status: int
    sense: bytes = b""
    data_in: bytes = b""
    unknown_op: bool = False
    read_len: int | None = None  # from the response when TCMU_UFLAG_READ_LEN was set
    queued: bool = True  # False: refused by the "kernel" before reaching the ring


@dataclass(eq=False)
class _Inflight:
    cmd_id: int
    blocks: list[int]
    iovecs: list[tuple[int, int]]
    data_in_length: int
    done: trio.Event = field(default_factory=trio.Event)
    completion: Completion | None = None


_SENSE_INVALID_FIELD = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])


def _sense_length(sense: bytes) -> int:
    if sense and sense[0] & 0x7F in (0x70, 0x71, 0x72, 0x73):
        return min(len(sense), 8 + sense[7])
    return len(sense)


def initiator_transfer_length(cdb: bytes, block_size: int) -> int:
    """Data-in length a Linux initiator would set up for a read-type CDB (0 for anything else).

    This is the initiator's view, written independently of the target code.
    """
    if not cdb:
        return 0
    op = cdb[0]

    def be(start: int, n: int) -> int:
        return int.from_bytes(cdb[start : start + n].ljust(n, b"\0"), "big")

    if op == 0x08:  # READ(6)
        return (cdb[4] if len(cdb) > 4 and cdb[4] else 256) * block_size
    if op == 0x28:
        return be(7, 2) * block_size
    if op == 0xA8:
        return be(6, 4) * block_size
    if op == 0x88:
        return be(10, 4) * block_size
    if op in (0x12, 0x1A):  # INQUIRY (16-bit in SPC-3+), MODE SENSE(6)
        return be(3, 2) if op == 0x12 else be(4, 1)
    if op == 0x03:  # REQUEST SENSE
        return be(4, 1)
    if op == 0x5A:  # MODE SENSE(10)
        return be(7, 2)
    if op == 0x25:  # READ CAPACITY(10)
        return 8
    if op == 0x9E:  # SERVICE ACTION IN(16)
        return be(10, 4)
    if op == 0xA0:  # REPORT LUNS
        return be(6, 4)
    return 0


class KernelEmulator:
    """The kernel side of one TCMU device. Create with ``async with KernelEmulator.open(...)``."""

    def __init__(self, *, cmdr_size: int = (1 << 20) - CMDR_OFF, data_size: int = 16 << 20,
                 data_block_size: int = 4096, flags: int = DEFAULT_FLAGS, scatter: bool = True,
                 seed: int = 0, lun_block_size: int = 512, directory: str | None = None) -> None:
        if cmdr_size % R.OP_ALIGN_SIZE or cmdr_size < 4 * R.CMD_ENTRY_SIZE:
            raise ValueError(f"cmdr_size {cmdr_size} must be a multiple of 8 and hold a few entries")
        if data_size % data_block_size or data_block_size % 4096:
            raise ValueError("data_size must be a multiple of data_block_size, itself a multiple of 4096")
        self.cmdr_size = cmdr_size
        self.data_off = CMDR_OFF + cmdr_size
        self.data_size = data_size
        self.block_size = data_block_size
        self.map_size = self.data_off + data_size
        self.flags = flags
        self.lun_block_size = lun_block_size
        self._rng = random.Random(seed) if scatter else None
        self._nblocks = data_size // data_block_size
        # free data blocks: a min-heap for first fit, a list + index for random picks
        self._free_heap = list(range(self._nblocks))
        self._free_list = list(range(self._nblocks))
        self._free_pos = {b: b for b in range(self._nblocks)}
        self._last_cleaned = 0
        self._inflight: dict[int, _Inflight] = {}
        self._entry_len: dict[int, int] = {}  # ring offset -> length we wrote, to catch tampering
        self._space = trio.Event()
        self._queue_lock = trio.Lock()  # FIFO: commands wait for ring space in arrival order
        self._events = 0
        self.stats = {"commands": 0, "pads": 0, "tmrs": 0, "wraps": 0, "waits_for_space": 0,
                      "completion_passes": 0, "max_inflight": 0, "max_iovecs": 0, "refused": 0}

        directory = directory or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        fd, self.path = tempfile.mkstemp(prefix="lazyfs-tcmu-", dir=directory)
        try:
            os.ftruncate(fd, self.map_size)
            self._map_fd = fd
            self._mmap = mmap.mmap(fd, self.map_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.mem = memoryview(self._mmap)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.unlink(self.path)  # the mappings and fds keep it alive
        self._kernel_sock, self._user_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._kernel_sock.setblocking(False)
        struct.pack_into("=HHIII", self.mem, R.MB_VERSION, R.MAILBOX_VERSION, flags, CMDR_OFF, cmdr_size, 0)
        _U32.pack_into(self.mem, R.MB_CMD_TAIL, 0)
        self._mailbox_snapshot = bytes(self.mem[: R.MB_CMD_HEAD])

    @classmethod
    @asynccontextmanager
    async def open(cls, **kw):
        """An emulated device with its completion task running; closed on exit."""
        emu = cls(**kw)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(emu._completion_loop)
                try:
                    yield emu
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            emu.close()

    def open_uio(self) -> Uio:
        """The handler's end: a Uio over duplicates of the event socket and the region file."""
        return Uio.from_fds(os.dup(self._user_sock.fileno()), os.dup(self._map_fd), self.map_size,
                            name="uio-emulated")

    def close(self) -> None:
        if self._map_fd < 0:
            return
        self.mem.release()
        self._mmap.close()
        os.close(self._map_fd)
        self._map_fd = -1
        self._kernel_sock.close()
        self._user_sock.close()

    # -- mailbox helpers -------------------------------------------------------------------

    def _head(self) -> int:
        return _U32.unpack_from(self.mem, R.MB_CMD_HEAD)[0]

    def _set_head(self, head: int) -> None:
        _U32.pack_into(self.mem, R.MB_CMD_HEAD, head)

    def _tail(self) -> int:
        return _U32.unpack_from(self.mem, R.MB_CMD_TAIL)[0]

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _ring_free(self) -> int:
        used = (self._head() - self._last_cleaned) % self.cmdr_size
        return self.cmdr_size - used - 1  # one byte kept free: head == tail means empty

    def _fits(self, size: int) -> bool:
        head = self._head()
        to_end = self.cmdr_size - head
        needed = size if to_end >= size else size + to_end
        return self._ring_free() >= needed

    def _insert_pad_if_needed(self, size: int) -> int:
        head = self._head()
        to_end = self.cmdr_size - head
        if to_end < size:
            base = CMDR_OFF + head
            struct.pack_into("=IHBB", self.mem, base, to_end | R.OP_PAD, 0, 0, 0)
            self._entry_len[head] = to_end
            self._set_head(0)
            self.stats["pads"] += 1
            self.stats["wraps"] += 1
            head = 0
        return head

    def _notify_user(self) -> None:
        self._events += 1
        try:
            self._kernel_sock.send(_U32.pack(self._events))
        except BlockingIOError:
            pass  # an event is already pending; uio would coalesce too

    # -- data area -------------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return len(self._free_list)

    def _alloc_blocks(self, count: int) -> list[int] | None:
        if count > len(self._free_list):
            return None
        if self._rng is None:
            chosen = [heapq.heappop(self._free_heap) for _ in range(count)]  # find_first_zero_bit
        else:
            picks = self._rng.sample(range(len(self._free_list)), count)
            chosen = [self._free_list[i] for i in picks]
            if self._rng.random() < 0.5:
                chosen.sort()  # ascending like the kernel: neighbours merge into one iovec
        for b in chosen:
            self._take(b)
        return chosen

    def _take(self, block: int) -> None:
        i = self._free_pos.pop(block)
        last = self._free_list.pop()
        if last != block:
            self._free_list[i] = last
            self._free_pos[last] = i

    def _free(self, blocks: list[int]) -> None:
        for b in blocks:
            self._free_pos[b] = len(self._free_list)
            self._free_list.append(b)
            if self._rng is None:
                heapq.heappush(self._free_heap, b)

    def _iovecs(self, blocks: list[int], length: int) -> list[tuple[int, int]]:
        """Blocks to iovecs as new_block_to_iov does: a run of consecutive blocks is one iovec."""
        iovecs: list[list[int]] = []
        prev = -2
        for b in blocks:
            n = min(length, self.block_size)
            if b != prev + 1:
                iovecs.append([self.data_off + b * self.block_size, 0])
            iovecs[-1][1] += n
            length -= n
            prev = b
        return [(base, n) for base, n in iovecs]

    def _scatter(self, iovecs: list[tuple[int, int]], data: bytes) -> None:
        pos = 0
        for base, n in iovecs:
            self.mem[base : base + n] = data[pos : pos + n]
            pos += n

    def _gather(self, iovecs: list[tuple[int, int]], length: int) -> bytes:
        out = []
        for base, n in iovecs:
            if length <= 0:
                break
            take = min(n, length)
            out.append(bytes(self.mem[base : base + take]))
            length -= take
        return b"".join(out)

    # -- submitting ------------------------------------------------------------------------

    async def submit(self, cdb: bytes, data_out: bytes | None = None, *,
                     data_in_length: int | None = None) -> Completion:
        """Queue one SCSI command and wait for its completion.

        *data_in_length* defaults to what a Linux initiator would request for the
        CDB. A command carries data in one direction only. Safe to call from many
        tasks at once.
        """
        cdb = bytes(cdb)
        if not cdb:
            raise ValueError("an initiator cannot send an empty CDB")
        # The kernel copies scsi_command_size(cdb) bytes from the command's CDB buffer.
        cdb_len = R.scsi_command_size(cdb)
        cdb = cdb[:cdb_len].ljust(cdb_len, b"\0")
        if data_out is not None and data_in_length:
            raise ValueError("bidirectional commands are not emulated")
        data_length = len(data_out) if data_out is not None else (
            initiator_transfer_length(cdb, self.lun_block_size) if data_in_length is None else data_in_length)
        nblocks = -(-data_length // self.block_size)
        _, worst = R.cmd_entry_size(nblocks, cdb_len)
        if worst > self.cmdr_size // 2 or data_length > self.data_size:
            # queue_cmd_ring: "Request of size ... is too big for ... cmd ring/data area"
            self.stats["refused"] += 1
            return Completion(0, 0x02, _SENSE_INVALID_FIELD, queued=False)

        async with self._queue_lock:
            while True:
                blocks = self._alloc_blocks(nblocks)
                if blocks is not None:
                    iovecs = self._iovecs(blocks, data_length)
                    base_size, size = R.cmd_entry_size(len(iovecs), cdb_len)
                    if self._fits(size) and len(self._inflight) < 0xFFFF:
                        break
                    self._free(blocks)
                self.stats["waits_for_space"] += 1
                space = self._space
                await space.wait()
            cmd_id = next(i for i in range(1, 0x10000) if i not in self._inflight)
            head = self._insert_pad_if_needed(size)
            base = CMDR_OFF + head
            self.mem[base : base + size] = bytes(size)
            struct.pack_into("=IHBB", self.mem, base, size | R.OP_CMD, cmd_id, 0, 0)
            for i, (iov_base, iov_len) in enumerate(iovecs):
                at = base + R.REQ_IOV + R.IOVEC_SIZE * i
                _U64.pack_into(self.mem, at + R.IOVEC_BASE, iov_base)
                _U64.pack_into(self.mem, at + R.IOVEC_LEN, iov_len)
            cdb_off = base + base_size  # all offsets relative to the mailbox
            self.mem[cdb_off : cdb_off + cdb_len] = cdb
            _U32.pack_into(self.mem, base + R.REQ_IOV_CNT, len(iovecs))
            _U64.pack_into(self.mem, base + R.REQ_CDB_OFF, cdb_off)
            if data_out is not None:
                self._scatter(iovecs, data_out)
            record = _Inflight(cmd_id, blocks, iovecs, 0 if data_out is not None else data_length)
            self._inflight[cmd_id] = record
            self._entry_len[head] = size
            self._set_head((head + size) % self.cmdr_size)
            self.stats["commands"] += 1
            self.stats["max_inflight"] = max(self.stats["max_inflight"], len(self._inflight))
            self.stats["max_iovecs"] = max(self.stats["max_iovecs"], len(iovecs))
            self._notify_user()
        await record.done.wait()
        assert record.completion is not None
        return record.completion

    async def submit_tmr(self, tmr_type: int, cmd_ids: list[int] | tuple[int, ...]) -> None:
        """Queue a task management notification (as with ``tmr_notify`` enabled)."""
        if not self.flags & R.CAP_TMR:
            raise ValueError("the emulated kernel does not offer CAP_TMR")
        size = R.tmr_entry_size(len(cmd_ids))
        if size > self.cmdr_size // 2:
            raise ValueError("TMR entry too big for the ring")
        async with self._queue_lock:
            while not self._fits(size):
                self.stats["waits_for_space"] += 1
                await self._space.wait()
            head = self._insert_pad_if_needed(size)
            base = CMDR_OFF + head
            self.mem[base : base + size] = bytes(size)
            struct.pack_into("=IHBB", self.mem, base, size | R.OP_TMR, 0, 0, 0)
            self.mem[base + R.TMR_TYPE] = tmr_type
            _U32.pack_into(self.mem, base + R.TMR_CMD_CNT, len(cmd_ids))
            struct.pack_into(f"={len(cmd_ids)}H", self.mem, base + R.TMR_CMD_IDS, *cmd_ids)
            self._entry_len[head] = size
            self._set_head((head + size) % self.cmdr_size)
            self.stats["tmrs"] += 1
            self._notify_user()

    # -- completions -----------------------------------------------------------------------

    async def _completion_loop(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._kernel_sock)
            while True:
                try:
                    msg = self._kernel_sock.recv(16)
                except BlockingIOError:
                    break
                if len(msg) != 4:
                    raise RingViolation(f"UIO write of {len(msg)} bytes; the kernel accepts exactly 4")
            self.handle_completions()

    def handle_completions(self) -> int:
        """Reap everything between the last cleaned entry and cmd_tail; returns commands completed."""
        self.stats["completion_passes"] += 1
        if bytes(self.mem[: R.MB_CMD_HEAD]) != self._mailbox_snapshot:
            raise RingViolation("the handler modified kernel-owned mailbox fields")
        tail, head = self._tail(), self._head()
        if tail % R.OP_ALIGN_SIZE or tail >= self.cmdr_size:
            raise RingViolation(f"cmd_tail {tail} is misaligned or outside the {self.cmdr_size}-byte ring")
        if (tail - self._last_cleaned) % self.cmdr_size > (head - self._last_cleaned) % self.cmdr_size:
            raise RingViolation(f"cmd_tail {tail} moved past cmd_head {head} (last cleaned {self._last_cleaned})")
        handled = 0
        while self._last_cleaned != tail:
            pos = self._last_cleaned
            base = CMDR_OFF + pos
            len_op, cmd_id, _kflags, uflags = struct.unpack_from("=IHBB", self.mem, base)
            op, length = len_op & R.OP_MASK, len_op & ~R.OP_MASK
            if self._entry_len.get(pos) != length:
                raise RingViolation(f"entry at ring offset {pos}: length {length}, the kernel wrote "
                                    f"{self._entry_len.get(pos)}")
            if op in (R.OP_PAD, R.OP_TMR):
                self._advance(pos, length)
                continue
            if op != R.OP_CMD:
                raise RingViolation(f"entry at ring offset {pos} has opcode {op}")
            record = self._inflight.pop(cmd_id, None)
            if record is None:
                raise RingViolation(f"cmd_id {cmd_id} at ring offset {pos} not found, ring is broken")
            status = self.mem[base + R.RSP_SCSI_STATUS]
            read_len = _U32.unpack_from(self.mem, base + R.RSP_READ_LEN)[0]
            sense = bytes(self.mem[base + R.RSP_SENSE_BUFFER : base + R.RSP_SENSE_BUFFER + R.SENSE_BUFFERSIZE])
            if uflags & R.UFLAG_UNKNOWN_OP:
                completion = Completion(cmd_id, 0x02, b"", b"", unknown_op=True)
            else:
                length_in = record.data_in_length
                reported = None
                if uflags & R.UFLAG_READ_LEN and self.flags & R.CAP_READ_LEN and read_len and length_in:
                    reported = read_len
                    length_in = min(length_in, read_len)
                data_in = b""
                if status == 0x02:
                    sense = sense[: _sense_length(sense)]
                    if reported is not None:  # SCF_TREAT_READ_AS_NORMAL
                        data_in = self._gather(record.iovecs, length_in)
                else:
                    sense = b""
                    data_in = self._gather(record.iovecs, length_in)
                completion = Completion(cmd_id, status, sense, data_in, read_len=reported)
            self._free(record.blocks)
            record.completion = completion
            record.done.set()
            self._advance(pos, length)
            handled += 1
        self._space.set()
        self._space = trio.Event()
        return handled

    def _advance(self, pos: int, length: int) -> None:
        del self._entry_len[pos]
        self._last_cleaned = (pos + length) % self.cmdr_size

    def check_idle(self) -> None:
        """Assert that everything submitted was completed and every resource returned."""
        if self._inflight:
            raise RingViolation(f"{len(self._inflight)} commands still in flight: {sorted(self._inflight)}")
        if self._tail() != self._head() or self._last_cleaned != self._head():
            raise RingViolation(f"ring not drained: head {self._head()} tail {self._tail()} "
                                f"cleaned {self._last_cleaned}")
        if len(self._free_list) != self._nblocks:
            raise RingViolation(f"{self._nblocks - len(self._free_list)} data blocks leaked")


@asynccontextmanager
async def serve_emulated(source, *, name: str = "emulated", block_size: int = 512, max_inflight: int = 64,
                         out_of_order: bool | None = None, **emulator_kw):
    """Serve *source* with a real TcmuHandler on an emulated kernel; yields ``(emulator, handler)``.

    On exit the handler is stopped and the emulator must be idle (everything
    completed, ring drained, no data block leaked), else RingViolation.
    """
    from lazyfs.serve.tcmu.handler import TcmuHandler
    from lazyfs.serve.tcmu.scsi import DeviceInfo

    emulator_kw.setdefault("lun_block_size", block_size)
    async with KernelEmulator.open(**emulator_kw) as emu:
        uio = emu.open_uio()
        try:
            info = DeviceInfo.for_source(source, name, block_size=block_size)
            handler = TcmuHandler(source, uio, info, max_inflight=max_inflight, out_of_order=out_of_order)
            async with trio.open_nursery() as nursery:
                await nursery.start(handler.run)
                yield emu, handler
                nursery.cancel_scope.cancel()
        finally:
            uio.close()
        emu.check_idle()
