"""The FUSE kernel protocol as pure code over bytes (sans-IO): requests in, replies out.

Struct layouts follow ``include/uapi/linux/fuse.h`` (protocol 7.40; this codec answers as 7.40
and refuses kernels older than 7.28). Everything is little-endian native x86-64/arm64 layout,
padded to 8 bytes as the header does.

- ``parse_request(buf)`` decodes one message read from /dev/fuse into a ``Request`` (header plus a
  typed argument value) or raises ``FormatError`` for a short or inconsistent message.
- ``reply(unique, *parts)`` / ``error_reply(unique, errno)`` build the iovec of an answer.
- ``negotiate(init)`` chooses the session's parameters (``SessionParams``) and builds the INIT reply.
- ``notify_resend()`` / ``notify_inval_entry(...)`` build unsolicited notifications.

Nothing here touches a file descriptor; ``lazyfs.serve.fusekernel.session`` does the I/O.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from lazyfs.errors import FormatError

KERNEL_VERSION = 7
OUR_MINOR = 40  # what this codec implements; RESEND arrived in 7.40
OLDEST_MINOR = 28  # max_pages in INIT; every struct below has its full size from here on
RESEND_MINOR = 40  # FUSE_NOTIFY_RESEND (kernel >= 6.9)

ROOT_ID = 1
UNIQUE_RESEND = 1 << 63  # set by the kernel in the unique of a request it sends again
UNIQUE_INTERRUPT = 1 << 0  # an INTERRUPT's unique is the interrupted request's | this

# opcodes (enum fuse_opcode)
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 20, 25, 26, 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET = 34, 35, 36, 38, 42
NAMESPACE_CHANGES = frozenset({6, 8, 9, 10, 11, 12, 13, CREATE, 45, 51})  # symlink mknod mkdir unlink rmdir
# rename link create rename2 tmpfile: what a fixed tree refuses with EPERM (not ENOSYS, which would read as a bug)

OPCODE_NAMES = {LOOKUP: "lookup", FORGET: "forget", GETATTR: "getattr", SETATTR: "setattr", OPEN: "open",
                READ: "read", WRITE: "write", STATFS: "statfs", RELEASE: "release", FSYNC: "fsync",
                FLUSH: "flush", INIT: "init", OPENDIR: "opendir", READDIR: "readdir", RELEASEDIR: "releasedir",
                FSYNCDIR: "fsyncdir", ACCESS: "access", CREATE: "create", INTERRUPT: "interrupt",
                DESTROY: "destroy", BATCH_FORGET: "batch_forget"}
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})  # the kernel waits for no answer to these

# notification codes (enum fuse_notify_code), sent as out_header.error with unique 0
NOTIFY_INVAL_ENTRY = 3
NOTIFY_RESEND = 7

# INIT flags (64 bits: flags | flags2 << 32 when FUSE_INIT_EXT is set)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37
HAS_RESEND = 1 << 39  # the kernel can resend requests (informational, from the kernel)
WANTED_FLAGS = ASYNC_READ | BIG_WRITES | ASYNC_DIO | PARALLEL_DIROPS | MAX_PAGES | PASSTHROUGH

# FOPEN_* (open_out.open_flags)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5  # close(2) sends no FLUSH (kernel >= 5.13; older ones ignore the bit)
FOPEN_PASSTHROUGH = 1 << 7  # open_out.backing_id names the backing file the kernel reads and writes itself

# Passthrough (kernel >= 6.9, CONFIG_FUSE_PASSTHROUGH): ioctls on the connection's /dev/fuse fd.
# FUSE_DEV_IOC_BACKING_OPEN = _IOW(229, 1, struct fuse_backing_map) -> backing id (> 0);
# FUSE_DEV_IOC_BACKING_CLOSE = _IOW(229, 2, uint32_t backing id).
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding
IOC_BACKING_OPEN = 1 << 30 | BACKING_MAP.size << 16 | 229 << 8 | 1
IOC_BACKING_CLOSE = 1 << 30 | 4 << 16 | 229 << 8 | 2
# INIT's max_stack_depth when passthrough is wanted: backing files may live on a file system of
# stack depth 0 (ext4, xfs, tmpfs; not overlayfs), and the export itself counts as one level.
PASSTHROUGH_STACK_DEPTH = 1

# setattr_in.valid
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1 << 4, 1 << 5, 1 << 6
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 1 << 7, 1 << 8

FSYNC_FDATASYNC = 1 << 0

PAGE = 4096
MAX_WRITE = 1 << 20  # 256 pages: what libfuse negotiates too
MAX_PAGES_VALUE = MAX_WRITE // PAGE
READ_BUFFER = MAX_WRITE + PAGE  # header + write_in + max_write fits; the kernel insists on it
MIN_READ_BUFFER = 8192

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev blksize flags
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid entry_nsec attr_nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (then flags2 from 7.36)
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... max_pages map_alignment flags2 max_stack_depth unused[6]
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding (same for write_in)
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
INTERRUPT_IN = struct.Struct("<Q")
ACCESS_IN = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags

MAX_BATCH_FORGET = 1 << 16  # more than the kernel ever batches: anything above is a corrupt message


# -- decoded requests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int

    @property
    def resent(self) -> bool:
        """The kernel sent this request before, to a daemon that died before answering."""
        return bool(self.unique & UNIQUE_RESEND)


@dataclass(frozen=True, slots=True)
class Init:
    major: int
    minor: int
    max_readahead: int
    flags: int  # 64 bits: flags | flags2 << 32


@dataclass(frozen=True, slots=True)
class Lookup:
    name: bytes


@dataclass(frozen=True, slots=True)
class Forget:
    items: tuple[tuple[int, int], ...]  # (nodeid, nlookup)


@dataclass(frozen=True, slots=True)
class GetAttr:
    fh: int | None


@dataclass(frozen=True, slots=True)
class SetAttr:
    valid: int
    fh: int
    size: int
    atime_ns: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Open:
    flags: int


@dataclass(frozen=True, slots=True)
class Read:
    fh: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Write:
    fh: int
    offset: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class Release:
    fh: int
    flags: int


@dataclass(frozen=True, slots=True)
class Flush:
    fh: int


@dataclass(frozen=True, slots=True)
class Fsync:
    fh: int
    datasync: bool


@dataclass(frozen=True, slots=True)
class Interrupt:
    unique: int


@dataclass(frozen=True, slots=True)
class Access:
    mask: int


@dataclass(frozen=True, slots=True)
class NoArgs:
    pass


@dataclass(frozen=True, slots=True)
class Unknown:
    """An opcode this front end does not implement (answered with ENOSYS)."""


@dataclass(frozen=True, slots=True)
class Request:
    header: Header
    args: object


def _need(body: memoryview, st: struct.Struct, what: str) -> tuple:
    if len(body) < st.size:
        raise FormatError(f"FUSE {what}: {len(body)} argument bytes, need {st.size}")
    return st.unpack_from(body)


def parse_request(buf: bytes | bytearray | memoryview) -> Request:
    """Decode one message as read from /dev/fuse (exactly one read's bytes)."""
    view = memoryview(buf)
    if len(view) < IN_HEADER.size:
        raise FormatError(f"FUSE message of {len(view)} bytes is shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(view)
    if length != len(view):
        raise FormatError(f"FUSE message says {length} bytes, read {len(view)}")
    header = Header(length, opcode, unique, nodeid, uid, gid, pid)
    body = view[IN_HEADER.size:]
    return Request(header, _parse_args(opcode, nodeid, body))


def _parse_args(opcode: int, nodeid: int, body: memoryview) -> object:
    name = OPCODE_NAMES.get(opcode, str(opcode))
    if opcode == LOOKUP:
        raw = bytes(body)
        end = raw.find(b"\0")
        if end < 0:
            raise FormatError("FUSE lookup: name without a terminating NUL")
        return Lookup(raw[:end])
    if opcode in (READ, READDIR):
        fh, offset, size, *_ = _need(body, READ_IN, name)
        return Read(fh, offset, size)
    if opcode == WRITE:
        fh, offset, size, *_ = _need(body, READ_IN, name)
        data = body[READ_IN.size:]
        if len(data) != size:
            raise FormatError(f"FUSE write: says {size} bytes, carries {len(data)}")
        return Write(fh, offset, data)
    if opcode in (OPEN, OPENDIR):
        flags, _ = _need(body, OPEN_IN, name)
        return Open(flags)
    if opcode in (RELEASE, RELEASEDIR):
        fh, flags, _rflags, _owner = _need(body, RELEASE_IN, name)
        return Release(fh, flags)
    if opcode == FLUSH:
        return Flush(_need(body, FLUSH_IN, name)[0])
    if opcode in (FSYNC, FSYNCDIR):
        fh, fsync_flags, _ = _need(body, FSYNC_IN, name)
        return Fsync(fh, bool(fsync_flags & FSYNC_FDATASYNC))
    if opcode == GETATTR:
        flags, _, fh = _need(body, GETATTR_IN, name)
        return GetAttr(fh if flags & 1 else None)  # FUSE_GETATTR_FH
    if opcode == SETATTR:
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec,
         mode, _u4, uid, gid, _u5) = _need(body, SETATTR_IN, name)
        return SetAttr(valid, fh, size, atime * 10**9 + atimensec, mtime * 10**9 + mtimensec, mode, uid, gid)
    if opcode == FORGET:
        return Forget(((nodeid, _need(body, FORGET_IN, name)[0]),))
    if opcode == BATCH_FORGET:
        count, _ = _need(body, BATCH_FORGET_IN, name)
        if count > MAX_BATCH_FORGET or len(body) < BATCH_FORGET_IN.size + count * FORGET_ONE.size:
            raise FormatError(f"FUSE batch_forget: {count} entries do not fit in {len(body)} bytes")
        return Forget(tuple(FORGET_ONE.unpack_from(body, BATCH_FORGET_IN.size + i * FORGET_ONE.size)
                            for i in range(count)))
    if opcode == INTERRUPT:
        return Interrupt(_need(body, INTERRUPT_IN, name)[0])
    if opcode == ACCESS:
        return Access(_need(body, ACCESS_IN, name)[0])
    if opcode == INIT:
        major, minor, readahead, flags = _need(body, INIT_IN, name)
        if flags & INIT_EXT and len(body) >= INIT_IN.size + 4:
            flags |= struct.unpack_from("<I", body, INIT_IN.size)[0] << 32
        return Init(major, minor, readahead, flags)
    if opcode in (STATFS, DESTROY):
        return NoArgs()
    return Unknown()


# -- replies ----------------------------------------------------------------------------------------


def reply(unique: int, *parts: bytes | bytearray | memoryview) -> list:
    """The iovec of a successful answer to request *unique* carrying *parts*."""
    size = OUT_HEADER.size + sum(len(p) for p in parts)
    return [OUT_HEADER.pack(size, 0, unique), *parts]


def error_reply(unique: int, errno: int) -> list:
    """The iovec of a failed answer (the kernel wants the errno negated)."""
    if not 0 < errno < 4096:
        raise ValueError(f"not an errno: {errno}")
    return [OUT_HEADER.pack(OUT_HEADER.size, -errno, unique)]


@dataclass(frozen=True, slots=True)
class Attr:
    """What ``stat`` shows of one node (times in nanoseconds)."""

    ino: int
    mode: int
    nlink: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blksize: int = PAGE

    def pack(self) -> bytes:
        a, m, c = (divmod(t, 10**9) for t in (self.atime_ns, self.mtime_ns, self.ctime_ns))
        return ATTR.pack(self.ino, self.size, (self.size + 511) // 512, a[0], m[0], c[0], a[1], m[1], c[1],
                         self.mode, self.nlink, self.uid, self.gid, 0, self.blksize, 0)


def _split(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def entry_out(attr: Attr, entry_timeout: float, attr_timeout: float, generation: int = 0) -> bytes:
    e, en = _split(entry_timeout)
    a, an = _split(attr_timeout)
    return ENTRY_OUT_HEAD.pack(attr.ino, generation, e, a, en, an) + attr.pack()


def attr_out(attr: Attr, attr_timeout: float) -> bytes:
    a, an = _split(attr_timeout)
    return ATTR_OUT_HEAD.pack(a, an, 0) + attr.pack()


def open_out(fh: int, *, keep_cache: bool = False, direct_io: bool = False, no_flush: bool = False,
             backing_id: int = 0) -> bytes:
    """*backing_id* (> 0): the kernel serves this open's reads from that backing file (passthrough).
    *no_flush*: close(2) does not wait for the daemon (nothing to flush)."""
    flags = (FOPEN_KEEP_CACHE if keep_cache else 0) | (FOPEN_DIRECT_IO if direct_io else 0)
    flags |= FOPEN_NOFLUSH if no_flush else 0
    if backing_id:
        flags |= FOPEN_PASSTHROUGH
    return OPEN_OUT.pack(fh, flags, backing_id)


def backing_map(fd: int) -> bytes:
    """The argument of FUSE_DEV_IOC_BACKING_OPEN for file descriptor *fd*."""
    return BACKING_MAP.pack(fd, 0, 0)


def write_out(size: int) -> bytes:
    return WRITE_OUT.pack(size, 0)


def statfs_out(blocks: int, bfree: int, bavail: int, files: int, ffree: int, bsize: int, namelen: int,
               frsize: int) -> bytes:
    return KSTATFS.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, 0)


def dirent(ino: int, offset: int, name: bytes, dtype: int) -> bytes:
    """One ``fuse_dirent`` (name padded to 8 bytes); *offset* is where the next listing resumes."""
    raw = DIRENT_HEAD.pack(ino, offset, len(name), dtype) + name
    return raw + b"\0" * (-len(raw) % 8)


# -- INIT -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionParams:
    """What INIT settled for a connection; a daemon taking over the connection needs them."""

    minor: int  # the protocol minor both sides speak (min of theirs and ours)
    kernel_minor: int  # what the kernel supports (decides whether RESEND exists)
    flags: int  # the flags the session runs with (ours & the kernel's)
    kernel_flags: int  # everything the kernel offered
    max_readahead: int
    max_write: int

    @property
    def has_resend(self) -> bool:
        return self.kernel_minor >= RESEND_MINOR

    @property
    def passthrough(self) -> bool:
        """INIT settled FUSE_PASSTHROUGH: backing files may be registered and opens passed through."""
        return bool(self.flags & PASSTHROUGH)

    def to_json(self) -> str:
        return json.dumps({"minor": self.minor, "kernel_minor": self.kernel_minor, "flags": self.flags,
                           "kernel_flags": self.kernel_flags, "max_readahead": self.max_readahead,
                           "max_write": self.max_write})

    @classmethod
    def from_json(cls, text: str | bytes) -> "SessionParams":
        try:
            doc = json.loads(text)
            params = cls(**{k: int(doc[k]) for k in ("minor", "kernel_minor", "flags", "kernel_flags",
                                                       "max_readahead", "max_write")})
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"FUSE session parameters: {exc}") from None
        if not OLDEST_MINOR <= params.minor <= OUR_MINOR or params.max_write < PAGE:
            raise FormatError(f"FUSE session parameters out of range: {params}")
        return params


