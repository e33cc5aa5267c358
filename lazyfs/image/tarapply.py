"""Reading OCI tar layers and applying them to a mounted filesystem, safely.

The decisions live in ``lazyfs.format.tarplan`` (sans-IO); this module is the
thin shell around it:

* ``open_layer``: a layer blob (gzip, zstd or plain tar) as a stream of tar
  bytes, hashed on the way so the diff ID can be checked;
* ``scan_layer``: a first pass that validates every name and hashes the whole
  stream *before* anything is written, and measures what the layer needs;
* ``LayerApplier``: performs each planned action with directory file
  descriptors -- every component is opened with ``O_NOFOLLOW``, symlinks met
  on the way are resolved through ``tarplan.Walk`` -- so no entry, however
  crafted, can touch anything outside the root.

Metadata follows tar semantics (and umoci, the test oracle): owner before
mode (chown clears setuid bits), xattrs after chown (chown drops
``security.capability``), times last; directory times are set when the layer
is done, and directories the layer only changed get their old times back.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gzip
import hashlib
import os
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import zstandard

from lazyfs.durable import pwrite_all, write_all
from lazyfs.errors import FormatError, IntegrityError, LazyfsError
from lazyfs.format.numbers import NS, decimal, pax_time_ns
from lazyfs.format.tarplan import (
    Done,
    Kind,
    LayerStats,
    Lookup,
    Opaque,
    Path,
    Put,
    Restart,
    TarEntry,
    Up,
    UpperPaths,
    Walk,
    Whiteout,
    describe,
    plan_entry,
)

COPY_SIZE = 1 << 20
DEFAULT_MAX_LAYER_BYTES = 32 << 30  # decompressed bytes of one layer (Config.convert_max_layer_bytes)
MAX_LAYER_ENTRIES = 1 << 21  # members of one layer: each costs memory while it is applied
MAX_EXTENDED_HEADER = 1 << 20  # one pax or GNU long-name header, and all global pax headers together
MAX_SPARSE_REGIONS = 1 << 16  # data regions of one sparse file
MAX_TAR_ID = (1 << 32) - 1  # uid, gid, device major and minor
MAX_FILE_SIZE = 1 << 44  # what ext4 holds in one file (16 TiB)
IGNORED_XATTRS = ("security.selinux", "system.nfs4_acl")  # host-specific: never part of an image
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What a layer removes is moved here (a directory at the root, made on the first removal) and deleted only
# after the last entry: ext4 without a journal skips inodes freed "recently" by wall-clock seconds
# (ialloc.c, recently_deleted()), so freeing inodes while the layer still creates files would make
# inode numbers depend on when a second ticks over (docs/convert.md §4).
GRAVEYARD = ".lazyfs-removed"
_ZERO_BLOCK = bytes(4096)

Progress = Callable[[int], None]


# ---------------------------------------------------------------- streams


class HashingReader:
    """A file-like reader that hashes (and counts, and maybe copies to *spool*) every byte read through it.

    More than *limit* bytes is a FormatError, raised before the bytes past it
    are hashed, spooled or handed on.
    """

    def __init__(self, inner, progress: Progress | None = None, spool=None, limit: int | None = None) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.count = 0
        self.progress = progress
        self.spool = spool
        self.limit = limit

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n if n is not None and n >= 0 else COPY_SIZE * 64)
        if self.limit is not None and self.count + len(data) > self.limit:
            raise FormatError(f"more than {self.limit} bytes decompressed (the config's convert_max_layer_bytes)")
        self.sha.update(data)
        self.count += len(data)
        if self.spool is not None:
            self.spool.write(data)
        if self.progress is not None and data:
            self.progress(len(data))
        return data

    def drain(self) -> None:
        while self.read(COPY_SIZE):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def sniff_compression(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def open_layer(path: str, compression: str):
    """The uncompressed tar stream of the layer blob at *path* (caller closes the returned file)."""
    raw = open(path, "rb")
    try:
        if compression == "gzip":
            return gzip.GzipFile(fileobj=raw, mode="rb")
        if compression == "zstd":
            return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        if compression == "none":
            return raw
    except BaseException:
        raw.close()
        raise
    raw.close()
    raise FormatError(f"layer compression {compression!r} is not supported (gzip, zstd or none)")


# ---------------------------------------------------------------- tar headers, bounded


_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)
_SPARSE_MAP_LINE = 32  # bytes of one decimal line of a GNU sparse 1.0 map, newline included, at most


class BoundedTarInfo(tarfile.TarInfo):
    """A tarfile member whose header parsing allocates a bounded amount of memory.

    tarfile reads a pax or GNU long-name header whole, however large its
    header claims it is, reads GNU sparse maps as long as they go on, and
    lets ValueError escape from malformed ones. These hooks bound each and
    turn every malformed header into FormatError. They use tarfile's
    ``_proc_member`` and ``_proc_gnusparse_*`` hooks (``TarFile.tarinfo`` is
    the documented way to plug a TarInfo subclass in); tests/image/test_tarbounds.py
    fails if those hooks move.
    """

    def _proc_member(self, tarfile_):
        if self.type in _EXTENDED and self.size > MAX_EXTENDED_HEADER:
            raise FormatError(f"tar header at byte {self.offset}: an extended header of {self.size} bytes "
                              f"(at most {MAX_EXTENDED_HEADER})")
        try:
            member = super()._proc_member(tarfile_)
        except (ValueError, OverflowError, IndexError, UnicodeError) as exc:
            raise FormatError(f"tar header at byte {self.offset} does not parse: {exc}") from None
        if self.type == tarfile.XGLTYPE and \
                sum(len(k) + len(v) for k, v in tarfile_.pax_headers.items()) > MAX_EXTENDED_HEADER:
            raise FormatError(f"tar header at byte {self.offset}: global pax headers of more than "
                              f"{MAX_EXTENDED_HEADER} bytes")
        return member

    def _proc_sparse(self, tarfile_):
        return _bounded_old_sparse(self, tarfile_)

    def _proc_gnusparse_01(self, next, pax_headers):
        fields = pax_headers["GNU.sparse.map"].split(",")
        if len(fields) % 2 or len(fields) > 2 * MAX_SPARSE_REGIONS:
            raise FormatError(f"tar entry at byte {self.offset}: GNU.sparse.map has {len(fields)} fields")
        numbers = [decimal(f, "GNU.sparse.map") for f in fields]
        next.sparse = list(zip(numbers[::2], numbers[1::2]))

    def _proc_gnusparse_10(self, next, pax_headers, tarfile_):
        next.sparse = _read_sparse_map(tarfile_.fileobj, f"tar entry at byte {self.offset}")
        next.offset_data = tarfile_.fileobj.tell()


def _read_sparse_map(fileobj, what: str) -> list[tuple[int, int]]:
    """A GNU sparse 1.0 map (decimal lines: count, then offset and length pairs, padded to a block)."""
    block = tarfile.BLOCKSIZE
    pending = b""
    lines: list[int] = []
    wanted = None
    while wanted is None or len(lines) < 1 + 2 * wanted:
        if b"\n" not in pending:
            if len(pending) > _SPARSE_MAP_LINE:
                raise FormatError(f"{what}: a GNU sparse map line is longer than {_SPARSE_MAP_LINE} bytes")
            more = fileobj.read(block)
            if len(more) != block:
                raise FormatError(f"{what}: the GNU sparse map is cut short")
            pending += more
            continue
        line, pending = pending.split(b"\n", 1)
        lines.append(decimal(line.decode("ascii", "replace"), f"{what}: GNU sparse map"))
        if wanted is None:
            wanted = lines[0]
            if wanted > MAX_SPARSE_REGIONS:
                raise FormatError(f"{what}: a GNU sparse map of {wanted} regions (at most {MAX_SPARSE_REGIONS})")
    return list(zip(lines[1::2], lines[2::2]))


def _bounded_old_sparse(info: tarfile.TarInfo, tarfile_):
    """An old GNU sparse member ('S'): its regions, from the header and the extension blocks after it."""
    regions, extended, real_size = info._sparse_structs
    del info._sparse_structs
    regions = list(regions)
    while extended:
        if len(regions) > MAX_SPARSE_REGIONS:
            raise FormatError(f"tar entry at byte {info.offset}: more than {MAX_SPARSE_REGIONS} sparse regions")
        block = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        if len(block) != tarfile.BLOCKSIZE:
            raise FormatError(f"tar entry at byte {info.offset}: the sparse extension is cut short")
        for start in range(0, 21 * 24, 24):  # 21 (offset, length) pairs of 12-byte numbers, then a flag
            try:
                region = (tarfile.nti(block[start : start + 12]), tarfile.nti(block[start + 12 : start + 24]))
            except tarfile.HeaderError:
                break
            if all(region):
                regions.append(region)
        extended = block[504] != 0
    info.sparse = regions
    info.offset_data = tarfile_.fileobj.tell()
    tarfile_.offset = info.offset_data + info._block(info.size)
    info.size = real_size
    return info


def members(tf: tarfile.TarFile, what: str):
    """The members of a streamed tar, one at a time, at most MAX_LAYER_ENTRIES of them.

    tarfile keeps every member it has read in ``TarFile.members``; a stream
    does not need them (nothing seeks back), so each is dropped once the next
    one is asked for.
    """
    count = 0
    while True:
        tf.members.clear()
        member = tf.next()
        if member is None:
            return
        count += 1
        if count > MAX_LAYER_ENTRIES:
            raise FormatError(f"{what}: more than {MAX_LAYER_ENTRIES} tar entries")
        yield member


# ---------------------------------------------------------------- tar members -> entries


_PAX_NUMBERS = ("size", "uid", "gid", "GNU.sparse.size", "GNU.sparse.realsize", "GNU.sparse.major",
                "GNU.sparse.minor", "GNU.sparse.numblocks", "GNU.sparse.offset", "GNU.sparse.numbytes")
_PAX_TIMES = ("mtime", "atime", "ctime")


def _check_pax(pax: dict[str, str], name: str) -> None:
    """Every number of a pax header is ASCII digits (tarfile's int() and float() take far more)."""
    for key in _PAX_NUMBERS:
        if key in pax:
            decimal(pax[key], f"tar entry {name!r}: pax {key}")
    for key in _PAX_TIMES:
        if key in pax:
            pax_time_ns(pax[key], f"tar entry {name!r}: pax {key}")


def _bounded(value: int, lo: int, hi: int, what: str) -> int:
    if not lo <= value <= hi:
        raise FormatError(f"{what}: {value} is outside [{lo}, {hi}]")
    return value


def _xattrs(pax: dict[str, str], name: str) -> tuple[tuple[str, bytes], ...]:
    found: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            found[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            xname = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                found.setdefault(xname, base64.b64decode(value + "=" * (-len(value) % 4), validate=True))
            except (ValueError, UnicodeError):
                raise FormatError(f"tar entry {name!r}: xattr {xname!r} is not valid base64") from None
    for xname in found:
        if not xname or "\0" in xname or len(xname.encode("utf-8", "surrogateescape")) > 255:
            raise FormatError(f"tar entry {name!r}: bad xattr name {xname!r}")
    return tuple(sorted(found.items()))


def entry_from_tarinfo(ti: tarfile.TarInfo) -> TarEntry:
    """The planner's view of a tarfile member (FormatError for types a layer cannot hold)."""
    if ti.isdir():
        kind = Kind.DIR
    elif ti.issym():
        kind = Kind.SYMLINK
    elif ti.islnk():
        kind = Kind.HARDLINK
    elif ti.isreg():
        kind = Kind.FILE
    elif ti.ischr():
        kind = Kind.CHAR
    elif ti.isblk():
        kind = Kind.BLOCK
    elif ti.isfifo():
        kind = Kind.FIFO
    else:
        raise FormatError(f"tar entry {ti.name!r}: unsupported type {ti.type!r}")
    pax = ti.pax_headers or {}
    _check_pax(pax, ti.name)
    what = f"tar entry {ti.name!r}"
    if "mtime" in pax:
        mtime_ns = pax_time_ns(pax["mtime"], f"{what}: pax mtime")
    else:  # the header's own field: an integer (octal or base-256), bounded like a pax time
        mtime_ns = _bounded(int(ti.mtime), -(1 << 40), 1 << 40, f"{what}: mtime") * NS
    atime_ns = pax_time_ns(pax["atime"], f"{what}: pax atime") if "atime" in pax else None
    size = _bounded(ti.size, 0, MAX_FILE_SIZE, f"{what}: size")
    sparse = None
    if ti.sparse is not None:
        if len(ti.sparse) > MAX_SPARSE_REGIONS:
            raise FormatError(f"{what}: {len(ti.sparse)} sparse regions (at most {MAX_SPARSE_REGIONS})")
        sparse = tuple((_bounded(o, 0, size, f"{what}: sparse offset"), _bounded(n, 0, size - o, f"{what}: sparse length"))
                       for o, n in ti.sparse)
    return TarEntry(
        name=ti.name, kind=kind, mode=ti.mode & 0o7777, uid=_bounded(ti.uid, 0, MAX_TAR_ID, f"{what}: uid"),
        gid=_bounded(ti.gid, 0, MAX_TAR_ID, f"{what}: gid"), mtime_ns=mtime_ns,
        atime_ns=atime_ns, size=size if kind is Kind.FILE else 0, linkname=ti.linkname,
        devmajor=_bounded(ti.devmajor, 0, MAX_TAR_ID, f"{what}: device major") if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        devminor=_bounded(ti.devminor, 0, MAX_TAR_ID, f"{what}: device minor") if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        xattrs=_xattrs(pax, ti.name), sparse=sparse,
    )


def _open_tar(stream) -> tarfile.TarFile:
    return tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape",
                        tarinfo=BoundedTarInfo)


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, UnicodeError)


