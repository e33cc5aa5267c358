"""A reader loop for restart tests, run as a subprocess:

    python3 tests/support/reader.py ROOT EXPECTED.json PROGRESS STOP [--min-passes-after-stop N] [--log FILE]

Reads every file named in EXPECTED.json (``{relative path: sha256 hex}``) under ROOT, pass after
pass, dropping each file's cached pages first (``posix_fadvise(DONTNEED)``) so every pass reaches
the block device below. After each pass it rewrites PROGRESS with ``{"passes", "longest_read"}``
(seconds: the longest single file read so far, a daemon restart's gap shows up there).

With ``--log FILE``, one line per file read: ``START DURATION`` (CLOCK_MONOTONIC seconds, shared by
every process of the host, so a benchmark can match reads with the restarts it made).

Exit status: 0 after N passes (default 2) completed once the file STOP exists; 7 at the first
read error (the message on stderr); 8 at the first checksum mismatch; 9 when 2000 passes went by
without STOP (a bound, never hit in a sane test).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time


def read_file(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        while True:
            block = os.read(fd, 1 << 20)
            if not block:
                return h.hexdigest()
            h.update(block)
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    root, expected_path, progress, stop = argv[:4]
    options = dict(zip(argv[4::2], argv[5::2]))
    after = int(options.get("--min-passes-after-stop", 2))
    log = open(options["--log"], "a", buffering=1) if "--log" in options else None
    with open(expected_path) as f:
        expected = json.load(f)
    longest, passes, after_stop = 0.0, 0, 0
    for _ in range(2000):
        stopping = os.path.exists(stop)
        for rel, digest in sorted(expected.items()):
            started = time.monotonic()
            try:
                got = read_file(os.path.join(root, rel))
            except OSError as exc:
                print(f"read error on {rel} in pass {passes + 1}: {exc}", file=sys.stderr, flush=True)
                return 7
            took = time.monotonic() - started
            longest = max(longest, took)
            if log is not None:
                log.write(f"{started:.6f} {took:.6f}\n")
            if got != digest:
                print(f"checksum mismatch on {rel} in pass {passes + 1}", file=sys.stderr, flush=True)
                return 8
        passes += 1
        tmp = progress + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"passes": passes, "longest_read": longest}, f)
        os.replace(tmp, progress)
        if stopping:
            after_stop += 1
            if after_stop >= after:
                return 0
    return 9


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
