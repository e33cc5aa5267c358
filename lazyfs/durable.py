"""Durable file writes: whole writes, fsyncs whose failure is reported, atomic replacement.

Host plumbing for every layer that keeps state on local disk (writable layers,
OCI layouts, the daemon's state file). The rules it enforces:

* ``pwrite``/``write`` may write fewer bytes than asked (a nearly full disk
  does exactly that); :func:`pwrite_all` and :func:`write_all` loop until all
  bytes are written or the kernel refuses with an error.
* A failed ``fsync`` is never retried as if nothing happened: the kernel may
  have dropped the dirty pages already ("fsyncgate"), so a second fsync can
  succeed without the data ever reaching the disk. Callers treat the failure
  as final for the data concerned.
* Every file lazyfs replaces whole (state files, ``layer.json``, OCI layout
  blobs and indexes, ledgers, cache entries) goes through
  :func:`write_atomically`, or, when it was streamed to a temporary file of its
  own, through :func:`replace_durably`. Temporary files are named
  ``TMP_PREFIX + name + ...`` beside their target, so a scan can drop the ones
  a crash left behind.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading

from lazyfs.errors import StorageError

TMP_PREFIX = ".tmp-"  # temporary files of write_atomically: hidden, and recognisable after a crash
_tmp_names = itertools.count()
_tmp_lock = threading.Lock()


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of *data* at *offset*, looping over short writes; OSError (ENOSPC, EIO, ...) otherwise."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # a regular file never does this for a non-empty write unless it cannot grow
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
        offset += n


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of *data* at the file position, looping over short writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def fsync_dir(path: str) -> None:
    """Make the entries of directory *path* (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, with every directory it creates made durable in its parent."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue  # made concurrently: its maker syncs it
        fsync_dir(os.path.dirname(directory))


def storage_error(what: str, exc: OSError) -> StorageError:
    """The StorageError for an OSError met while doing *what* (keeps its errno)."""
    return StorageError(f"{what}: {exc.strerror or exc}", exc.errno or errno.EIO)


def write_atomically(path: str | os.PathLike, data: bytes | memoryview, *, mode: int = 0o600,
                     durable: bool = True) -> None:
    """Replace *path* with *data* so that a crash or power loss leaves the old or the new file, never a mix.

    The data is written to a temporary file beside *path* (created with *mode*,
    never through a symlink), fsynced, renamed over *path*, and the directory is
    fsynced. StorageError (with the errno) if any step fails; the temporary file
    is removed then and *path* is unchanged, unless only the final directory
    fsync failed (then *path* may be either).

    ``durable=False`` skips both fsyncs: a crash still leaves no torn file under
    *path* in the running system, but after a power loss *path* may be the old
    file, missing, or empty. Only for data that is verified on every read and
    can be fetched again (the chunk cache); everything else keeps the default.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    with _tmp_lock:
        n = next(_tmp_names)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{os.path.basename(path)}-{os.getpid()}-{n}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise storage_error(f"cannot write {path}", exc) from None
    if not durable:
        return
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise storage_error(f"cannot make {path} durable", exc) from None


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished temporary file *tmp* over *path* and make the rename durable.

    For files too large to hold in memory, streamed by the caller; the caller has
    fsynced *tmp* (the same guarantee as :func:`write_atomically` then holds).
    *tmp* must be on the same file system as *path*. StorageError if the rename or the
    directory fsync fails; *tmp* is removed if the rename failed.
    """
    path = os.fspath(path)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise storage_error(f"cannot write {path}", exc) from None
    try:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise storage_error(f"cannot make {path} durable", exc) from None


def _remove_quietly(tmp: str | os.PathLike) -> None:
    """Remove a temporary file after a failed write; it may never have been made, or the disk be gone."""
    try:
        os.unlink(tmp)
    except OSError:
        pass  # the error that matters is the one the caller raises