@dataclass(slots=True)
class ScanResult:
    stats: LayerStats
    diff_id: str


def scan_layer(path: str, compression: str, what: str, progress: Progress | None = None,
               spool: str | None = None, limit: int = DEFAULT_MAX_LAYER_BYTES) -> ScanResult:
    """Validate every entry and hash the uncompressed stream, writing nothing but *spool*.

    *spool*: a file to keep the uncompressed tar in, so applying it does not
    decompress again. More than *limit* uncompressed bytes is a FormatError
    as soon as the stream passes it (the spool never holds more).
    """
    stats = LayerStats()
    try:
        with open_layer(path, compression) as stream, \
                (open(spool, "wb") if spool is not None else contextlib.nullcontext()) as copy:
            reader = HashingReader(stream, progress, copy, limit)
            try:
                with _open_tar(reader) as tf:
                    for ti in members(tf, what):
                        entry = entry_from_tarinfo(ti)
                        stats.add(entry, plan_entry(entry))
                reader.drain()
            except FormatError as exc:
                raise FormatError(f"{what}: {exc}") from None
            except _READ_ERRORS as exc:
                kind = "" if compression == "none" else f"{compression} "
                raise FormatError(f"{what}: not a valid {kind}tar stream: {exc}") from None
    except OSError as exc:
        raise LazyfsError(f"{what}: cannot read or spool it: {exc.strerror or exc}") from None
    stats.tar_bytes = reader.count
    return ScanResult(stats, reader.digest)


