"""Where an image's hydrated file lives, and whether a complete one is there (no trio).

``hydrated`` builds the files (docs/warm.md); ``lazyfs mount`` only looks for one here before
it attaches its loop device (``warmloop``), so this part loads nothing of the daemon.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lazyfs.errors import NotFoundError

DIRNAME = "hydrated"


@dataclass(frozen=True, slots=True)
class Hydrated:
    """A complete hydrated file: *path*, its *size* in bytes, and the *manifest* it was built from."""

    path: str
    size: int
    manifest: str


def directory(cache_root: str) -> str:
    return os.path.join(cache_root, DIRNAME)


def path_for(cache_root: str, manifest: str) -> str:
    """Where the hydrated file of the image with manifest digest *manifest* lives (whether or not it exists)."""
    algo, _, hexdigest = manifest.partition(":")
    if not hexdigest or not hexdigest.isalnum() or not algo.isalnum():
        raise NotFoundError(f"not a manifest digest: {manifest!r}")
    return os.path.join(directory(cache_root), f"{algo}-{hexdigest}.img")


def existing(cache_root: str, manifest: str, size: int) -> Hydrated | None:
    """The complete hydrated file of *manifest*, if there is one of exactly *size* bytes.

    A file of another size is not this image's disk (never served); None then.
    """
    path = path_for(cache_root, manifest)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if st.st_size != size:
        import logging  # here, not at the top: `lazyfs mount` looks for hydrated files and seldom logs (issue 14)

        logging.getLogger("lazyfs.serve.hydrated").warning(  # one log name for hydrated files, as before the split
            "hydrated file %s is %d bytes, the image %d: ignored", path, st.st_size, size)
        return None
    return Hydrated(path, size, manifest)
