"""A SCSI block target (SBC-3/SPC-4 subset), sans-IO, plus the small async shell that does the I/O.

``handle(cdb, data_out, info)`` decodes one command. Commands that need no
I/O are answered at once with a :class:`Result`; the others come back as one
I/O request (:class:`ReadOp`, :class:`WriteOp`, :class:`WriteSameOp`,
:class:`DiscardOp`, :class:`FlushOp`) for ``execute()`` to run against a
:class:`~lazyfs.device.source.BlockSource`. ``handle`` never raises: anything
it cannot serve is a CHECK CONDITION with fixed-format (0x70) sense data.
``execute`` maps source errors to sense data in one place (``error_result``).

Served: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard, VPD 0x00, 0x80,
0x83, 0xB0, 0xB1, 0xB2), READ CAPACITY (10)/(16), MODE SENSE (6)/(10) (caching,
control, all pages), MODE SELECT (6)/(10) (current values only), READ and
WRITE (6)/(10)/(12)/(16), VERIFY (10)/(16) without byte check, SYNCHRONIZE
CACHE (10)/(16), WRITE SAME (10)/(16) (with UNMAP and NDOB), UNMAP, START STOP
UNIT, PREVENT ALLOW MEDIUM REMOVAL, REPORT LUNS.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import struct
from dataclasses import dataclass, field
from typing import Union

from lazyfs.device.source import BLOCK_SIZE, BlockSource
from lazyfs.errors import FetchError, IntegrityError, LazyfsError, RangeError, ReadOnlyError

log = logging.getLogger(__name__)

# SAM status codes
GOOD = 0x00
CHECK_CONDITION = 0x02


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB


# (ASC, ASCQ) pairs
INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
WRITE_ERROR = (0x0C, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
INTERNAL_TARGET_FAILURE = (0x44, 0x00)

FIXED_SENSE_LENGTH = 18


class Opcode(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA


SAI_READ_CAPACITY_16 = 0x10

# CDB length of every opcode we serve
CDB_LENGTH = {op: (6, 10, 10, 12, 16, 12, 10, 10)[(op >> 5) & 7] for op in Opcode}


class Direction(enum.Enum):
    NONE = "none"
    IN = "in"  # device -> initiator
    OUT = "out"  # initiator -> device


_DATA_IN = {Opcode.REQUEST_SENSE, Opcode.READ_6, Opcode.INQUIRY, Opcode.MODE_SENSE_6, Opcode.READ_CAPACITY_10,
            Opcode.READ_10, Opcode.MODE_SENSE_10, Opcode.READ_16, Opcode.SERVICE_ACTION_IN_16,
            Opcode.REPORT_LUNS, Opcode.READ_12}
_DATA_OUT = {Opcode.WRITE_6, Opcode.MODE_SELECT_6, Opcode.WRITE_10, Opcode.WRITE_SAME_10, Opcode.UNMAP,
             Opcode.MODE_SELECT_10, Opcode.WRITE_16, Opcode.WRITE_SAME_16, Opcode.WRITE_12}


def data_direction(cdb: bytes) -> Direction:
    """Which way data moves for *cdb* (NONE for commands we do not serve)."""
    if not cdb:
        return Direction.NONE
    if cdb[0] in _DATA_IN:
        return Direction.IN
    if cdb[0] in _DATA_OUT:
        return Direction.OUT
    return Direction.NONE


# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the target reports about the LUN. ``size`` is in bytes; a partial last block is hidden."""

    name: str
    size: int
    block_size: int = 512
    read_only: bool = False
    physical_block_size: int = BLOCK_SIZE
    max_transfer_bytes: int = 8 << 20
    optimal_transfer_bytes: int = 256 << 10
    max_unmap_bytes: int = 1 << 30
    max_unmap_descriptors: int = 64
    vendor: str = "LAZYFS"
    product: str = "lazyfs"
    revision: str = "0001"

    def __post_init__(self) -> None:
        if self.block_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"block_size must be 512, 1024, 2048 or 4096, not {self.block_size}")
        if self.physical_block_size < self.block_size or self.physical_block_size % self.block_size:
            raise ValueError(f"physical_block_size {self.physical_block_size} is not a multiple of "
                             f"block_size {self.block_size}")
        if self.size < self.block_size:
            raise ValueError(f"device of {self.size} bytes is smaller than one {self.block_size}-byte block")
        for name in ("max_transfer_bytes", "optimal_transfer_bytes", "max_unmap_bytes"):
            if getattr(self, name) < self.block_size:
                raise ValueError(f"{name} must be at least one block")

    @classmethod
    def for_source(cls, source: BlockSource, name: str, block_size: int = 512, **kw) -> DeviceInfo:
        """The description of *source* served as LUN *name*."""
        return cls(name=name, size=source.size, block_size=block_size, read_only=source.read_only, **kw)

    @property
    def blocks(self) -> int:
        return self.size // self.block_size

    @property
    def max_transfer_blocks(self) -> int:
        return min(self.max_transfer_bytes // self.block_size, 0xFFFFFFFF)

    @property
    def max_unmap_blocks(self) -> int:
        return min(self.max_unmap_bytes // self.block_size, 0xFFFFFFFF)

    @property
    def thin(self) -> bool:
        """Whether UNMAP / WRITE SAME with UNMAP are offered (LBPME)."""
        return not self.read_only

    def _digest(self) -> bytes:
        return hashlib.sha256(b"lazyfs-tcmu\0" + self.name.encode("utf-8", "surrogateescape")).digest()

    @property
    def naa(self) -> bytes:
        """8-byte NAA identifier, type 3 (locally assigned), stable for a device name."""
        value = int.from_bytes(self._digest()[:8], "big") & ((1 << 60) - 1)
        return ((0x3 << 60) | value).to_bytes(8, "big")

    @property
    def serial(self) -> str:
        """Unit serial number, stable for a device name."""
        return self._digest()[8:20].hex()


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of a command: SAM status, data-in bytes, sense data (CHECK CONDITION only).

    *placed*: data-in bytes already read in place into the caller's buffer (``data_in`` is then empty).
    """

    status: int
    data_in: bytes = b""
    sense: bytes = b""
    placed: int = 0

    @property
    def ok(self) -> bool:
        return self.status == GOOD


@dataclass(frozen=True, slots=True)
class ReadOp:
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteOp:
    offset: int
    data: bytes = field(repr=False)
    fua: bool = False


@dataclass(frozen=True, slots=True)
class WriteSameOp:
    """Write *pattern* (one block) over ``[offset, offset+length)``."""

    offset: int
    length: int
    pattern: bytes = field(repr=False)
    fua: bool = False


@dataclass(frozen=True, slots=True)
class DiscardOp:
    ranges: tuple[tuple[int, int], ...]  # (offset, length) in bytes


@dataclass(frozen=True, slots=True)
class FlushOp:
    """SYNCHRONIZE CACHE: make every completed write durable (no parameters)."""


Op = Union[ReadOp, WriteOp, WriteSameOp, DiscardOp, FlushOp]


# --- sense data ------------------------------------------------------------------------


def fixed_sense(key: int, asc: int, ascq: int, *, information: int | None = None,
                field_pointer: int | None = None, bit_pointer: int | None = None, in_cdb: bool = True) -> bytes:
    """Fixed-format sense data (response code 0x70, current error), 18 bytes.

    *field_pointer* (byte index in the CDB or parameter list) fills the
    sense-key specific field, as SPC asks for ILLEGAL REQUEST.
    """
    sense = bytearray(FIXED_SENSE_LENGTH)
    sense[0] = 0x70
    sense[2] = key & 0x0F
    if information is not None:
        sense[0] |= 0x80  # VALID
        sense[3:7] = (information & 0xFFFFFFFF).to_bytes(4, "big")
    sense[7] = FIXED_SENSE_LENGTH - 8
    sense[12], sense[13] = asc, ascq
    if field_pointer is not None:
        sense[15] = 0x80 | (0x40 if in_cdb else 0)  # SKSV, C/D
        if bit_pointer is not None:
            sense[15] |= 0x08 | (bit_pointer & 0x7)  # BPV
        sense[16:18] = (field_pointer & 0xFFFF).to_bytes(2, "big")
    return bytes(sense)


def check(key: int, code: tuple[int, int], **kw) -> Result:
    """A CHECK CONDITION result with fixed sense."""
    return Result(CHECK_CONDITION, b"", fixed_sense(key, *code, **kw))


def invalid_field(byte: int, bit: int | None = None) -> Result:
    return check(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field_pointer=byte, bit_pointer=bit)


def invalid_param(byte: int, bit: int | None = None) -> Result:
    return check(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=byte,
                 bit_pointer=bit, in_cdb=False)


INVALID_OPCODE = Result(CHECK_CONDITION, b"", fixed_sense(SenseKey.ILLEGAL_REQUEST, *INVALID_COMMAND_OPERATION_CODE,
                                                          field_pointer=0))
OUT_OF_RANGE = Result(CHECK_CONDITION, b"", fixed_sense(SenseKey.ILLEGAL_REQUEST, *LBA_OUT_OF_RANGE))
WRITE_PROTECT = Result(CHECK_CONDITION, b"", fixed_sense(SenseKey.DATA_PROTECT, *WRITE_PROTECTED))
PARAM_LENGTH = Result(CHECK_CONDITION, b"", fixed_sense(SenseKey.ILLEGAL_REQUEST, *PARAMETER_LIST_LENGTH_ERROR))
GOOD_RESULT = Result(GOOD)


def _good(data: bytes, allocation_length: int) -> Result:
    return Result(GOOD, bytes(data[:allocation_length]))


def _be(data: bytes, start: int, length: int) -> int:
    return int.from_bytes(data[start : start + length], "big")


# --- the switch --------------------------------------------------------------------------


def handle(cdb: bytes, data_out: bytes | None, info: DeviceInfo) -> Result | Op:
    """Decode *cdb* (with its data-out buffer, if any) for the LUN *info*.

    Returns a final :class:`Result`, or the one I/O request the command needs.
    Never raises.
    """
    try:
        return _handle(bytes(cdb), data_out, info)
    except Exception:  # a bug here must still end as a CHECK CONDITION, never kill the ring
        log.exception("SCSI decode of CDB %s failed", bytes(cdb[:16]).hex())
        return check(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE)


def _handle(cdb: bytes, data_out: bytes | None, info: DeviceInfo) -> Result | Op:
    if not cdb or cdb[0] not in _HANDLERS:
        return INVALID_OPCODE
    opcode = cdb[0]
    length = CDB_LENGTH[opcode]
    if len(cdb) < length:
        return invalid_field(len(cdb))
    if cdb[length - 1] & 0x04:  # NACA in the CONTROL byte: we offer no ACA (NormACA = 0)
        return invalid_field(length - 1, 2)
    return _HANDLERS[opcode](cdb, data_out, info)


def _test_unit_ready(cdb, data_out, info):
    return GOOD_RESULT


def _request_sense(cdb, data_out, info):
    if cdb[1] & 0x01:  # DESC: descriptor format not offered
        return invalid_field(1, 0)
    return _good(fixed_sense(SenseKey.NO_SENSE, 0, 0), cdb[4])


def _start_stop_unit(cdb, data_out, info):
    return GOOD_RESULT


def _prevent_allow(cdb, data_out, info):
    return GOOD_RESULT


def _report_luns(cdb, data_out, info):
    alloc = _be(cdb, 6, 4)
    if alloc < 16:
        return invalid_field(6)
    return _good(struct.pack(">II8x", 8, 0), alloc)


# INQUIRY --------------------------------------------------------------------------------

_VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)


def _ascii(text: str, width: int) -> bytes:
    return text.encode("ascii", "replace")[:width].ljust(width, b" ")


def standard_inquiry(info: DeviceInfo) -> bytes:
    """Standard INQUIRY data (36 bytes)."""
    data = bytearray(36)
    data[0] = 0x00  # peripheral qualifier 0, direct-access block device
    data[1] = 0x00  # not removable
    data[2] = 0x06  # SPC-4
    data[3] = 0x12  # HISUP, response data format 2
    data[4] = len(data) - 5
    data[7] = 0x02  # CMDQUE
    data[8:16] = _ascii(info.vendor, 8)
    data[16:32] = _ascii(info.product, 16)
    data[32:36] = _ascii(info.revision, 4)
    return bytes(data)


def _vpd(page: int, body: bytes) -> bytes:
    return bytes([0x00, page]) + len(body).to_bytes(2, "big") + body


def vpd_page(page: int, info: DeviceInfo) -> bytes | None:
    """The VPD page *page*, or None if we do not offer it."""
    if page == 0x00:
        return _vpd(0x00, bytes(_VPD_PAGES))
    if page == 0x80:
        return _vpd(0x80, info.serial.encode("ascii"))
    if page == 0x83:
        naa = bytes([0x01, 0x03, 0x00, len(info.naa)]) + info.naa  # binary, LU, NAA
        t10 = _ascii(info.vendor, 8) + info.serial.encode("ascii")
        t10 = bytes([0x02, 0x01, 0x00, len(t10)]) + t10  # ASCII, LU, T10 vendor id
        return _vpd(0x83, naa + t10)
    if page == 0xB0:
        body = bytearray(0x3C)
        ratio = info.physical_block_size // info.block_size
        struct.pack_into(">H", body, 2, ratio)  # OPTIMAL TRANSFER LENGTH GRANULARITY
        struct.pack_into(">I", body, 4, info.max_transfer_blocks)
        struct.pack_into(">I", body, 8, min(info.optimal_transfer_bytes // info.block_size, info.max_transfer_blocks))
        if info.thin:
            struct.pack_into(">I", body, 16, info.max_unmap_blocks)  # MAXIMUM UNMAP LBA COUNT
            struct.pack_into(">I", body, 20, info.max_unmap_descriptors)
            struct.pack_into(">I", body, 24, ratio)  # OPTIMAL UNMAP GRANULARITY
            struct.pack_into(">I", body, 28, 0x80000000)  # UGAVALID, alignment 0
        struct.pack_into(">Q", body, 32, info.max_unmap_blocks)  # MAXIMUM WRITE SAME LENGTH
        return _vpd(0xB0, bytes(body))
    if page == 0xB1:
        body = bytearray(0x3C)
        struct.pack_into(">H", body, 0, 0x0001)  # non-rotating medium
        return _vpd(0xB1, bytes(body))
    if page == 0xB2:
        body = bytearray(4)
        if info.thin:
            body[1] = 0x80 | 0x40 | 0x20 | 0x04  # LBPU, LBPWS, LBPWS10, LBPRZ=001b
            body[2] = 0x02  # thin provisioned
        return _vpd(0xB2, bytes(body))
    return None


def _inquiry(cdb, data_out, info):
    evpd, page, alloc = cdb[1] & 0x01, cdb[2], _be(cdb, 3, 2)
    if cdb[1] & 0xFE:  # CMDDT (obsolete) and reserved bits
        return invalid_field(1)
    if not evpd:
        if page:
            return invalid_field(2)
        return _good(standard_inquiry(info), alloc)
    data = vpd_page(page, info)
    if data is None:
        return invalid_field(2)
    return _good(data, alloc)


# READ CAPACITY ----------------------------------------------------------------------------


def _read_capacity_10(cdb, data_out, info):
    if not cdb[8] & 0x01 and _be(cdb, 2, 4):  # PMI = 0 requires LBA = 0
        return invalid_field(2)
    last = min(info.blocks - 1, 0xFFFFFFFF)
    return Result(GOOD, struct.pack(">II", last, info.block_size))


def read_capacity_16_data(info: DeviceInfo) -> bytes:
    """READ CAPACITY (16) parameter data (32 bytes)."""
    data = bytearray(32)
    struct.pack_into(">QI", data, 0, info.blocks - 1, info.block_size)
    exponent = (info.physical_block_size // info.block_size).bit_length() - 1
    data[13] = exponent & 0x0F  # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
    if info.thin:
        data[14] = 0x80 | 0x40  # LBPME, LBPRZ
    return bytes(data)


def _service_action_in(cdb, data_out, info):
    if cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
        return invalid_field(1, 4)
    return _good(read_capacity_16_data(info), _be(cdb, 10, 4))


# MODE SENSE / MODE SELECT -----------------------------------------------------------------

_PC_CURRENT, _PC_CHANGEABLE, _PC_DEFAULT, _PC_SAVED = 0, 1, 2, 3


def _caching_page(info: DeviceInfo, changeable: bool) -> bytes:
    page = bytearray(20)
    page[0], page[1] = 0x08, 0x12
    if not changeable and not info.read_only:
        page[2] = 0x04  # WCE: writes are durable only after SYNCHRONIZE CACHE
    return bytes(page)


def _control_page(info: DeviceInfo, changeable: bool) -> bytes:
    page = bytearray(12)
    page[0], page[1] = 0x0A, 0x0A
    if not changeable:
        page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    return bytes(page)


_MODE_PAGES = {0x08: _caching_page, 0x0A: _control_page}


def _mode_pages(info: DeviceInfo, page: int, changeable: bool) -> bytes | None:
    if page == 0x3F:
        return b"".join(make(info, changeable) for _, make in sorted(_MODE_PAGES.items()))
    make = _MODE_PAGES.get(page)
    return make(info, changeable) if make else None


def _block_descriptor(info: DeviceInfo, long_lba: bool) -> bytes:
    if long_lba:
        return struct.pack(">Q4xI", info.blocks, info.block_size)
    return struct.pack(">I", min(info.blocks, 0xFFFFFFFF)) + struct.pack(">I", info.block_size & 0xFFFFFF)


def _mode_sense(cdb: bytes, info: DeviceInfo, ten: bool) -> Result:
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    alloc = _be(cdb, 7, 2) if ten else cdb[4]
    if pc == _PC_SAVED:
        return check(SenseKey.ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED)
    if subpage not in (0x00, 0xFF) or (subpage == 0xFF and page != 0x3F):
        return invalid_field(3)
    pages = _mode_pages(info, page, pc == _PC_CHANGEABLE)
    if pages is None:
        return invalid_field(2)
    descriptor = b"" if dbd else _block_descriptor(info, llbaa)
    device_specific = (0x80 if info.read_only else 0x00) | 0x10  # WP, DPOFUA
    if ten:
        total = 8 + len(descriptor) + len(pages)
        header = struct.pack(">HBBBxH", total - 2, 0, device_specific, 0x01 if llbaa and descriptor else 0,
                             len(descriptor))
    else:
        total = 4 + len(descriptor) + len(pages)
        header = bytes([total - 1, 0, device_specific, len(descriptor)])
    return _good(header + descriptor + pages, alloc)


def _mode_sense_6(cdb, data_out, info):
    return _mode_sense(cdb, info, ten=False)


def _mode_sense_10(cdb, data_out, info):
    return _mode_sense(cdb, info, ten=True)


def _mode_select(cdb: bytes, data_out: bytes | None, info: DeviceInfo, ten: bool) -> Result:
    """Accept a parameter list that keeps every value as it is (nothing here is changeable)."""
    length = _be(cdb, 7, 2) if ten else cdb[4]
    if length == 0:
        return GOOD_RESULT
    data = bytes(data_out or b"")
    if len(data) < length:
        return PARAM_LENGTH
    data = data[:length]
    header = 8 if ten else 4
    if length < header:
        return PARAM_LENGTH
    desc_len = _be(data, 6, 2) if ten else data[3]
    pos = header
    if header + desc_len > length:
        return PARAM_LENGTH
    if desc_len:
        long_lba = ten and bool(data[4] & 0x01)
        size = 16 if long_lba else 8
        if desc_len % size:
            return invalid_param(6 if ten else 3)
        for off in range(pos, pos + desc_len, size):
            block_len = _be(data, off + 12, 4) if long_lba else _be(data, off + 5, 3)
            if block_len not in (0, info.block_size):
                return invalid_param(off + (12 if long_lba else 5))
        pos += desc_len
    while pos < length:
        if pos + 2 > length:
            return PARAM_LENGTH
        code, page_len = data[pos] & 0x3F, data[pos + 1]
        if data[pos] & 0x40:  # SPF: no subpages here
            return invalid_param(pos, 6)
        end = pos + 2 + page_len
        if end > length:
            return PARAM_LENGTH
        make = _MODE_PAGES.get(code)
        if make is None:
            return invalid_param(pos)
        current = make(info, False)
        if page_len != current[1]:
            return invalid_param(pos + 1)
        for i in range(2, len(current)):
            if data[pos + i] != current[i]:
                return invalid_param(pos + i)
        pos = end
    return GOOD_RESULT


def _mode_select_6(cdb, data_out, info):
    return _mode_select(cdb, data_out, info, ten=False)


def _mode_select_10(cdb, data_out, info):
    return _mode_select(cdb, data_out, info, ten=True)


# READ / WRITE / VERIFY / SYNCHRONIZE CACHE -------------------------------------------------


def _lba_count(cdb: bytes) -> tuple[int, int]:
    """(LBA, transfer length in blocks) of a READ/WRITE-family CDB."""
    op = cdb[0]
    if op in (Opcode.READ_6, Opcode.WRITE_6):
        lba = _be(cdb, 1, 3) & 0x1FFFFF
        return lba, cdb[4] or 256  # 0 means 256 blocks in the 6-byte form
    if op in (Opcode.READ_10, Opcode.WRITE_10, Opcode.VERIFY_10, Opcode.SYNCHRONIZE_CACHE_10,
              Opcode.WRITE_SAME_10):
        return _be(cdb, 2, 4), _be(cdb, 7, 2)
    if op in (Opcode.READ_12, Opcode.WRITE_12):
        return _be(cdb, 2, 4), _be(cdb, 6, 4)
    return _be(cdb, 2, 8), _be(cdb, 10, 4)  # the 16-byte forms


def _length_field(cdb: bytes) -> int:
    """Byte index of the TRANSFER LENGTH field (for the sense field pointer)."""
    return {6: 4, 10: 7, 12: 6, 16: 10}[CDB_LENGTH[cdb[0]]]


def _in_range(info: DeviceInfo, lba: int, count: int) -> bool:
    return lba <= info.blocks and lba + count <= info.blocks if count else lba < info.blocks


def _read(cdb, data_out, info):
    if cdb[0] != Opcode.READ_6 and cdb[1] & 0xE0:  # RDPROTECT: no protection information
        return invalid_field(1, 7)
    lba, count = _lba_count(cdb)
    if count > info.max_transfer_blocks:
        return invalid_field(_length_field(cdb))
    if not _in_range(info, lba, count):
        return OUT_OF_RANGE
    if count == 0:
        return GOOD_RESULT
    return ReadOp(lba * info.block_size, count * info.block_size)


def _write(cdb, data_out, info):
    if cdb[0] != Opcode.WRITE_6 and cdb[1] & 0xE0:  # WRPROTECT
        return invalid_field(1, 7)
    lba, count = _lba_count(cdb)
    if count > info.max_transfer_blocks:
        return invalid_field(_length_field(cdb))
    if info.read_only:
        return WRITE_PROTECT
    if not _in_range(info, lba, count):
        return OUT_OF_RANGE
    if count == 0:
        return GOOD_RESULT
    nbytes = count * info.block_size
    if data_out is None or len(data_out) < nbytes:
        return invalid_field(_length_field(cdb))
    fua = cdb[0] != Opcode.WRITE_6 and bool(cdb[1] & 0x08)
    return WriteOp(lba * info.block_size, bytes(data_out[:nbytes]), fua)


def _verify(cdb, data_out, info):
    if cdb[1] & 0xE0:
        return invalid_field(1, 7)
    if cdb[1] & 0x06:  # BYTCHK: comparing against data-out is not offered
        return invalid_field(1, 2)
    lba, count = _lba_count(cdb)
    if not _in_range(info, lba, count):
        return OUT_OF_RANGE
    return GOOD_RESULT


def _synchronize_cache(cdb, data_out, info):
    lba, count = _lba_count(cdb)
    if not _in_range(info, lba, count):
        return OUT_OF_RANGE
    return FlushOp()


# WRITE SAME / UNMAP ------------------------------------------------------------------------


def _write_same(cdb, data_out, info):
    flags = cdb[1]
    if flags & 0xE0:  # WRPROTECT
        return invalid_field(1, 7)
    if flags & 0x10:  # ANCHOR: anchored state not offered
        return invalid_field(1, 4)
    if flags & 0x06:  # PBDATA / LBDATA
        return invalid_field(1, 2)
    unmap = bool(flags & 0x08)
    ndob = cdb[0] == Opcode.WRITE_SAME_16 and bool(flags & 0x01)
    lba, count = _lba_count(cdb)
    if info.read_only:
        return WRITE_PROTECT
    if lba >= info.blocks:
        return OUT_OF_RANGE
    if count == 0:  # WSNZ = 0: zero means "to the last block"
        count = info.blocks - lba
    if count > info.max_unmap_blocks:
        return invalid_field(10 if cdb[0] == Opcode.WRITE_SAME_16 else 7)
    if not _in_range(info, lba, count):
        return OUT_OF_RANGE
    if ndob:
        pattern = bytes(info.block_size)
    else:
        if data_out is None or len(data_out) < info.block_size:
            return invalid_field(10 if cdb[0] == Opcode.WRITE_SAME_16 else 7)
        pattern = bytes(data_out[: info.block_size])
    offset, length = lba * info.block_size, count * info.block_size
    if unmap and not any(pattern):
        # LBPRZ: an unmapped block reads as zeros, which is exactly the pattern
        return DiscardOp(((offset, length),))
    return WriteSameOp(offset, length, pattern)


def _unmap(cdb, data_out, info):
    if cdb[1] & 0x01:  # ANCHOR
        return invalid_field(1, 0)
    length = _be(cdb, 7, 2)
    if info.read_only:
        return WRITE_PROTECT
    if length == 0:
        return GOOD_RESULT
    if length < 8:
        return PARAM_LENGTH
    data = bytes(data_out or b"")
    if len(data) < length:
        return PARAM_LENGTH
    data = data[:length]
    desc_len = _be(data, 2, 2)
    if desc_len % 16 or 8 + desc_len > length:
        return PARAM_LENGTH
    count = desc_len // 16
    if count > info.max_unmap_descriptors:
        return invalid_param(2)
    ranges = []
    total = 0
    for i in range(count):
        off = 8 + 16 * i
        lba, blocks = _be(data, off, 8), _be(data, off + 8, 4)
        if not _in_range(info, lba, blocks):
            return OUT_OF_RANGE
        total += blocks
        if blocks:
            ranges.append((lba * info.block_size, blocks * info.block_size))
    if total > info.max_unmap_blocks:
        return invalid_param(8)
    return DiscardOp(tuple(ranges)) if ranges else GOOD_RESULT


_HANDLERS = {
    Opcode.TEST_UNIT_READY: _test_unit_ready,
    Opcode.REQUEST_SENSE: _request_sense,
    Opcode.INQUIRY: _inquiry,
    Opcode.MODE_SELECT_6: _mode_select_6,
    Opcode.MODE_SENSE_6: _mode_sense_6,
    Opcode.START_STOP_UNIT: _start_stop_unit,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: _prevent_allow,
    Opcode.READ_CAPACITY_10: _read_capacity_10,
    Opcode.MODE_SELECT_10: _mode_select_10,
    Opcode.MODE_SENSE_10: _mode_sense_10,
    Opcode.SERVICE_ACTION_IN_16: _service_action_in,
    Opcode.REPORT_LUNS: _report_luns,
    Opcode.VERIFY_10: _verify,
    Opcode.VERIFY_16: _verify,
    Opcode.SYNCHRONIZE_CACHE_10: _synchronize_cache,
    Opcode.SYNCHRONIZE_CACHE_16: _synchronize_cache,
    Opcode.WRITE_SAME_10: _write_same,
    Opcode.WRITE_SAME_16: _write_same,
    Opcode.UNMAP: _unmap,
    **{op: _read for op in (Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16)},
    **{op: _write for op in (Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16)},
}


# --- the I/O shell -------------------------------------------------------------------------

WRITE_SAME_CHUNK = 1 << 20  # bytes of pattern written per call, so memory stays bounded


def error_result(exc: BaseException, op: Op) -> Result:
    """The one mapping from a block-source error to SCSI sense data."""
    reading = isinstance(op, ReadOp)
    if isinstance(exc, (IntegrityError, FetchError)):
        return check(SenseKey.MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
    if isinstance(exc, ReadOnlyError):
        return WRITE_PROTECT
    if isinstance(exc, RangeError):
        return OUT_OF_RANGE
    if isinstance(exc, (LazyfsError, OSError)):
        return check(SenseKey.MEDIUM_ERROR, UNRECOVERED_READ_ERROR if reading else WRITE_ERROR)
    log.error("unexpected error from block source during %r", op, exc_info=exc)
    return check(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE)


async def run_op(source: BlockSource, op: Op, data_in: memoryview | None = None) -> Result:
    """Run one I/O request against *source*; errors come back as sense data.

    *data_in*: the command's data-in buffer, when it is one contiguous piece of memory: a read
    then goes straight into it (``Result.placed``) instead of through a bytes object.
    """
    try:
        if isinstance(op, ReadOp):
            if data_in is not None and len(data_in) >= op.length:
                n = await source.read_into(op.offset, data_in[: op.length])
                if n != op.length:
                    log.error("short read from block source: %d of %d bytes at %d", n, op.length, op.offset)
                    return check(SenseKey.MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
                return Result(GOOD, placed=n)
            data = await source.read(op.offset, op.length)
            if len(data) != op.length:
                log.error("short read from block source: %d of %d bytes at %d", len(data), op.length, op.offset)
                return check(SenseKey.MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
            return Result(GOOD, data)
        if isinstance(op, WriteOp):
            await source.write(op.offset, op.data)
            if op.fua:
                await source.flush()
            return GOOD_RESULT
        if isinstance(op, WriteSameOp):
            chunk = op.pattern * max(1, min(op.length, WRITE_SAME_CHUNK) // len(op.pattern))
            done = 0
            while done < op.length:
                n = min(len(chunk), op.length - done)
                await source.write(op.offset + done, chunk[:n])
                done += n
            if op.fua:
                await source.flush()
            return GOOD_RESULT
        if isinstance(op, DiscardOp):
            for offset, length in op.ranges:
                await source.discard(offset, length)
            return GOOD_RESULT
        if isinstance(op, FlushOp):
            await source.flush()
            return GOOD_RESULT
        raise TypeError(f"unknown I/O request {op!r}")
    except Exception as exc:  # only a CHECK CONDITION leaves the SCSI layer
        return error_result(exc, op)


async def execute(source: BlockSource, cdb: bytes, data_out: bytes | None, info: DeviceInfo,
                  data_in: memoryview | None = None) -> Result:
    """Serve one command completely: decode it, run its I/O against *source* (*data_in*: see run_op)."""
    outcome = handle(cdb, data_out, info)
    if isinstance(outcome, Result):
        return outcome
    return await run_op(source, outcome, data_in)
