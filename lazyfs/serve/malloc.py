"""glibc malloc settings for the daemon, made with ``mallopt`` when it starts.

They used to be environment variables set by ``lazyfs mount`` when it spawned the daemon, so a
daemon started any other way (``systemctl start lazyfs``, the snapshotter's unit) ran without
them. An environment variable of the same name still wins (glibc read it at start-up).

- ``M_MMAP_THRESHOLD`` 32 MiB: big reads allocate fresh megabyte buffers; keeping them on the heap
  instead of mmap/munmap per request roughly triples FUSE read throughput (measured).
- ``M_TRIM_THRESHOLD`` 64 MiB: keep freed heap instead of trimming it back to the kernel after
  every request; a fresh 4 MiB buffer otherwise page-faults its way in again (alloc + fill +
  bytes() of 4 MiB: 1.9x faster, measured; the cost is up to 64 MiB of RSS kept).
- ``M_ARENA_MAX`` 2: each thread that frees a big buffer keeps it in its own arena, where another
  thread's next buffer cannot reuse it (glibc makes up to 8 per core). A tail bomb decompressed in
  worker threads took the daemon's peak RSS to 245-279 MiB with the default and 157-162 MiB with 2
  (tests/serve/test_bombs.py, under load); most big allocations are made under the GIL anyway, so
  the arenas' locks are not contended.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

applied: dict[str, int] = {}
"""What the last ``tune`` made, by variable name (the daemon logs it once it owns its run dir)."""

# mallopt parameters (malloc.h) and the environment variable glibc reads for each
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
SETTINGS: tuple[tuple[int, str, int], ...] = (
    (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 32 << 20),
    (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 64 << 20),
    (M_ARENA_MAX, "MALLOC_ARENA_MAX", 2),
)


def tune(environ: dict[str, str] | None = None) -> dict[str, int]:
    """Apply SETTINGS that the environment does not set; the ones applied, by variable name.
    Call it before the daemon starts threads. Empty where the C library has no ``mallopt`` (not
    glibc): nothing to tune there."""
    environ = os.environ if environ is None else environ
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied.clear()
    for param, name, value in SETTINGS:
        if name in environ:
            continue
        if mallopt(param, value) == 1:
            applied[name] = value
        else:
            log.warning("mallopt(%d, %d) failed: %s left at its default", param, value, name)
    return dict(applied)
