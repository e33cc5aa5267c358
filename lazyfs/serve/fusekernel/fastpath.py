"""The FUSE worker threads' READ path in C (``native/fastread.c``; docs/warm.md §4).

The worker threads of a session (``Session._serve_threaded``) call ``Server.serve``, which reads
the connection and answers, with the GIL released, every READ whose blocks the export's flat
layer files hold and whose 4 KiB blocks hash as the layer's map says. What it declines comes back
to Python, which answers it as before (``ExportFS.read_local``, then the trio thread).

Python tells it which handles it may answer: the first READ of a handle that Python served from
local storage registers the export's plan (``MergedDevice.local_plan``) under that handle id, and
releasing the handle drops it. The module is built by ``pip install`` (setup.py); without it, or
with ``fuse_native_reads = false``, the threads answer in Python alone.
"""

from __future__ import annotations

import logging
import threading

try:
    from lazyfs.serve.fusekernel import _fastread
except ImportError as exc:  # not built (a source tree without `pip install`): the Python path serves
    _fastread = None
    _MISSING = str(exc)

__all__ = ["available", "counter", "counter_in", "server", "why_unavailable"]

log = logging.getLogger(__name__)
_slots = threading.Lock()


def available() -> bool:
    return _fastread is not None


def why_unavailable() -> str | None:
    return None if _fastread is not None else f"the C READ path is not built ({_MISSING})"


def server(enabled: bool = True):
    """A ``_fastread.Server`` for one ExportFS, or None (disabled, or not built: said once in the log)."""
    if not enabled:
        return None
    if _fastread is None:
        log.warning("%s: FUSE worker threads answer warm reads in Python", why_unavailable())
        return None
    return _fastread.Server()


def counter():
    """The counters of one export's READs answered in C (None without the module)."""
    return None if _fastread is None else _fastread.Counter()


def counter_in(owner):
    """The counter in *owner*'s ``native_counter`` slot (a device's or a flat cache's, as
    ``MergedDevice.local_plan`` names them), made at first use; any thread."""
    with _slots:
        if owner.native_counter is None:
            owner.native_counter = _fastread.Counter()
        return owner.native_counter
