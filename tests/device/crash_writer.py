"""Child process for the crash and power-loss tests: writes and flushes a writable layer.

Usage: crash_writer.py DIR KIND SEED [--open] [--ops N] [--compact-bytes B] [--skip-fsync SITE]

Prints "READY" once the layer is created (or opened, with --open) and
"FLUSHED <n>" after each flush that returned, covering ops [0, n). Runs until
killed, or for N ops (then flushes, prints "DONE" and exits 0). If the layer
reports an error (the power-loss test cuts the power under it) it prints
"ERROR <message>" and exits 3.

--skip-fsync SITE turns the fsyncs of one call site into no-ops, to show that
the power-loss test notices. A site is the function that calls os.fsync or
os.fdatasync (``WritableLayer.flush``, ``Journal.append``, ...); for calls made
through ``fsync_dir`` it is ``fsync_dir<-CALLER``; ``*`` skips every fsync.
"""

import argparse
import os
import random
import sys

import lazyfs.device.writable.base as writable_base
from lazyfs.device.writable import create_writable, open_writable
from lazyfs.errors import LazyfsError

BLOCKS = 512


def op(seed: int, i: int) -> tuple[str, int, int, bytes]:
    rng = random.Random(seed * 1_000_003 + i)
    start = rng.randrange(BLOCKS - 8)
    count = rng.randint(1, 8)
    if rng.random() < 0.15:
        return "discard", start, count, b""
    return "write", start, count, bytes([i % 251 + 1]) * 16 + rng.randbytes(count * 4096 - 16)


def fsync_site(frame) -> str:
    """The call site of an fsync: the calling function, and through fsync_dir its caller."""
    name = frame.f_code.co_qualname
    if name == "fsync_dir":
        return f"fsync_dir<-{frame.f_back.f_code.co_qualname}"
    return name


def skip_fsyncs_of(site: str) -> None:
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def sync(fd, _real=real):
            if site == "*" or fsync_site(sys._getframe(1)) == site:
                return None
            return _real(fd)

        setattr(os, name, sync)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("kind")
    parser.add_argument("seed", type=int)
    parser.add_argument("--open", action="store_true", help="open the existing layer instead of creating one")
    parser.add_argument("--ops", type=int, default=1_000_000)
    parser.add_argument("--compact-bytes", type=int)
    parser.add_argument("--skip-fsync")
    args = parser.parse_args()
    if args.compact_bytes is not None:
        writable_base.COMPACT_BYTES = args.compact_bytes
    if args.skip_fsync:
        skip_fsyncs_of(args.skip_fsync)
    seed = args.seed
    try:
        layer = open_writable(args.root) if args.open else create_writable(args.root, args.kind, BLOCKS * 4096)
        rng = random.Random(seed)
        os.write(1, b"READY\n")
        for i in range(args.ops):
            what, start, count, data = op(seed, i)
            if what == "write":
                layer.write_blocks(start, data)
            else:
                layer.zero_blocks(start, count)
            if rng.random() < 0.2:
                layer.flush()
                os.write(1, b"FLUSHED %d\n" % (i + 1))
        layer.flush()
        os.write(1, b"FLUSHED %d\nDONE\n" % args.ops)
    except (LazyfsError, OSError) as exc:
        os.write(1, f"ERROR {exc}\n".encode())
        sys.exit(3)


if __name__ == "__main__":
    main()
