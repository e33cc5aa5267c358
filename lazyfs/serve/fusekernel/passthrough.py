"""Backing files of a FUSE connection: the kernel serves reads of a passed-through open itself.

``BackingFiles(fd).open(path)`` registers a local file with the connection whose /dev/fuse fd is
*fd* (``FUSE_DEV_IOC_BACKING_OPEN``) and returns its backing id; an OPEN answered with
``FOPEN_PASSTHROUGH`` and that id is then read by the kernel straight from the file, with no
request reaching the daemon. ``close(id)`` (``FUSE_DEV_IOC_BACKING_CLOSE``) forgets the id; files
already opened through it keep their own reference. Ids belong to the connection: they survive a
daemon restart that takes the connection over, and vanish with it.

Both calls block briefly (open(2), an ioctl): call them from a worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import os

from lazyfs.serve.fusekernel import protocol as p

# why a registration failed, for the one log line and `lazyfs doctor`
REASONS = {
    errno.EPERM: "the kernel refused it (the connection did not negotiate passthrough, or no CAP_SYS_ADMIN)",
    errno.ENOTTY: "the kernel has no FUSE passthrough ioctls (older than 6.9)",
    errno.EINVAL: "the kernel rejected the backing file",
    errno.ELOOP: "the backing file lives on a stacked file system (overlayfs): too deep for passthrough",
    errno.EOPNOTSUPP: "the kernel was built without CONFIG_FUSE_PASSTHROUGH",
}


def reason(exc: OSError) -> str:
    return REASONS.get(exc.errno or 0, exc.strerror or str(exc))


class BackingFiles:
    """Registers and forgets backing files on one FUSE connection (its /dev/fuse fd)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def open(self, path: str) -> int:
        """Register *path* (opened read-only) and return its backing id; OSError if refused."""
        file_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            # a mutable buffer: ioctl() then answers the syscall's return value (the id), not the buffer
            backing_id = fcntl.ioctl(self.fd, p.IOC_BACKING_OPEN, bytearray(p.backing_map(file_fd)), True)
        finally:
            os.close(file_fd)  # the kernel holds its own reference from now on
        if not isinstance(backing_id, int) or backing_id <= 0:
            raise OSError(errno.EPROTO, f"FUSE_DEV_IOC_BACKING_OPEN answered {backing_id!r}")
        return backing_id

    def close(self, backing_id: int) -> None:
        """Forget *backing_id* (files opened through it keep working until closed)."""
        fcntl.ioctl(self.fd, p.IOC_BACKING_CLOSE, bytearray(backing_id.to_bytes(4, "little")), True)
