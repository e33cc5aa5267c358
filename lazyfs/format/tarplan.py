"""Sans-IO planning of OCI tar layers applied over a filesystem tree.

Everything that decides *what* a layer entry does lives here, as pure code:

* ``split_name``: an archive name -> path components inside the root, or a
  FormatError for absolute names and ``..`` that climbs out of the root;
* ``plan_entry``: a ``TarEntry`` -> ``Put`` (create or replace), ``Whiteout``
  (remove a lower path), ``Opaque`` (hide a directory's lower contents), or
  ``None`` for entries that only carry overlay bookkeeping;
* ``Walk``: resolution of an entry's parent directories one component at a
  time, following symlinks the way a process chrooted into the root would
  (absolute targets start again at the root), but refusing -- instead of
  clamping at ``/`` -- any walk that would climb above the root;
* ``UpperPaths``: the set of resolved paths this layer wrote, so whiteouts and
  opaque markers never remove what the same layer created (OCI image spec,
  "Whiteouts": they apply to lower layers only);
* ``LayerStats`` / ``next_fs_size``: how big the ext4 must be to take a layer.

The I/O shell (``lazyfs.image.tarapply``) asks these objects and performs the
file operations with directory file descriptors, never following a symlink
it did not resolve through ``Walk``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from lazyfs.errors import FormatError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."  # AUFS hard-link bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content
MAX_SYMLINK_FOLLOWS = 40  # what Linux allows in one path walk

Path = tuple[str, ...]


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One archive member, as the reader decoded it (names are str with surrogate escapes)."""

    name: str
    kind: Kind
    mode: int = 0o644  # permission bits including setuid, setgid and sticky (0o7777)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int | None = None
    size: int = 0  # the logical size (for sparse files, holes included)
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    sparse: tuple[tuple[int, int], ...] | None = None  # (offset, length) of the data regions


@dataclass(frozen=True, slots=True)
class Put:
    """Create *path* as *entry* describes (replacing what is there unless both are directories)."""

    path: Path
    entry: TarEntry
    link: Path | None = None  # hard links: the path of the existing file to link to


@dataclass(frozen=True, slots=True)
class Whiteout:
    """Remove *path* (recursively) where it comes from a lower layer."""

    path: Path


@dataclass(frozen=True, slots=True)
class Opaque:
    """Remove every lower-layer child of *directory*, keeping the directory."""

    directory: Path


Action = Put | Whiteout | Opaque


def describe(path: Path) -> str:
    return "/" + "/".join(path)


def split_name(name: str, what: str = "tar entry") -> Path:
    """The components of archive name *name* inside the root (``()`` is the root itself).

    ``.`` and empty components are dropped and ``..`` is resolved lexically, as
    OCI tools clean names. Absolute names, and ``..`` that climbs above the
    root, are FormatErrors naming the entry.
    """
    if "\0" in name:
        raise FormatError(f"{what} {name!r}: name contains a NUL byte")
    if name.startswith("/"):
        raise FormatError(f"{what} {name!r}: absolute path (would land outside the root)")
    parts: list[str] = []
    for component in name.split("/"):
        if component in ("", "."):
            continue
        if component == "..":
            if not parts:
                raise FormatError(f"{what} {name!r}: '..' climbs out of the root")
            parts.pop()
        else:
            parts.append(component)
    return tuple(parts)


