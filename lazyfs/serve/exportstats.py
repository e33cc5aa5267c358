"""The statistics of a FUSE export tree: one table for both front ends.

``lazyfs.serve.fusekernel.exports`` (the default) and ``lazyfs.serve.fuse`` (pyfuse3) count the
same things; ``statistics`` and ``export_statistics`` shape them into the dict that
``ExportFS.statistics()`` returns, the control API's ``fuse-stats`` answers and
``lazyfs.serve.metrics`` exports (its FUSE and EXPORT tables name these keys).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class Counters:
    """Totals over every export, kept by the front end."""

    requests: int = 0
    errors: int = 0
    failures: int = 0  # errors that were not a LazyfsError/OSError: bugs
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    fsyncs: int = 0
    opens: int = 0
    passthrough_opens: int = 0
    largest_read: int = 0
    largest_write: int = 0


def export_statistics(exp) -> dict:
    """One export's counters. *exp* has ``source``, ``open_handles`` and the per-export counters
    (``reads`` … ``errors``); ``backing_id`` / ``passthrough_opens`` where the front end passes
    opens through (absent: never)."""
    return {"size": exp.source.size, "read_only": exp.source.read_only, "open_handles": exp.open_handles,
            "reads": exp.reads, "writes": exp.writes, "bytes_read": exp.bytes_read,
            "bytes_written": exp.bytes_written, "flushes": exp.flushes, "errors": exp.errors,
            "passthrough": bool(getattr(exp, "backing_id", 0)),
            "passthrough_opens": getattr(exp, "passthrough_opens", 0)}


def statistics(c: Counters, *, open_handles: int, exports: dict, passthrough: bool, **extra: int) -> dict:
    """The front end's statistics: totals *c*, open handles, whether passthrough is available,
    front-end specific counters *extra*, and ``exports`` (name -> export) in name order."""
    return {"requests": c.requests, "errors": c.errors, "failures": c.failures, "reads": c.reads,
            "writes": c.writes, "bytes_read": c.bytes_read, "bytes_written": c.bytes_written,
            "flushes": c.flushes, "fsyncs": c.fsyncs, "opens": c.opens, "open_handles": open_handles,
            "passthrough_opens": c.passthrough_opens, "passthrough": passthrough, **extra,
            "largest_read": c.largest_read, "largest_write": c.largest_write,
            "exports": {name: export_statistics(exp) for name, exp in sorted(exports.items())}}
