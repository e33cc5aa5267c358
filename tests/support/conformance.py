"""The conformance suite every BlockSource in lazyfs must pass.

``await check_source(make)`` drives a fresh source from ``make()`` (an async
factory returning ``(source, model_bytes)``) with aligned, unaligned,
boundary-crossing and past-the-end I/O, comparing every read against a
``bytearray`` model (``read`` and ``read_into``). Raises AssertionError on the first divergence.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import trio

from lazyfs.device.source import BLOCK_SIZE, BlockSource
from lazyfs.errors import RangeError, ReadOnlyError

SourceFactory = Callable[[], Awaitable[tuple[BlockSource, bytes]]]


async def _expect_read(src: BlockSource, model: bytearray, offset: int, length: int) -> None:
    got = await src.read(offset, length)
    want = bytes(model[offset : offset + length]) if offset < len(model) else b""
    assert got == want, f"read({offset}, {length}) differs from the model (got {len(got)} bytes, want {len(want)})"
    # read_into fills a caller's buffer that is not zero (the TCMU data area holds earlier data):
    # every byte, holes included, is written, and nothing past what it returns is touched
    buf = bytearray(b"\xa5" * length)
    n = await src.read_into(offset, memoryview(buf))
    assert n == len(want) and buf[:n] == want, f"read_into({offset}, {length}) differs from the model"
    assert buf[n:] == b"\xa5" * (length - n), f"read_into({offset}, {length}) wrote past the {n} bytes it returned"
    # read_local (FUSE worker threads: any thread but trio's) serves a read whole or declines it, never differs
    before = _bytes_read(src)
    local = await trio.to_thread.run_sync(src.read_local, offset, length)
    assert local is None or local == want, f"read_local({offset}, {length}) differs from the model"
    if local is not None and before is not None:  # its bytes count like any read's (the image's read metrics)
        assert _bytes_read(src) - before == len(local), f"read_local({offset}, {length}) is not counted in bytes_read"


def _bytes_read(src: BlockSource) -> int | None:
    statistics = getattr(src, "statistics", None)
    return statistics().get("bytes_read") if statistics is not None else None


async def check_reads(src: BlockSource, model: bytearray, seed: int = 0) -> None:
    """Reads of every shape agree with *model*."""
    size = src.size
    assert size == len(model), f"size {size} != model {len(model)}"
    rng = random.Random(seed)
    shapes = [(0, 1), (0, BLOCK_SIZE), (1, BLOCK_SIZE), (BLOCK_SIZE - 1, 2), (0, size), (size - 1, 1),
              (size - 1, 10), (size, 1), (size + BLOCK_SIZE, 4), (max(0, size - BLOCK_SIZE - 3), BLOCK_SIZE + 100),
              (0, 0), (size // 2, 0)]
    for _ in range(40):
        off = rng.randrange(0, size)
        shapes.append((off, rng.choice([1, 511, BLOCK_SIZE, 3 * BLOCK_SIZE + 5, 1 << 17, 1 << 20])))
    for off, length in shapes:
        await _expect_read(src, model, off, length)
    for bad in [(-1, 1), (0, -1)]:
        try:
            await src.read(*bad)
        except RangeError:
            pass
        else:
            raise AssertionError(f"read{bad} did not raise RangeError")


async def check_writes(src: BlockSource, model: bytearray, seed: int = 0, rounds: int = 60) -> None:
    """Writes, discards and flushes of every shape, then reads, agree with *model*."""
    size = src.size
    rng = random.Random(seed)
    for i in range(rounds):
        op = rng.random()
        off = rng.randrange(0, size)
        length = min(size - off, rng.choice([1, 7, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE - 3, 70000]))
        if op < 0.6:
            data = rng.randbytes(length) if rng.random() < 0.8 else bytes(length)
            await src.write(off, data)
            model[off : off + length] = data
        elif op < 0.85:
            await src.discard(off, length)
            model[off : off + length] = bytes(length)
        else:
            await src.flush()
        if i % 7 == 0:
            await _expect_read(src, model, max(0, off - 5000), length + 10000)
    # writes that touch the very end, and ones that cross it
    await src.write(size - 3, b"end")
    model[size - 3 :] = b"end"
    await _expect_read(src, model, size - 10, 20)
    for off, length in [(size - 1, 2), (size, 1), (-1, 1)]:
        try:
            await src.write(off, b"x" * length)
        except RangeError:
            pass
        else:
            raise AssertionError(f"write at {off} of {length} bytes past the end did not raise RangeError")
    try:
        await src.discard(size - 1, 2)
    except RangeError:
        pass
    else:
        raise AssertionError("discard past the end did not raise RangeError")
    await src.flush()
    await check_reads(src, model, seed + 1)


async def check_read_only(src: BlockSource) -> None:
    """A read-only source refuses writes and discards with ReadOnlyError."""
    assert src.read_only
    for call in (lambda: src.write(0, b"x"), lambda: src.discard(0, BLOCK_SIZE)):
        try:
            await call()
        except ReadOnlyError:
            pass
        else:
            raise AssertionError("a read-only source accepted a write")


async def check_source(make: SourceFactory, seed: int = 0) -> None:
    """Run the whole suite on fresh sources from *make*."""
    src, data = await make()
    try:
        model = bytearray(data)
        await check_reads(src, model, seed)
        if src.read_only:
            await check_read_only(src)
        else:
            await check_writes(src, model, seed)
    finally:
        await src.aclose()
