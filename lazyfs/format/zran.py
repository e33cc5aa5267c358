"""Random access into gzip streams: checkpoints at deflate block boundaries (zlib's zran idea).

A deflate stream can be resumed at the start of any block, given the 32 KiB
of uncompressed data before it (back-references reach that far) and, since
blocks are not byte aligned, the few bits of the byte the block starts in.
Python's ``zlib`` module exposes neither block boundaries (``Z_BLOCK``) nor
``inflatePrime``, so this module drives the system's libz through ctypes:

* ``GzipScanner``: one pass over a gzip blob (any number of members) that
  yields its uncompressed bytes and records a ``Checkpoint`` at the first
  block boundary after every *spacing* uncompressed bytes;
* ``inflate_from``: *length* uncompressed bytes from a checkpoint, given the
  compressed bytes from the checkpoint's first (partial) byte onwards,
  crossing member boundaries on the way;
* ``sparse_window``: a checkpoint's window with the bytes nothing after it
  refers back to set to zero, which packs to about a tenth of the size.

Pure computation over bytes (no files, no sockets); callers run it in a worker
thread. Every bad input is a ``FormatError`` (from the scanner) or an
``IntegrityError`` (from ``inflate_from``: the bytes a source served do not
decode as the index says they must).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from dataclasses import dataclass

from lazyfs.errors import FormatError, IntegrityError

WINDOW = 32 << 10
MAX_GZIP_HEADER = 64 << 10  # a gzip member header (name, comment, extra field) longer than this is refused
_Z_OK, _Z_STREAM_END, _Z_NEED_DICT, _Z_BUF_ERROR = 0, 1, 2, -5
_Z_NO_FLUSH, _Z_BLOCK = 0, 5


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


def _load_libz() -> ctypes.CDLL:
    # by its soname first: find_library runs `ldconfig -p`, a subprocess on every daemon start
    try:
        lib = ctypes.CDLL("libz.so.1")
    except OSError:
        lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so")
    ptr = ctypes.POINTER(_ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [ptr, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    for fn in (lib.inflate,):
        fn.argtypes = [ptr, ctypes.c_int]
    for fn in (lib.inflateEnd, lib.inflateReset):
        fn.argtypes = [ptr]
    lib.inflatePrime.argtypes = [ptr, ctypes.c_int, ctypes.c_int]
    lib.inflateSetDictionary.argtypes = [ptr, ctypes.c_char_p, ctypes.c_uint]
    return lib


_lib = _load_libz()


class _RawInflater:
    """One raw-deflate inflate stream of libz (windowBits -15); ``close()`` frees it."""

    def __init__(self) -> None:
        self.strm = _ZStream()
        ret = _lib.inflateInit2_(ctypes.byref(self.strm), -15, _lib.zlibVersion(), ctypes.sizeof(_ZStream))
        if ret != _Z_OK:
            raise MemoryError(f"inflateInit2 failed ({ret})")
        self._input = b""  # keeps the bytes next_in points into alive
        self._out: ctypes.Array | None = None
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            _lib.inflateEnd(ctypes.byref(self.strm))
            self.closed = True

    def __del__(self) -> None:
        self.close()

    def reset(self) -> None:
        _lib.inflateReset(ctypes.byref(self.strm))

    def prime(self, bits: int, value: int) -> None:
        if _lib.inflatePrime(ctypes.byref(self.strm), bits, value) != _Z_OK:
            raise FormatError("inflatePrime refused the checkpoint's bits")

    def set_dictionary(self, window: bytes) -> None:
        if window and _lib.inflateSetDictionary(ctypes.byref(self.strm), window, len(window)) != _Z_OK:
            raise FormatError("inflateSetDictionary refused the checkpoint's window")

    def feed(self, data: bytes) -> None:
        """Make *data* the input (whatever was left of the previous input is dropped)."""
        self._input = bytes(data)
        self.strm.next_in = ctypes.cast(ctypes.c_char_p(self._input), ctypes.c_void_p)
        self.strm.avail_in = len(self._input)

    @property
    def avail_in(self) -> int:
        return self.strm.avail_in

    def unused(self) -> bytes:
        return self._input[len(self._input) - self.strm.avail_in:]

    def inflate(self, max_out: int, flush: int) -> tuple[int, bytes]:
        """``(zlib return code, output)`` of one inflate call producing at most *max_out* bytes."""
        if self._out is None or len(self._out) < max_out:
            self._out = ctypes.create_string_buffer(max_out)  # reused: a fresh buffer per block costs more than inflating
        out = self._out
        self.strm.next_out = ctypes.cast(out, ctypes.c_void_p)
        self.strm.avail_out = max_out
        ret = _lib.inflate(ctypes.byref(self.strm), flush)
        produced = max_out - self.strm.avail_out
        return ret, ctypes.string_at(out, produced)


def gzip_header_length(data: bytes) -> int | None:
    """The length of the gzip member header at the start of *data*; None if *data* is too short to tell."""
    if len(data) < 10:
        return None
    if data[0] != 0x1F or data[1] != 0x8B or data[2] != 8:
        raise FormatError("not a gzip member header (magic or method)")
    flags = data[3]
    if flags & 0xE0:
        raise FormatError(f"gzip header has reserved flags {flags:#x}")
    pos = 10
    if flags & 4:  # FEXTRA
        if len(data) < pos + 2:
            return None
        pos += 2 + int.from_bytes(data[pos:pos + 2], "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            end = data.find(b"\0", pos, MAX_GZIP_HEADER)
            if end < 0:
                if len(data) >= MAX_GZIP_HEADER:
                    raise FormatError(f"gzip header longer than {MAX_GZIP_HEADER} bytes")
                return None
            pos = end + 1
    if flags & 2:  # FHCRC
        pos += 2
    if pos > MAX_GZIP_HEADER:
        raise FormatError(f"gzip header longer than {MAX_GZIP_HEADER} bytes")
    return pos if len(data) >= pos else None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where inflating can resume: uncompressed offset *out*, compressed offset *start* and *bits*.

    *start* is the offset of the first compressed byte to fetch. With *bits* > 0
    the block begins inside that byte: only its top *bits* bits belong to it.
    *window*: the (up to) 32 KiB of uncompressed data before *out* (empty at
    the start of a member, where nothing can be referred back to).
    """

    out: int
    start: int
    bits: int
    window: bytes


