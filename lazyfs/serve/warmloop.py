"""How a read-only image's loop device is attached, so warm reads are served by the kernel.

Three read paths reach the same bytes (docs/warm.md):

* ``direct``: loop with O_DIRECT on the FUSE-exported file. One cached copy (ext4's, above the
  loop); every block the loop reads is a FUSE request answered by Python.
* ``buffered``: loop with buffered I/O on the FUSE-exported file, which read-only exports open
  with ``keep_cache``. A block read once stays in the exported file's page cache, and the loop
  reads it from there without a FUSE request: the kernel serves warm reads. Cost: the block can
  be cached twice (ext4's page cache above the loop, the exported file's below it).
* ``hydrated``: loop with O_DIRECT on the image's hydrated local file (``hydrated.py``): no
  FUSE at all, like a local loop file.

Writable images always use ``direct``: a buffered loop would acknowledge a guest flush only
for what reached lazyfs, which holds (the loop's flush is an fsync of the file), but it would
also keep a second copy of every written block; docs/warm.md explains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lazyfs.config import Config
from lazyfs.serve import hydratedfiles, syscmd


@dataclass(frozen=True, slots=True)
class LoopPlan:
    """Which file a mount's loop device reads, and how: *path*, *direct_io*, and *route*
    ("direct", "buffered" or "hydrated") for the mount output."""

    path: str
    direct_io: bool
    route: str

    def note(self) -> str | None:
        if self.route == "hydrated":
            return f"served from the hydrated local file {self.path} (no FUSE)"
        return None


def plan(config: Config, attached: dict, writable: bool) -> LoopPlan:
    """The loop device for an attachment the daemon returned (*attached*: its ``describe()``
    plus ``path``), following the config's ``read_only_loop`` and any hydrated file."""
    if writable:
        return LoopPlan(attached["path"], True, "direct")
    if config.hydrated_max_bytes > 0:
        found = hydratedfiles.existing(config.cache_root, attached["manifest"], attached["size"])
        if found is not None:
            return LoopPlan(found.path, True, "hydrated")
    if config.read_only_loop == "buffered":
        return LoopPlan(attached["path"], False, "buffered")
    return LoopPlan(attached["path"], True, "direct")


def route_of(dev: str) -> str:
    """What a live loop device reads: "hydrated" (a file under a hydrated directory), else
    "buffered" or "direct" from its dio flag (for statistics and tests)."""
    with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as f:
        back = f.read().rstrip("\n")
    if os.path.basename(os.path.dirname(back)) == hydratedfiles.DIRNAME:
        return "hydrated"
    return "direct" if syscmd.loop_direct_io(dev) else "buffered"


__all__ = ["LoopPlan", "plan", "route_of"]
