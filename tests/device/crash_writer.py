"""Child process for the crash test: writes and flushes until killed.

Usage: crash_writer.py DIR KIND SEED. Prints "FLUSHED <n>" after each flush
covering ops [0, n); the parent SIGKILLs it at a random moment.
"""

import os
import random
import sys

from lazyfs.device.writable import create_writable

BLOCKS = 512


def op(seed: int, i: int) -> tuple[str, int, int, bytes]:
    rng = random.Random(seed * 1_000_003 + i)
    start = rng.randrange(BLOCKS - 8)
    count = rng.randint(1, 8)
    if rng.random() < 0.15:
        return "discard", start, count, b""
    return "write", start, count, bytes([i % 251 + 1]) * 16 + rng.randbytes(count * 4096 - 16)


def main() -> None:
    root, kind, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    layer = create_writable(root, kind, BLOCKS * 4096)
    rng = random.Random(seed)
    os.write(1, b"READY\n")
    for i in range(1_000_000):
        what, start, count, data = op(seed, i)
        if what == "write":
            layer.write_blocks(start, data)
        else:
            layer.zero_blocks(start, count)
        if rng.random() < 0.2:
            layer.flush()
            os.write(1, b"FLUSHED %d\n" % (i + 1))


if __name__ == "__main__":
    main()
