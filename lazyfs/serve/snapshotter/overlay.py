"""The overlay side of the snapshotter: mount lists (pure), disk usage, moving and removing trees."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from lazyfs.errors import LazyfsError
from lazyfs.serve import system

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount for containerd to perform at the snapshot's target, in order."""

    type: str
    source: str
    options: tuple[str, ...]


def overlay_mounts(*, read_only: bool, upper: str, work: str, lowers: list[str], index_off: bool) -> list[Mount]:
    """The mounts of a snapshot with its own directory *upper* over *lowers* (nearest first).

    Nothing below: a bind mount of *upper* itself. A view over one layer: a read-only bind of it.
    Otherwise an overlay; a view's has no upper directory, which makes it read-only.
    """
    if not lowers:
        return [Mount("bind", upper, ("ro" if read_only else "rw", "rbind"))]
    if read_only and len(lowers) == 1:
        return [Mount("bind", lowers[0], ("ro", "rbind"))]
    options = ["index=off"] if index_off else []
    if not read_only:
        options += [f"workdir={work}", f"upperdir={upper}"]
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount("overlay", "overlay", tuple(options))]


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes allocated, inodes) under *path*, each hard-linked inode counted once."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def visit(p: str) -> None:
        nonlocal size
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512

    if not os.path.lexists(path):
        return 0, 0
    visit(path)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            visit(os.path.join(dirpath, name))
    return size, len(seen)


def move_tree(src: str, dst: str) -> None:
    """Move directory *src* to *dst* (absent): a rename on one file system, else a full copy.

    The copy keeps owners, modes, times, xattrs (overlay's opaque markers), device nodes
    (whiteouts) and hard links, goes to a temporary name, is synced, and only then renamed,
    so *dst* never holds half a tree.
    """
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dst + ".copying"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    done = subprocess.run(["cp", "-a", "--reflink=auto", src, tmp], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LazyfsError(f"copying {src} to {tmp} failed: {done.stderr.strip()}")
    subprocess.run(["sync", "-f", tmp], check=False, timeout=600)
    os.rename(tmp, dst)
    shutil.rmtree(src)


def remove_tree(path: str) -> None:
    """Remove *path* and everything under it, lazily unmounting whatever is mounted below first."""
    if not os.path.lexists(path):
        return
    prefix = os.path.abspath(path)
    mounted = sorted({m.mountpoint for m in system.mounts() if m.mountpoint == prefix or
                      m.mountpoint.startswith(prefix + "/")}, key=len, reverse=True)
    for target in mounted:
        try:
            # through system: in the host's namespace, where they were mounted (lazyfs.serve.hostns)
            system.umount_blocking(target, lazy=True)
        except LazyfsError as exc:
            log.warning("%s", exc)
    if any(m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/") for m in system.mounts()):
        raise LazyfsError(f"{path} still has mounts below it; not removing it")
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
