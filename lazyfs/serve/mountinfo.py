"""The mounts of a mount namespace, read from /proc/PID/mountinfo (no trio, never touches a mount).

``parse_mountinfo`` is sans-IO; ``mounts`` reads the namespace lazyfs mounts in (``hostns``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lazyfs.serve import hostns


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo (the fields lazyfs needs)."""

    mount_id: int
    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str
    #: the optional fields (propagation tags): ``shared:N`` (peer group N), ``master:N`` (a
    #: slave of peer group N), ``propagate_from:N``, ``unbindable``; none for a private mount
    tags: tuple[str, ...] = ()

    @property
    def is_slave(self) -> bool:
        """Whether unmounts in the peer group this mount was copied from reach it (``master:N``)."""
        return any(t.startswith("master:") for t in self.tags)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse the text of /proc/<pid>/mountinfo (sans-IO)."""
    entries = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
            major, minor = parts[2].split(":")
            entries.append(MountEntry(int(parts[0]), int(major), int(minor), _unescape(parts[4]),
                                      parts[sep + 1], _unescape(parts[sep + 2]), tuple(parts[6:sep])))
        except (ValueError, IndexError):
            continue  # a line we do not understand is not one we are looking for
    return entries


def mounts() -> list[MountEntry]:
    """The mounts of this process's namespace, or of the host's (``lazyfs.serve.hostns``)."""
    with open(hostns.mountinfo_path(hostns.configured())) as f:
        return parse_mountinfo(f.read())


def mount_at(path: str | os.PathLike) -> MountEntry | None:
    """What is mounted at *path* (the topmost mount), or None."""
    want = os.path.abspath(path)
    found = None
    for entry in mounts():
        if entry.mountpoint == want:
            found = entry  # the last one is on top
    return found


def is_mountpoint(path: str | os.PathLike) -> bool:
    """Whether something is mounted at *path*; never touches the mount itself."""
    return mount_at(path) is not None