def check_diff_id(result: ScanResult, expected: str, what: str) -> None:
    if result.diff_id != expected:
        raise IntegrityError(f"{what} (uncompressed, diff ID)", expected, result.diff_id)


# ---------------------------------------------------------------- applying


@dataclass(slots=True)
class ApplyReport:
    entries: int = 0
    tar_bytes: int = 0
    removed: int = 0
    warnings: list[str] = field(default_factory=list)


def _is_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


class LayerApplier:
    """Applies one layer's planned actions under *root* (a directory; nothing outside it is touched)."""

    def __init__(self, root: str, what: str) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.what = what
        self.upper = UpperPaths()
        self.dir_times: dict[Path, tuple[int, int]] = {}  # directory -> (atime, mtime) in ns, set at the end
        self.report = ApplyReport()
        # on_file(fd, member): called for every regular file created, its data written (``lazyfs index``
        # maps the file's blocks to its bytes in the tar); member is the tarfile member being applied.
        self.on_file: Callable[[int, tarfile.TarInfo], None] | None = None
        self._member: tarfile.TarInfo | None = None
        self.grave_name: str | None = None  # the graveyard at the root, once something was removed
        self._grave_fd = -1
        self._buried = 0

    def close(self) -> None:
        if self._grave_fd >= 0:
            os.close(self._grave_fd)
            self._grave_fd = -1
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> "LayerApplier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the layer

    def apply_stream(self, stream) -> ApplyReport:
        """Apply every member of the tar *stream*, then set directory times."""
        try:
            with _open_tar(stream) as tf:
                for ti in members(tf, self.what):
                    entry = entry_from_tarinfo(ti)
                    action = plan_entry(entry)
                    if action is None:
                        continue
                    reader = tf.extractfile(ti) if entry.kind is Kind.FILE else None
                    self._member = ti
                    try:
                        self.apply(action, entry, reader)
                    finally:
                        if reader is not None:
                            reader.close()
                    self.report.entries += 1
        except _READ_ERRORS as exc:
            raise FormatError(f"{self.what}: bad tar stream: {exc}") from None
        self.finish()
        return self.report

    def apply(self, action: Put | Whiteout | Opaque, entry: TarEntry, data=None) -> None:
        """One action; errors name the entry and the layer."""
        try:
            if isinstance(action, Put):
                self._put(action, entry, data)
            elif isinstance(action, Whiteout):
                self._whiteout(action.path, entry)
            else:
                self._opaque(action.directory, entry)
        except FormatError as exc:
            raise FormatError(f"{self.what}: {exc}") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LazyfsError(f"{self.what}: the filesystem is full at tar entry {entry.name!r} "
                                  f"(the size estimate was too small)") from None
            raise FormatError(f"{self.what}: cannot apply tar entry {entry.name!r}: "
                              f"{exc.strerror or exc}") from None

    def finish(self) -> None:
        """Delete what the layer removed, then set the times of every directory it created or changed
        (deepest first)."""
        if self._grave_fd >= 0:
            for child in sorted(os.listdir(self._grave_fd)):
                self._delete(self._grave_fd, child, os.stat(child, dir_fd=self._grave_fd, follow_symlinks=False))
            os.close(self._grave_fd)
            self._grave_fd = -1
            os.rmdir(self.grave_name, dir_fd=self.root_fd)
        for path in sorted(self.dir_times, key=len, reverse=True):
            fd = self._open_exact(path)
            if fd is None:
                continue
            try:
                os.utime(fd, ns=self.dir_times[path])
            finally:
                os.close(fd)

    # ------------------------------------------------------------ resolution

    def _open_dir(self, path: Path, entry: TarEntry, create: bool) -> tuple[int, Path] | None:
        """An fd of directory *path* resolved inside the root (missing ones made if *create*, else None)."""
        walk = Walk(path, entry.name)
        fds = [os.dup(self.root_fd)]
        try:
            while True:
                step = walk.step()
                if isinstance(step, Done):
                    return fds.pop(), step.path
                if isinstance(step, Up):
                    os.close(fds.pop())
                    continue
                assert isinstance(step, Lookup)
                name = step.name
                self._not_grave(walk.resolved, name, entry)
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=fds[-1])
                except FileNotFoundError:
                    if not create:
                        return None
                    fd = self._implicit_dir(fds[-1], walk.resolved, name, entry)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        if not create:
                            return None
                        raise FormatError(f"tar entry {entry.name!r}: {describe(walk.resolved + (name,))} "
                                          f"is not a directory") from None
                    if isinstance(walk.follow(os.readlink(name, dir_fd=fds[-1])), Restart):
                        while len(fds) > 1:
                            os.close(fds.pop())
                    continue
                walk.enter()
                fds.append(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def _open_exact(self, path: Path) -> int | None:
        """An fd of *path* if every component is still a real directory, else None."""
        fd = os.dup(self.root_fd)
        for name in path:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                os.close(fd)
                return None
            os.close(fd)
            fd = nxt
        return fd

    def _implicit_dir(self, parent_fd: int, parent: Path, name: str, entry: TarEntry) -> int:
        """A parent directory the archive did not list: root-owned, 0755, the entry's mtime."""
        self._changing(parent_fd, parent)
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o755)
        path = parent + (name,)
        self.dir_times[path] = (entry.mtime_ns, entry.mtime_ns)
        self.upper.add(path)
        return fd

    def _changing(self, fd: int, path: Path) -> None:
        """Directory *path* is about to gain or lose an entry: remember its times to restore."""
        if path not in self.dir_times:
            st = os.fstat(fd)
            self.dir_times[path] = (st.st_atime_ns, st.st_mtime_ns)

    # ------------------------------------------------------------ actions

    def _put(self, put: Put, entry: TarEntry, data) -> None:
        if not put.path:
            self._set_meta(self.root_fd, None, None, entry, clear_xattrs=True)
            self.dir_times[()] = self._times(entry)
            return
        opened = self._open_dir(put.path[:-1], entry, create=True)
        assert opened is not None
        parent_fd, parent = opened
        try:
            leaf = put.path[-1]
            self._not_grave(parent, leaf, entry)
            path = parent + (leaf,)
            try:
                existing = os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if entry.kind is Kind.HARDLINK:
                self._hardlink(put.link, parent_fd, parent, leaf, existing, entry)
            elif entry.kind is Kind.DIR and existing is not None and _is_dir(existing):
                fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent_fd)
                try:
                    self._set_meta(fd, None, None, entry, clear_xattrs=True)
                finally:
                    os.close(fd)
                self.dir_times[path] = self._times(entry)
            else:
                self._changing(parent_fd, parent)
                if existing is not None:
                    self._remove(parent_fd, leaf, existing)
                self._create(parent_fd, leaf, path, entry, data)
            self.upper.add(path)
        finally:
            os.close(parent_fd)

    def _hardlink(self, link: Path, parent_fd: int, parent: Path, leaf: str, existing, entry: TarEntry) -> None:
        target = self._open_dir(link[:-1], entry, create=False)
        if target is None:
            raise FormatError(f"tar entry {entry.name!r}: hard link target {entry.linkname!r} does not exist")
        target_fd, _ = target
        try:
            try:
                st = os.stat(link[-1], dir_fd=target_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise FormatError(f"tar entry {entry.name!r}: hard link target {entry.linkname!r} "
                                  f"does not exist") from None
            if _is_dir(st):
                raise FormatError(f"tar entry {entry.name!r}: hard link target {entry.linkname!r} is a directory")
            if existing is not None and existing.st_ino == st.st_ino and existing.st_dev == st.st_dev:
                return  # already that very file
            self._changing(parent_fd, parent)
            if existing is not None:
                self._remove(parent_fd, leaf, existing)
            os.link(link[-1], leaf, src_dir_fd=target_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
        finally:
            os.close(target_fd)

    def _create(self, parent_fd: int, leaf: str, path: Path, entry: TarEntry, data) -> None:
        kind = entry.kind
        if kind is Kind.FILE:
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent_fd)
            try:
                self._write_data(fd, entry, data)
                if self.on_file is not None and self._member is not None:
                    self.on_file(fd, self._member)
                self._set_meta(fd, None, None, entry, clear_xattrs=False)
                os.utime(fd, ns=self._times(entry))
            finally:
                os.close(fd)
        elif kind is Kind.DIR:
            os.mkdir(leaf, 0o700, dir_fd=parent_fd)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent_fd)
            try:
                self._set_meta(fd, None, None, entry, clear_xattrs=False)
            finally:
                os.close(fd)
            self.dir_times[path] = self._times(entry)
        elif kind is Kind.SYMLINK:
            os.symlink(entry.linkname, leaf, dir_fd=parent_fd)
            self._set_meta(None, parent_fd, leaf, entry, clear_xattrs=False, symlink=True)
            os.utime(leaf, ns=self._times(entry), dir_fd=parent_fd, follow_symlinks=False)
        else:
            kinds = {Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO}
            device = os.makedev(entry.devmajor, entry.devminor) if kind is not Kind.FIFO else 0
            os.mknod(leaf, kinds[kind] | 0o600, device, dir_fd=parent_fd)
            self._set_meta(None, parent_fd, leaf, entry, clear_xattrs=False)
            os.utime(leaf, ns=self._times(entry), dir_fd=parent_fd, follow_symlinks=False)

    def _write_data(self, fd: int, entry: TarEntry, data) -> None:
        written = 0
        sparse = entry.sparse is not None
        while True:
            piece = data.read(COPY_SIZE) if data is not None else b""
            if not piece:
                break
            if sparse:
                self._write_sparse(fd, piece, written)
            else:
                write_all(fd, piece)
            written += len(piece)
        if written != entry.size:
            raise FormatError(f"tar entry {entry.name!r}: {written} bytes of data, header says {entry.size}")
        if sparse:
            os.ftruncate(fd, entry.size)

    @staticmethod
    def _write_sparse(fd: int, piece: bytes, offset: int) -> None:
        """Write *piece* at *offset*, leaving aligned all-zero blocks as holes."""
        n = len(piece)
        start = None
        pos = 0
        while pos < n:
            block_end = min(n, (offset + pos) // 4096 * 4096 + 4096 - offset)
            zero = piece[pos:block_end] == _ZERO_BLOCK[: block_end - pos]
            if zero and start is not None:
                pwrite_all(fd, piece[start:pos], offset + start)
                start = None
            elif not zero and start is None:
                start = pos
            pos = block_end
        if start is not None:
            pwrite_all(fd, piece[start:], offset + start)

    def _whiteout(self, path: Path, entry: TarEntry) -> None:
        opened = self._open_dir(path[:-1], entry, create=False)
        if opened is None:
            return
        parent_fd, parent = opened
        try:
            self._not_grave(parent, path[-1], entry)
            try:
                st = os.stat(path[-1], dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            self._prune(parent_fd, parent, path[-1], st, keep=False)
        finally:
            os.close(parent_fd)

    def _opaque(self, directory: Path, entry: TarEntry) -> None:
        opened = self._open_dir(directory, entry, create=False)
        if opened is None:
            return
        fd, path = opened
        try:
            for name in sorted(os.listdir(fd)):
                if path == () and name == self.grave_name:
                    continue
                self._prune(fd, path, name, os.stat(name, dir_fd=fd, follow_symlinks=False), keep=False)
        finally:
            os.close(fd)

    def _prune(self, parent_fd: int, parent: Path, name: str, st: os.stat_result, keep: bool) -> None:
        """Remove *name* unless this layer wrote it; inside what it wrote, remove the rest."""
        path = parent + (name,)
        if path not in self.upper and not keep:
            self._changing(parent_fd, parent)
            self._remove(parent_fd, name, st)
            return
        if not _is_dir(st):
            return
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            for child in sorted(os.listdir(fd)):
                self._prune(fd, path, child, os.stat(child, dir_fd=fd, follow_symlinks=False), keep=False)
        finally:
            os.close(fd)

    def _remove(self, parent_fd: int, name: str, st: os.stat_result) -> None:
        """Remove *name* (a whole tree if it is a directory): moved to the graveyard, deleted by ``finish``."""
        if self._grave_fd < 0:
            self._changing(self.root_fd, ())
            for n in range(1000):
                candidate = GRAVEYARD if n == 0 else f"{GRAVEYARD}.{n}"  # the image may hold the name itself
                try:
                    os.mkdir(candidate, 0o700, dir_fd=self.root_fd)
                except FileExistsError:
                    continue
                self.grave_name = candidate
                self._grave_fd = os.open(candidate, _DIR_FLAGS, dir_fd=self.root_fd)
                break
            else:
                raise FormatError(f"the root holds {GRAVEYARD} and 999 more names like it")
        os.rename(name, str(self._buried), src_dir_fd=parent_fd, dst_dir_fd=self._grave_fd)
        self._buried += 1

    def _not_grave(self, parent: Path, name: str, entry: TarEntry) -> None:
        if parent == () and name == self.grave_name:
            raise FormatError(f"tar entry {entry.name!r} reaches /{name}, where lazyfs keeps what this layer "
                              f"removed until its end")

    def _delete(self, parent_fd: int, name: str, st: os.stat_result) -> None:
        """Delete *name* and, if it is a directory, everything in it (never following a symlink)."""
        if _is_dir(st):
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            try:
                for child in sorted(os.listdir(fd)):
                    self._delete(fd, child, os.stat(child, dir_fd=fd, follow_symlinks=False))
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)
        self.report.removed += 1

    # ------------------------------------------------------------ metadata

    @staticmethod
    def _times(entry: TarEntry) -> tuple[int, int]:
        return (entry.atime_ns if entry.atime_ns is not None else entry.mtime_ns, entry.mtime_ns)

    def _set_meta(self, fd: int | None, parent_fd: int | None, leaf: str | None, entry: TarEntry, *,
                  clear_xattrs: bool, symlink: bool = False) -> None:
        """Owner, then mode, then xattrs: on *fd*, or on *leaf* in *parent_fd* (not following it)."""
        if fd is not None:
            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode)
            target: int | str = fd
        else:
            os.chown(leaf, entry.uid, entry.gid, dir_fd=parent_fd, follow_symlinks=False)
            if not symlink:
                os.chmod(leaf, entry.mode, dir_fd=parent_fd)
            target = f"/proc/self/fd/{parent_fd}/{leaf}"  # the magic link pins the verified directory
        nofollow = {} if isinstance(target, int) else {"follow_symlinks": False}
        if clear_xattrs:
            for name in os.listxattr(target, **nofollow):
                if name not in IGNORED_XATTRS:
                    os.removexattr(target, name, **nofollow)
        for name, value in entry.xattrs:
            if name in IGNORED_XATTRS:
                continue
            try:
                os.setxattr(target, name, value, **nofollow)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                self.report.warnings.append(f"tar entry {entry.name!r}: xattr {name!r} not kept: {exc.strerror}")
