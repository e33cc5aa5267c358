"""Telling local image references (OCI layout directories) from registry ones."""

from __future__ import annotations

import os
from dataclasses import dataclass

from lazyfs.errors import FormatError

DEFAULT_TAG = "latest"


@dataclass(frozen=True, slots=True)
class LocalRef:
    """``oci:DIR[:TAG]`` or a path (``/…``, ``./…``, ``../…``) with an optional ``:TAG``."""

    path: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"oci:{self.path}:{self.tag}"


def parse_local_ref(text: str) -> LocalRef | None:
    """A LocalRef if *text* names a local layout, else None (a registry reference)."""
    body = text[4:] if text.startswith("oci:") else text
    if not (text.startswith("oci:") or body.startswith(("/", "./", "../")) or os.path.isdir(body)):
        return None
    path, tag = body, DEFAULT_TAG
    head, sep, tail = body.rpartition(":")
    if sep and "/" not in tail and head:
        path, tag = head, tail
    if not path:
        raise FormatError(f"image reference {text!r} has no directory")
    if not tag or len(tag) > 128 or not all(c.isalnum() or c in "._-" for c in tag):
        raise FormatError(f"image reference {text!r}: bad tag {tag!r}")
    return LocalRef(os.path.abspath(path), tag)