class GzipScanner:
    """A pass over a gzip blob: ``feed(compressed)`` yields uncompressed pieces; checkpoints pile up.

    Call ``finish()`` after the last piece (FormatError if the stream is cut short). The caller
    may take checkpoints out of ``checkpoints`` (their windows are the scan's memory).
    """

    def __init__(self, spacing: int, max_out: int = 1 << 20) -> None:
        if spacing <= 0:
            raise ValueError("checkpoint spacing must be positive")
        self.spacing = spacing
        self.max_out = max_out
        self.checkpoints: list[Checkpoint] = []
        self._last = -1  # uncompressed offset of the last checkpoint taken (-1: none yet)
        self.consumed = 0  # compressed bytes fully consumed (absolute offset of what comes next)
        self.out = 0  # uncompressed bytes produced
        self._history = b""  # the last WINDOW uncompressed bytes
        self._pending = b""  # compressed bytes not yet handed to libz (headers, trailers)
        self._state = "header"  # header | deflate | trailer | done
        self._inflater = _RawInflater()
        self.members = 0

    def _remember(self, piece: bytes) -> None:
        self.out += len(piece)
        self._history = piece[-WINDOW:] if len(piece) >= WINDOW else (self._history + piece)[-WINDOW:]

    def _take(self, cp: Checkpoint) -> None:
        self.checkpoints.append(cp)
        self._last = cp.out

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._pending += data
        for _ in range(1 << 30):  # bounded: each pass consumes input or produces output or returns
            if self._state == "header":
                if not self._pending:
                    return
                n = gzip_header_length(self._pending)
                if n is None:
                    if len(self._pending) >= MAX_GZIP_HEADER:
                        raise FormatError(f"gzip header longer than {MAX_GZIP_HEADER} bytes")
                    return
                self.consumed += n
                self._pending = self._pending[n:]
                self._inflater.reset()
                self._state = "deflate"
                self.members += 1
                # a member start is a checkpoint that needs no window
                if self._last < 0 or self.out - self._last >= self.spacing:
                    self._take(Checkpoint(self.out, self.consumed, 0, b""))
                self._history = b""
            elif self._state == "deflate":
                if not self._inflater.avail_in:
                    if not self._pending:
                        return
                    self._inflater.feed(self._pending)
                    self._pending = b""
                before = self._inflater.avail_in
                ret, piece = self._inflater.inflate(self.max_out, _Z_BLOCK)
                self.consumed += before - self._inflater.avail_in
                if piece:
                    self._remember(piece)
                    yield piece
                if ret == _Z_STREAM_END:
                    self._pending = self._inflater.unused() + self._pending
                    self._inflater.feed(b"")
                    self._state = "trailer"
                    continue
                if ret not in (_Z_OK, _Z_BUF_ERROR):
                    raise FormatError(f"gzip stream does not inflate at compressed byte {self.consumed} ({ret})")
                dt = self._inflater.strm.data_type
                if dt & 128 and not dt & 64 and self.out - self._last >= self.spacing:
                    bits = dt & 7
                    self._take(Checkpoint(self.out, self.consumed - (1 if bits else 0), bits, self._history))
                if ret == _Z_BUF_ERROR and not self._inflater.avail_in and not self._pending:
                    return
                if ret == _Z_BUF_ERROR and not piece and before == self._inflater.avail_in:
                    raise FormatError(f"gzip stream makes no progress at compressed byte {self.consumed}")
            elif self._state == "trailer":
                if len(self._pending) < 8:
                    return
                self.consumed += 8
                self._pending = self._pending[8:]
                self._state = "between"
            else:  # between members: another member, or zero padding to the end
                if not self._pending:
                    return
                if self._pending[0] == 0x1F:
                    self._state = "header"
                    continue
                if self._pending.strip(b"\0"):
                    raise FormatError(f"garbage after gzip member at compressed byte {self.consumed}")
                self.consumed += len(self._pending)
                self._pending = b""
                return
        raise AssertionError("unreachable")

    def finish(self) -> None:
        if self._state not in ("between",) or self.members == 0:
            raise FormatError(f"gzip stream ends early (in its {self._state}, {self.consumed} bytes in)")
        self._inflater.close()


