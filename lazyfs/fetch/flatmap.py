"""Sans-IO core of the flat cache's map: which blocks of a layer file are held, and their hashes.

The map file is a header plus an append-only log of records, each closed by a
blake3 of its own bytes (docs/cache.md): ``S first count hashes`` (blocks held,
with the blake3-128 of each block) and ``C first count`` (blocks dropped).
Replaying stops at the first torn, altered or out-of-range record.
"""

from __future__ import annotations

import mmap
import struct

import blake3

__all__ = ["GROUP", "HASH_LEN", "MAP_HEADER", "BlockMap", "block_hashes", "encode_clear", "encode_set"]

HASH_LEN = 16  # bytes of blake3 kept per block: tamper detection needs a second preimage, 2**128 work
MAP_MAGIC = b"LZFSFMAP"
MAP_HEADER = struct.Struct("<8sHHIQ")  # magic, version, hash length, block size, blocks
MAP_VERSION = 1
_REC = struct.Struct("<cQI")  # kind, first block, count
_SET, _CLEAR = b"S", b"C"
_CHECK = 16  # blake3 of the record's bytes, closing it (a torn or altered record ends the log)
MAX_RECORD_BLOCKS = 1 << 16  # 256 MiB of 4 KiB blocks per record
GROUP = 256  # blocks per 4 KiB page of hashes (a page of memory per MiB cached, touched when first set)


def block_hashes(data: bytes | bytearray | memoryview, block_size: int) -> bytes:
    """The HASH_LEN-byte blake3 of each whole block of *data*, concatenated."""
    view = memoryview(data)
    return b"".join([blake3.blake3(view[i : i + block_size]).digest(HASH_LEN) for i in range(0, len(view), block_size)])


class BlockMap:
    """Sans-IO: which blocks of a layer file hold verified data, and what each hashes to.

    Also the codec of the map log: :meth:`replay` applies records,
    :func:`encode_set`/:func:`encode_clear` make them.
    """

    def __init__(self, blocks: int, block_size: int) -> None:
        self.blocks, self.block_size = blocks, block_size
        self._bits = bytearray((blocks + 7) // 8)
        # one anonymous mapping: the kernel gives a page its memory when it is first written, so
        # the hashes cost memory only where blocks are held; its address never moves, so the
        # FUSE threads' C path reads it in place (``buffers``)
        self._hashes = mmap.mmap(-1, max(1, blocks * HASH_LEN))
        self.count = 0  # blocks held

    def buffers(self) -> tuple[bytearray, mmap.mmap]:
        """The bit array (bit ``b & 7`` of byte ``b >> 3``: block *b* held) and the hashes
        (HASH_LEN bytes per block), for readers outside Python; neither is ever resized."""
        return self._bits, self._hashes

    def header(self) -> bytes:
        return MAP_HEADER.pack(MAP_MAGIC, MAP_VERSION, HASH_LEN, self.block_size, self.blocks)

    def has(self, block: int) -> bool:
        return bool(self._bits[block >> 3] & (1 << (block & 7)))

    def covered(self, start: int, end: int) -> bool:
        """Whether every block of ``[start, end)`` is held."""
        bits = self._bits
        b = start
        while b < end:  # whole bytes at a time where aligned
            if b & 7 == 0 and b + 8 <= end:
                if bits[b >> 3] != 0xFF:
                    return False
                b += 8
            else:
                if not bits[b >> 3] & (1 << (b & 7)):
                    return False
                b += 1
        return True

    def hashes(self, start: int, end: int) -> bytes:
        """The recorded hashes of blocks ``[start, end)`` (all held), concatenated."""
        return self._hashes[start * HASH_LEN : end * HASH_LEN]

    def set(self, start: int, hashes: bytes) -> None:
        """Blocks from *start* are held with these hashes (one slice copy, whole bitmap bytes where
        aligned: this runs on the trio thread for every chunk written). The hashes are written
        before the bits, so a reader that sees a bit set sees its hash."""
        count = len(hashes) // HASH_LEN
        self._check(start, count)
        end = start + count
        self._hashes[start * HASH_LEN : end * HASH_LEN] = hashes
        bits = self._bits
        b = start
        while b < end:
            if b & 7 == 0 and b + 8 <= end:
                self.count += 8 - bits[b >> 3].bit_count()
                bits[b >> 3] = 0xFF
                b += 8
            else:
                m = 1 << (b & 7)
                if not bits[b >> 3] & m:
                    bits[b >> 3] |= m
                    self.count += 1
                b += 1

    def clear(self, start: int, count: int) -> None:
        self._check(start, count)
        for b in range(start, start + count):
            if self.has(b):
                self._bits[b >> 3] &= ~(1 << (b & 7)) & 0xFF
                self.count -= 1

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.blocks:
            raise ValueError(f"blocks [{start}, {start + count}) outside a map of {self.blocks}")

    def replay(self, log_bytes: bytes) -> int:
        """Apply the records of *log_bytes* (after the header); return how many bytes were valid.

        Stops at the first record that is torn, fails its checksum or lies outside the map.
        """
        view = memoryview(log_bytes)
        pos = 0
        while pos + _REC.size + _CHECK <= len(view):
            kind, start, count = _REC.unpack_from(view, pos)
            if kind not in (_SET, _CLEAR) or count > MAX_RECORD_BLOCKS or start + count > self.blocks:
                break
            body = _REC.size + (count * HASH_LEN if kind == _SET else 0)
            end = pos + body + _CHECK
            if end > len(view) or blake3.blake3(view[pos : pos + body]).digest(_CHECK) != view[pos + body : end]:
                break
            if kind == _SET:
                self.set(start, bytes(view[pos + _REC.size : pos + body]))
            else:
                self.clear(start, count)
            pos = end
        return pos


def encode_set(start: int, hashes: bytes) -> bytes:
    body = _REC.pack(_SET, start, len(hashes) // HASH_LEN) + hashes
    return body + blake3.blake3(body).digest(_CHECK)


def encode_clear(start: int, count: int) -> bytes:
    body = _REC.pack(_CLEAR, start, count)
    return body + blake3.blake3(body).digest(_CHECK)
