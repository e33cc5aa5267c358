"""Mount in the host's mount namespace from a process that runs in a private one.

systemd's ``ProtectSystem=``, ``PrivateTmp=`` and ``ReadWritePaths=`` give a service a mount
namespace of its own, and nothing mounted in it ever reaches the host: a FUSE export mounted
there is invisible to losetup, containerd and qemu. So a sandboxed lazyfs mounts in the host's
namespace instead, named by ``$LAZYFS_MOUNT_NAMESPACE=/proc/PID/ns/mnt`` (the units in contrib/
set ``/proc/1/ns/mnt``, the namespace of systemd itself):

* ``mount``, ``umount`` and ``losetup`` run under ``nsenter --mount=…``. setns(CLONE_NEWNS)
  works only in a single-threaded process, which the daemon is not; nsenter is one, forked and
  exec'd for each command. It needs CAP_SYS_ADMIN and CAP_SYS_CHROOT.
* Opening ``/proc/1/ns/mnt`` needs ptrace access to PID 1, i.e. CAP_SYS_PTRACE for a process
  whose capabilities are fewer than PID 1's: a hardened unit must not have it. So the unit's
  unsandboxed ``ExecStartPre=+lazyfs store-mount-namespace`` opens it and puts the fd in the
  service's file descriptor store (``FDSTORE=1``, name ``lazyfs-mntns``); systemd passes it to
  the daemon (``$LISTEN_FDS``), and nsenter enters it as ``/proc/self/fd/N``.
* The FUSE export: the daemon opens ``/dev/fuse`` itself, the kernel mount with ``-o fd=N``
  happens in the host's namespace (the fd is inherited by nsenter and mount), and libfuse is
  handed the open fd as the mountpoint ``/dev/fd/N`` (:func:`mount_fuse`).
* Mount tables are read from ``/proc/PID/mountinfo``, the host's view.

Paths passed to these commands are resolved in the host's namespace: the mount points the
daemon uses must exist there (``/run/lazyfs``, the snapshotter's root), and a path under the
service's private ``/tmp`` is not one of them.

Without ``$LAZYFS_MOUNT_NAMESPACE`` everything happens in the caller's own namespace, as before.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lazyfs.errors import ConfigError
from lazyfs.serve.fusekernel import keeper

ENV = "LAZYFS_MOUNT_NAMESPACE"
FUSE_DEVICE = "/dev/fuse"

_NS_PATH = re.compile(r"/proc/([1-9][0-9]{0,9})/ns/mnt")


FDNAME = "lazyfs-mntns"
"""The name of the namespace fd in a systemd service's file descriptor store."""


@dataclass(frozen=True, slots=True)
class MountNamespace:
    """The mount namespace of process *pid*; *fd*: an open fd of it, entered instead of its /proc path."""

    pid: int
    fd: int | None = None

    @property
    def path(self) -> str:
        """What nsenter opens: the fd (inherited by nsenter) if there is one, else /proc/PID/ns/mnt."""
        return f"/proc/self/fd/{self.fd}" if self.fd is not None else f"/proc/{self.pid}/ns/mnt"

    @property
    def mountinfo(self) -> str:
        return f"/proc/{self.pid}/mountinfo"

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)


def parse_namespace(text: str | None) -> MountNamespace | None:
    """``/proc/PID/ns/mnt`` -> MountNamespace; "" or None -> None; anything else: ConfigError."""
    if not text:
        return None
    m = _NS_PATH.fullmatch(text)
    if m is None:
        raise ConfigError(f"${ENV} must be /proc/PID/ns/mnt (e.g. /proc/1/ns/mnt), not {text[:80]!r}")
    return MountNamespace(int(m.group(1)))


def listen_fd(name: str, environ: dict[str, str] | None = None, pid: int | None = None) -> int | None:
    """The fd systemd passed to this process under *name* ($LISTEN_PID/$LISTEN_FDS/$LISTEN_FDNAMES), or None."""
    return keeper.sd_stored_fd(name, environ, pid)


def configured() -> MountNamespace | None:
    """The namespace ``$LAZYFS_MOUNT_NAMESPACE`` names, or None (mount in this process's own).

    If systemd passed this process a stored fd named ``lazyfs-mntns``, that fd is entered.
    """
    ns = parse_namespace(os.environ.get(ENV))
    if ns is not None and (fd := listen_fd(FDNAME)) is not None:
        ns = MountNamespace(ns.pid, fd)
    return ns