def inflate_from(compressed: bytes, bits: int, window: bytes, skip: int, length: int, what: str) -> bytes:
    """*length* uncompressed bytes after skipping *skip*, resuming at a checkpoint.

    *compressed* starts at the checkpoint's ``start`` byte. IntegrityError if the
    bytes do not inflate to at least ``skip + length`` bytes.
    """
    if not 0 <= bits <= 7:
        raise FormatError(f"{what}: checkpoint bits {bits} out of range")
    inflater = _RawInflater()
    try:
        data = compressed
        if bits:
            if not data:
                raise IntegrityError(what, "compressed bytes", "nothing")
            inflater.prime(bits, data[0] >> (8 - bits))
            data = data[1:]
        inflater.set_dictionary(window)
        inflater.feed(data)
        out: list[bytes] = []
        need = skip + length
        got = 0
        pending = b""
        for _ in range(1 << 30):
            if got >= need:
                break
            ret, piece = inflater.inflate(min(need - got, 4 << 20), _Z_NO_FLUSH)
            if piece:
                out.append(piece)
                got += len(piece)
            if got >= need:
                break
            if ret == _Z_STREAM_END:  # the member ends inside the span: skip its trailer and the next header
                pending = inflater.unused()[8:]
                n = gzip_header_length(pending)
                if n is None:
                    raise IntegrityError(what, f"{need} bytes", f"{got} bytes and a cut gzip member header")
                inflater.reset()
                inflater.feed(pending[n:])
                continue
            if ret != _Z_OK or (not inflater.avail_in and not piece):
                raise IntegrityError(what, f"{need} inflated bytes", f"{got} (zlib says {ret})")
    except FormatError as exc:
        raise IntegrityError(what, "a gzip stream", str(exc)) from None
    finally:
        inflater.close()
    return b"".join(out)[skip:need]


# Windows whose bytes spell their own offset: the low byte, the high byte, the low byte inverted.
_SELF_LOW = bytes(range(256)) * (WINDOW >> 8)
_SELF_HIGH = b"".join(bytes([high]) * 256 for high in range(WINDOW >> 8))
_SELF_INVERTED = bytes(range(255, -1, -1)) * (WINDOW >> 8)


def sparse_window(compressed: bytes, bits: int, window: bytes, length: int, what: str) -> bytes:
    """*window* with every byte that the next *length* uncompressed bytes do not refer back to set to zero,
    or b"" when they refer to none of it.

    Inflating from the checkpoint with it gives the same bytes as with *window*,
    and it packs to about a tenth of the size (rapidgzip's sparse windows). Only
    the first ``WINDOW`` bytes after a checkpoint can refer into its window. The
    bytes they refer to are found without parsing deflate: inflate three times
    with windows whose bytes spell their own offset. An output byte that differs
    between the low-byte and the inverted run came from the window (a literal is
    the same in every run), at the offset the low and high runs spell.
    *compressed* and *bits* as for ``inflate_from``; IntegrityError if they do
    not inflate to *length* bytes.
    """
    size = len(window)
    length = min(length, WINDOW)
    if not size or length <= 0:
        return b""
    low, high, inverted = (inflate_from(compressed, bits, spelled[:size], 0, length, what)
                           for spelled in (_SELF_LOW, _SELF_HIGH, _SELF_INVERTED))
    out = bytearray(size)
    used = False
    for lo, hi, inv in zip(low, high, inverted):
        if lo != inv:
            at = lo | hi << 8
            out[at] = window[at]
            used = True
    return bytes(out) if used else b""