def negotiate(init: Init) -> tuple[SessionParams, bytes]:
    """The session parameters for the kernel's *init*, and the INIT reply's payload.

    FormatError for a kernel speaking another major or a minor older than 7.28.
    """
    if init.major != KERNEL_VERSION:
        raise FormatError(f"the kernel speaks FUSE {init.major}.{init.minor}; this front end speaks 7.x")
    if init.minor < OLDEST_MINOR:
        raise FormatError(f"the kernel speaks FUSE 7.{init.minor}; this front end needs 7.{OLDEST_MINOR} or newer")
    minor = min(init.minor, OUR_MINOR)
    flags = init.flags & WANTED_FLAGS
    if not init.flags & INIT_EXT:
        flags &= 0xFFFFFFFF  # flags2 (passthrough among them) travel only with FUSE_INIT_EXT
    params = SessionParams(minor, init.minor, flags, init.flags, init.max_readahead, MAX_WRITE)
    out_flags = flags | (INIT_EXT if init.flags & INIT_EXT else 0)
    payload = INIT_OUT.pack(KERNEL_VERSION, minor, init.max_readahead, out_flags & 0xFFFFFFFF,
                            64, 48,  # max_background, congestion_threshold: libfuse's picks for 64 workers
                            MAX_WRITE, 1, MAX_PAGES_VALUE, 0, (out_flags >> 32) & 0xFFFFFFFF,
                            PASSTHROUGH_STACK_DEPTH if flags & PASSTHROUGH else 0)
    return params, payload


# -- notifications ----------------------------------------------------------------------------------


def notify(code: int, *parts: bytes) -> list:
    size = OUT_HEADER.size + sum(len(p) for p in parts)
    return [OUT_HEADER.pack(size, code, 0), *parts]


def notify_resend() -> list:
    """Ask the kernel to send again every request read but not answered (by a dead daemon)."""
    return notify(NOTIFY_RESEND)


def notify_inval_entry(parent: int, name: bytes) -> list:
    """Drop the kernel's cached dentry *name* in directory *parent*."""
    return notify(NOTIFY_INVAL_ENTRY, NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0), name + b"\0")


# -- building requests (what the kernel sends; for tests and for replaying) ---------------------------


def build_request(opcode: int, unique: int, nodeid: int = ROOT_ID, body: bytes = b"", *, uid: int = 0,
                  gid: int = 0, pid: int = 0) -> bytes:
    """A message as the kernel would write it (the codec's tests speak to it like the kernel)."""
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid, 0, 0) + body
