"""Writable layers (sparse, log) under a writable root, separate from read-only data."""

from __future__ import annotations

import os
import shutil

from lazyfs.device.writable.base import DATA, KINDS, LOWER, ZERO, WritableLayer, read_descriptor, write_descriptor
from lazyfs.device.writable.log import LogLayer
from lazyfs.device.writable.sparse import SparseLayer
from lazyfs.durable import fsync_dir, makedirs_durable, storage_error
from lazyfs.errors import BusyError, ConfigError

__all__ = ["DATA", "LOWER", "ZERO", "WritableLayer", "create_writable", "open_writable"]
_CLASSES = {"sparse": SparseLayer, "log": LogLayer}


def create_writable(root: str, kind: str, virtual_size: int, block_size: int = 4096, base: str | None = None) -> WritableLayer:
    """Make a new, empty writable layer in directory *root* (created; must be empty)."""
    if kind not in KINDS:
        raise ConfigError(f"writable layer kind {kind!r}: choose one of {', '.join(KINDS)}")
    root = os.path.abspath(root)
    if os.path.exists(root):
        if os.listdir(root):
            raise BusyError(f"{root} is not empty; refusing to create a writable layer there")
        os.rmdir(root)
    # build it beside, then rename: a crash never leaves a half-made layer at *root*
    staging = f"{root}.creating-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        makedirs_durable(os.path.dirname(root))
        os.mkdir(staging)
        write_descriptor(staging, kind, virtual_size, block_size, base)
        _CLASSES[kind](staging, virtual_size, block_size, create=True).close()
        os.rename(staging, root)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise storage_error(f"cannot create writable layer {root}", exc) from None
        raise
    try:
        fsync_dir(os.path.dirname(root))  # the rename is what makes the layer exist
    except OSError as exc:
        raise storage_error(f"cannot create writable layer {root}", exc) from None
    return open_writable(root)

def open_writable(root: str) -> WritableLayer:
    """Reopen the writable layer in *root*, replaying its journal (FormatError if damaged)."""
    doc = read_descriptor(root)
    return _CLASSES[doc["kind"]](root, doc["virtual_size"], doc["block_size"], create=False)


def writable_base(root: str) -> str | None:
    """The image a writable layer was created over, as recorded at creation."""
    return read_descriptor(root).get("base")