def plan_entry(entry: TarEntry) -> Action | None:
    """What *entry* asks for; None for entries that carry no content (AUFS bookkeeping)."""
    path = split_name(entry.name)
    if not path:
        if entry.kind is not Kind.DIR:
            raise FormatError(f"tar entry {entry.name!r}: the root can only be a directory, not a {entry.kind.value}")
        return Put((), entry)
    leaf = path[-1]
    if leaf == OPAQUE_MARKER:
        return Opaque(path[:-1])
    if leaf.startswith(AUFS_META_PREFIX):
        return None
    if leaf.startswith(WHITEOUT_PREFIX):
        hidden = leaf[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", ".."):
            raise FormatError(f"tar entry {entry.name!r}: whiteout of {hidden!r} names nothing")
        return Whiteout(path[:-1] + (hidden,))
    if entry.kind is Kind.HARDLINK:
        link = split_name(entry.linkname, f"hard link {entry.name!r} ->")
        if not link:
            raise FormatError(f"tar entry {entry.name!r}: hard link to the root directory")
        if link == path:
            raise FormatError(f"tar entry {entry.name!r}: hard link to itself")
        return Put(path, entry, link)
    if entry.kind is Kind.SYMLINK and not entry.linkname:
        raise FormatError(f"tar entry {entry.name!r}: symlink with an empty target")
    return Put(path, entry)


# ---------------------------------------------------------------- parent resolution


@dataclass(frozen=True, slots=True)
class Lookup:
    """Look *name* up in the current directory (the last one entered) without following it."""

    name: str


@dataclass(frozen=True, slots=True)
class Up:
    """Leave the current directory for its parent (drop the last directory entered)."""


@dataclass(frozen=True, slots=True)
class Restart:
    """Go back to the root (an absolute symlink target): drop every directory entered."""


@dataclass(frozen=True, slots=True)
class Done:
    """The walk is over: the current directory is *path* (resolved, free of symlinks)."""

    path: Path


Step = Lookup | Up | Restart | Done


class Walk:
    """Resolve a directory path inside the root, component by component.

    Drive it with ``step()``; answer each ``Lookup`` with ``enter()`` (it is a
    directory, or one was just created there), ``follow(target)`` (it is a
    symlink) -- and the caller decides what to do with missing components and
    non-directories. ``Up`` and ``Restart`` tell the caller which directory is
    now current. FormatError when the walk would leave the root or loops.
    """

    def __init__(self, path: Path, entry_name: str) -> None:
        self._todo: deque[str] = deque(path)
        self._resolved: list[str] = []
        self._follows = 0
        self._entry = entry_name

    @property
    def resolved(self) -> Path:
        return tuple(self._resolved)

    def step(self) -> Step:
        while self._todo:
            component = self._todo[0]
            if component in ("", "."):
                self._todo.popleft()
                continue
            if component == "..":
                self._todo.popleft()
                if not self._resolved:
                    raise FormatError(f"tar entry {self._entry!r}: its path leaves the root through a symlink "
                                      f"(refusing to write outside the image)")
                self._resolved.pop()
                return Up()
            return Lookup(component)
        return Done(self.resolved)

    def enter(self) -> None:
        self._resolved.append(self._todo.popleft())

    def follow(self, target: str) -> Restart | None:
        """The looked-up component is a symlink to *target*: walk its target instead."""
        name = self._todo.popleft()
        self._follows += 1
        if self._follows > MAX_SYMLINK_FOLLOWS:
            raise FormatError(f"tar entry {self._entry!r}: too many levels of symbolic links "
                              f"(at {describe(self.resolved + (name,))})")
        if not target:
            raise FormatError(f"tar entry {self._entry!r}: {describe(self.resolved + (name,))} is an empty symlink")
        self._todo.extendleft(reversed(target.split("/")))
        if target.startswith("/"):
            self._resolved.clear()
            return Restart()
        return None


# ---------------------------------------------------------------- per-layer state


@dataclass(slots=True)
class UpperPaths:
    """Resolved paths written by the current layer, and every ancestor of them."""

    paths: set[Path] = field(default_factory=set)

    def add(self, path: Path) -> None:
        while path and path not in self.paths:
            self.paths.add(path)
            path = path[:-1]

    def __contains__(self, path: Path) -> bool:
        return path in self.paths


# ---------------------------------------------------------------- sizing

MIB = 1 << 20
SIZE_STEP = 128 * MIB  # whole ext4 block groups (32768 blocks of 4 KiB)
BYTES_PER_INODE = 16384  # mkfs -i: the inode density of every converted filesystem
MIN_FREE = 256 * MIB  # headroom left after every layer, for writable mounts
FS_BLOCK = 4096


def _blocks(n: int) -> int:
    return -(-n // FS_BLOCK) * FS_BLOCK


@dataclass(slots=True)
class LayerStats:
    """What one tar layer needs from the filesystem (a generous estimate)."""

    entries: int = 0
    inodes: int = 0  # new inodes: everything but hard links and whiteouts
    data_bytes: int = 0  # file data rounded to blocks, plus directory, symlink and xattr blocks
    tar_bytes: int = 0  # uncompressed size

    def add(self, entry: TarEntry, action: Action | None) -> None:
        self.entries += 1
        if not isinstance(action, Put) or entry.kind is Kind.HARDLINK:
            return
        self.inodes += 1
        if entry.kind is Kind.FILE:
            if entry.sparse is not None:
                stored = sum(_blocks(length) for _, length in entry.sparse)
            else:
                stored = _blocks(entry.size)
            self.data_bytes += stored + (FS_BLOCK if stored > 512 * MIB else 0)  # an extent index block
        elif entry.kind is Kind.DIR:
            self.data_bytes += FS_BLOCK
        elif entry.kind is Kind.SYMLINK and len(entry.linkname.encode("utf-8", "surrogateescape")) >= 60:
            self.data_bytes += FS_BLOCK
        if sum(len(k) + len(v) for k, v in entry.xattrs) > 96:  # does not fit in a 256-byte inode
            self.data_bytes += FS_BLOCK
        self.data_bytes += 64  # its directory entry


@dataclass(frozen=True, slots=True)
class FsUsage:
    """The counters of an existing filesystem (from its superblock)."""

    size: int
    free_bytes: int
    inodes: int
    free_inodes: int


def _round_up(n: int, step: int = SIZE_STEP) -> int:
    return -(-n // step) * step


def next_fs_size(usage: FsUsage | None, stats: LayerStats) -> int | None:
    """The filesystem size to apply a layer with *stats*: a first size, a bigger one, or None (fits).

    A pure function of its inputs, so the same chain of layers always gets the
    same sizes (which keeps conversion deterministic and layers shareable).
    """
    need = stats.data_bytes + stats.data_bytes // 4 + 16 * MIB
    need_inodes = stats.inodes + stats.inodes // 4 + 1024
    if usage is not None and usage.free_bytes >= need + MIN_FREE and usage.free_inodes >= need_inodes:
        return None
    used = 0 if usage is None else usage.size - usage.free_bytes
    used_inodes = 0 if usage is None else usage.inodes - usage.free_inodes
    # the overhead of ext4 itself (bitmaps, descriptors, reserved GDT blocks, inode tables)
    # is about 1/64 of the size with 256-byte inodes at one per 16 KiB; a new one also has a journal
    by_space = (used + need + MIN_FREE + (64 * MIB if usage is None else 0)) * 66 // 64
    by_inodes = (used_inodes + need_inodes) * BYTES_PER_INODE * 3 // 2
    size = _round_up(max(by_space, by_inodes, 2 * SIZE_STEP))
    if usage is not None:
        size = max(size, _round_up(usage.size + 1))
    return size
