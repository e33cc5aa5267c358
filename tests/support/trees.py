"""Describe directory trees so two can be compared: types, modes, owners, content, links, xattrs."""

from __future__ import annotations

import hashlib
import os
import stat


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def describe_tree(root: str, skip: tuple[str, ...] = ("lost+found",), mtimes: bool = True) -> dict[str, tuple]:
    """``relative path -> (type, mode, uid, gid, size, sha256 | link target | rdev, xattrs, hardlink group, mtime)``."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(d for d in dirnames if not (rel_dir == "." and d in skip))
        for name in [*dirnames, *sorted(filenames)]:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                content = h.hexdigest()
            elif stat.S_ISLNK(kind):
                content = os.readlink(path)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                content = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                content = None
            group = None
            if stat.S_ISREG(kind) and st.st_nlink > 1:
                group = inodes.setdefault(st.st_ino, rel)
            size = st.st_size if not stat.S_ISDIR(kind) else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, content, _xattrs(path), group,
                        int(st.st_mtime) if mtimes and not stat.S_ISDIR(kind) else None)
    return out


def tree_differences(a: dict[str, tuple], b: dict[str, tuple]) -> list[str]:
    """Human-readable differences between two described trees (empty when equal)."""
    diffs = [f"only in first: {p}" for p in sorted(a.keys() - b.keys())]
    diffs += [f"only in second: {p}" for p in sorted(b.keys() - a.keys())]
    diffs += [f"{p}: {a[p]} != {b[p]}" for p in sorted(a.keys() & b.keys()) if a[p] != b[p]]
    return diffs