def store_namespace_fd(path: str = "/proc/1/ns/mnt") -> None:
    """Open the mount namespace *path* and put it in the calling systemd service's fd store.

    For ``ExecStartPre=+`` of a unit with ``FileDescriptorStoreMax=`` >= 1 and
    ``NotifyAccess=all``: systemd hands the fd to the service's main process. It replaces the
    fd an earlier start stored (``FDSTOREREMOVE=1`` first): restarts leave one, not a pile.
    ConfigError if there is no $NOTIFY_SOCKET or *path* is not a mount namespace.
    """
    if keeper.notify_socket() is None:
        raise ConfigError("no $NOTIFY_SOCKET: store-mount-namespace runs from a systemd unit (ExecStartPre=+...)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from None
    try:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("mnt:["):
            raise ConfigError(f"{path} is not a mount namespace")
        keeper.sd_store_fd(fd, FDNAME)
    finally:
        os.close(fd)


def command(cmd: Sequence[str], namespace: MountNamespace | None) -> list[str]:
    """*cmd*, made to run in *namespace* (unchanged for None)."""
    cmd = [os.fspath(c) for c in cmd]
    if namespace is None:
        return cmd
    return ["nsenter", f"--mount={namespace.path}", "--", *cmd]


def pass_fds(namespace: MountNamespace | None) -> tuple[int, ...]:
    """The fds a command made by :func:`command` must inherit."""
    return () if namespace is None else namespace.pass_fds


def mountinfo_path(namespace: MountNamespace | None) -> str:
    """Where the mount table of *namespace* (None: this process's) is read from."""
    return "/proc/self/mountinfo" if namespace is None else namespace.mountinfo


def fuse_mount_command(fd: int, mountpoint: str | os.PathLike, options: Iterable[str], *,
                       uid: int, gid: int) -> list[str]:
    """The mount(8) command that mounts the FUSE connection open on *fd* at *mountpoint* (pure).

    *options* are libfuse's spelling: ``fsname=X`` becomes the source, ``subtype=X`` the type
    ``fuse.X``; the rest (``allow_other``, ``default_permissions``, ``ro``, ``nodev`` ...) go to
    the kernel (mount(8) sorts out which are flags). ``nosuid,nodev`` unless ``suid``/``dev`` is
    given, as libfuse does. ``-i``: no /sbin/mount.fuse helper; ``-n``: no utab entry.
    """
    fsname, fstype, rest = "lazyfs", "fuse", []
    for opt in options:
        if opt.startswith("fsname="):
            fsname = opt.partition("=")[2]
        elif opt.startswith("subtype="):
            fstype = "fuse." + opt.partition("=")[2]
        elif "," in opt or opt.startswith(("fd=", "rootmode=", "user_id=", "group_id=")):
            raise ConfigError(f"FUSE mount option {opt!r} is set by lazyfs itself")
        else:
            rest.append(opt)
    # libfuse mounts nosuid,nodev unless told "suid"/"dev": so does this
    flags = [f for f, allow in (("nosuid", "suid"), ("nodev", "dev")) if allow not in rest]
    data = [*flags, f"fd={fd}", f"rootmode={stat.S_IFDIR:o}", f"user_id={uid}", f"group_id={gid}", *sorted(rest)]
    return ["mount", "-i", "-n", "-t", fstype, "-o", ",".join(data), fsname, os.fspath(mountpoint)]


def open_fuse_device() -> int:
    """A new ``/dev/fuse`` fd (close-on-exec): one FUSE connection, not yet mounted."""
    return os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)


async def mount_fuse(fd: int, mountpoint: str | os.PathLike, options: Iterable[str],
                     namespace: MountNamespace | None, *, timeout: float = 30.0) -> None:
    """Mount the FUSE connection open on *fd* at *mountpoint* in *namespace* (None: this one).

    The kernel's INIT request waits on *fd* until someone serves it; libfuse does, given
    ``/dev/fd/N`` as the mountpoint. The caller keeps *fd*. CommandError if the mount fails.
    """
    from lazyfs.serve.system import run  # system reads this module's settings: import late

    cmd = fuse_mount_command(fd, mountpoint, options, uid=os.getuid(), gid=os.getgid())
    await run(command(cmd, namespace), timeout=timeout, pass_fds=(fd, *(namespace.pass_fds if namespace else ())))


__all__ = [
    "ENV", "FDNAME", "MountNamespace", "command", "configured", "fuse_mount_command", "listen_fd", "mount_fuse",
    "mountinfo_path", "open_fuse_device", "parse_namespace", "pass_fds", "store_namespace_fd",
]
