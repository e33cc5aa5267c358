"""What this host's kernel and system offer lazyfs, read from /proc, /sys, /dev and the file systems.

Host plumbing below every layer (it imports only ``lazyfs.errors``): ``lazyfs.doctor`` judges
the facts gathered here. Probes read, open and ask (an ioctl, a syscall, ``findmnt``,
``TOOL --version``); the one write is an empty temporary file in an existing cache root for
the fs-verity probe, removed at once. Nothing is mounted, loaded or attached.

The parsers (kernel release, kernel config, ``/proc/filesystems``) are pure functions of text;
:func:`probe_host` is the I/O shell. It blocks (subprocesses, statvfs): trio code calls it in a
worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gzip
import json
import os
import platform
import re
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "Outcome", "Kernel", "PathFacts", "HostFacts", "parse_kernel_config", "parse_filesystems", "parse_release",
    "kernel_option", "cpu_virtualization", "parse_version", "probe_host", "probe_path", "probe_kernel", "probe_fuse_device", "probe_loop", "probe_io_uring",
    "probe_verity", "probe_tools",
]

FUSE_DEVICE = "/dev/fuse"
FUSE_DEV_NUMBER = (10, 229)  # misc major, FUSE_MINOR
LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_GET_FREE = 0x4C82
FUSECTL_DIR = "/sys/fs/fuse/connections"
CONFIGFS_TARGET = "/sys/kernel/config/target"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
KVM_DEVICE = "/dev/kvm"
SYS_MODULE = "/sys/module"
IO_URING_DISABLED = "/proc/sys/kernel/io_uring_disabled"
NR_IO_URING_SETUP = 425  # the same number on every architecture since Linux 5.1 (alpha aside)
IO_URING_PARAMS_SIZE = 120
# FS_IOC_ENABLE_VERITY = _IOW('f', 133, struct fsverity_enable_arg), the struct being 128 bytes
FS_IOC_ENABLE_VERITY = 0x40806685
FSVERITY_HASH_ALG_SHA256 = 1

#: the programs lazyfs runs or works with
MOUNT_TOOLS = ("losetup", "mount", "umount", "blockdev")
OTHER_TOOLS = ("mkfs.ext4", "containerd", "ctr", "runc", "crun", "podman", f"qemu-system-{platform.machine()}")
VERSION_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of trying something: whether it worked, and what was found or what failed."""

    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Kernel:
    """The running kernel: release, its build configuration if readable, file systems and modules."""

    release: str
    version: tuple[int, int]
    config: Mapping[str, str] | None  # CONFIG_X -> "y" | "m" | "n" | value; None when unreadable
    config_source: str | None
    filesystems: frozenset[str]
    modules: frozenset[str]  # /sys/module: built-in and loaded modules alike
    fuse_uring_enabled: bool | None  # fuse.enable_uring; None when the parameter does not exist


@dataclass(frozen=True, slots=True)
class PathFacts:
    """A configured directory: where it lives and whether lazyfs can write there."""

    path: str
    exists: bool
    probed: str  # the path itself, or its nearest existing ancestor
    fstype: str
    mountpoint: str
    read_only: bool
    writable: bool  # writable by this process (not read-only, access(W_OK))
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class HostFacts:
    """Everything :func:`probe_host` found, as values (``lazyfs.doctor`` reads nothing else)."""

    kernel: Kernel
    euid: int
    fuse_device: Outcome
    pyfuse3: Outcome
    fusectl: Outcome
    loop: Outcome
    io_uring: Outcome
    io_uring_disabled: int | None
    kvm: Outcome
    cpu_virtualization: bool  # the CPU flags name vmx or svm (hardware virtualization)
    configfs_target: bool
    containerd_socket: bool
    tools: Mapping[str, str | None]  # name -> path (None: not installed)
    versions: Mapping[str, str]  # name -> first line of `name --version`
    paths: Mapping[str, PathFacts]  # config field -> facts
    verity: Outcome | None  # on the cache root; None when it does not exist yet
    native_reads: Outcome = Outcome(True, "built")  # the FUSE threads' READ path in C (setup.py builds it)
    device_mapper: Outcome = Outcome(False, "not probed")  # the kernel's device-mapper and dmsetup (serve/dmswitch.py)


# ------------------------------------------------------------------ parsers (pure)


def parse_release(release: str) -> tuple[int, int]:
    """``"6.18.44-fc-v1252"`` -> ``(6, 18)``; ``(0, 0)`` when it does not start with a version."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def parse_kernel_config(text: str) -> dict[str, str]:
    """A kernel ``.config``: ``CONFIG_X=y`` -> ``"y"``, ``# CONFIG_X is not set`` -> ``"n"``."""
    config = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(CONFIG_[A-Za-z0-9_]+)=(.*)", line):
            config[m.group(1)] = m.group(2).strip('"')
        elif m := re.fullmatch(r"# (CONFIG_[A-Za-z0-9_]+) is not set", line):
            config[m.group(1)] = "n"
    return config


def parse_filesystems(text: str) -> frozenset[str]:
    """``/proc/filesystems`` -> the names (``nodev`` markers dropped)."""
    return frozenset(line.split()[-1] for line in text.splitlines() if line.split())


def cpu_virtualization(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` flags hardware virtualization (Intel vmx, AMD svm)."""
    return any(line.startswith("flags") and {"vmx", "svm"} & set(line.split()) for line in cpuinfo.splitlines())


def kernel_option(kernel: Kernel, option: str) -> str | None:
    """``"y"``, ``"m"`` or ``"n"`` for *option* in the running kernel's config; None when unknown."""
    if kernel.config is None:
        return None
    return kernel.config.get(option, "n")


# ------------------------------------------------------------------ probes (I/O)


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return None
    return data.decode(errors="replace")


def _error(exc: OSError) -> str:
    return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})" if exc.errno else str(exc)


def probe_kernel() -> Kernel:
    """The running kernel. Its config comes only from files that belong to this very release."""
    release = os.uname().release
    config, source = None, None
    for candidate in ("/proc/config.gz", f"/boot/config-{release}", f"/lib/modules/{release}/config"):
        text = _read(candidate)
        if text:
            config, source = parse_kernel_config(text), candidate
            break
    try:
        modules = frozenset(os.listdir(SYS_MODULE))
    except OSError:
        modules = frozenset()
    uring = _read(os.path.join(SYS_MODULE, "fuse", "parameters", "enable_uring"))
    return Kernel(
        release=release, version=parse_release(release), config=config, config_source=source,
        filesystems=parse_filesystems(_read("/proc/filesystems") or ""), modules=modules,
        fuse_uring_enabled=None if uring is None else uring.strip() in ("Y", "1"),
    )


def probe_fuse_device(path: str = FUSE_DEVICE) -> Outcome:
    """Whether *path* is the FUSE character device and opens read-write."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return Outcome(False, f"{path}: {_error(exc)}")
    number = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if not stat.S_ISCHR(st.st_mode) or number != FUSE_DEV_NUMBER:
        return Outcome(False, f"{path} is not the FUSE device (expected character device 10:229, found "
                              f"{'character device' if stat.S_ISCHR(st.st_mode) else 'a non-device'} {number[0]}:{number[1]})")
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return Outcome(False, f"{path} does not open: {_error(exc)}")
    return Outcome(True, f"{path} opens")


def probe_pyfuse3() -> Outcome:
    try:
        import pyfuse3
    except ImportError as exc:
        return Outcome(False, f"pyfuse3 does not import: {exc}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return Outcome(True, f"pyfuse3 {version('pyfuse3')}")
    except PackageNotFoundError:
        return Outcome(True, f"pyfuse3 {getattr(pyfuse3, '__version__', '(version unknown)')}")


def probe_native_reads() -> Outcome:
    from lazyfs.serve.fusekernel import fastpath

    return Outcome(fastpath.available(), fastpath.why_unavailable() or "built")


def probe_device_mapper() -> Outcome:
    from lazyfs.serve.dmswitch import unavailable_reason

    why = unavailable_reason()
    return Outcome(why is None, why or "device-mapper loaded, dmsetup installed")


def probe_loop(control: str = LOOP_CONTROL) -> Outcome:
    """Ask the loop driver for a free device (as ``losetup -f`` does) and check its node exists."""
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Outcome(False, f"{control}: {_error(exc)}")
    try:
        index = fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
    except OSError as exc:
        return Outcome(False, f"{control} gives no free loop device: {_error(exc)}")
    finally:
        os.close(fd)
    node = f"/dev/loop{index}"
    try:
        if not stat.S_ISBLK(os.stat(node).st_mode):
            return Outcome(False, f"{node} (free) is not a block device here")
    except OSError as exc:
        return Outcome(False, f"the free loop device {node} has no node here: {_error(exc)}")
    return Outcome(True, f"{control} hands out {node}")


def probe_io_uring() -> tuple[Outcome, int | None]:
    """Try ``io_uring_setup(1)`` and read ``kernel.io_uring_disabled``."""
    text = _read(IO_URING_DISABLED)
    disabled = int(text) if text and text.strip().isdigit() else None
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(IO_URING_PARAMS_SIZE)
    fd = libc.syscall(NR_IO_URING_SETUP, ctypes.c_uint(1), params)
    if fd < 0:
        err = ctypes.get_errno()
        return Outcome(False, f"io_uring_setup: {errno.errorcode.get(err, err)} ({os.strerror(err)})"), disabled
    os.close(fd)
    return Outcome(True, "io_uring_setup works"), disabled


def probe_kvm(path: str = KVM_DEVICE) -> Outcome:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return Outcome(False, f"{path}: {_error(exc)}")
    return Outcome(True, f"{path} opens")


def _mountpoint_of(path: str) -> tuple[str, str]:
    """(mountpoint, fstype) of the file system holding *path*, from ``findmnt``."""
    try:
        out = subprocess.run(["findmnt", "--json", "--target", path, "--output", "TARGET,FSTYPE"],
                             capture_output=True, text=True, timeout=VERSION_TIMEOUT, check=False)
        fs = json.loads(out.stdout)["filesystems"][0]
        return fs["target"], fs["fstype"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return "?", "?"


def probe_path(path: str) -> PathFacts:
    """Where *path* (or, when it does not exist yet, its nearest existing ancestor) lives."""
    path = os.path.abspath(path)
    probed = path
    while not os.path.exists(probed) and probed != "/":
        probed = os.path.dirname(probed)
    try:
        st = os.statvfs(probed)
    except OSError:
        return PathFacts(path, False, probed, "?", "?", False, False, 0, 0)
    read_only = bool(st.f_flag & os.ST_RDONLY)
    mountpoint, fstype = _mountpoint_of(probed)
    return PathFacts(
        path=path, exists=probed == path, probed=probed, fstype=fstype, mountpoint=mountpoint, read_only=read_only,
        writable=not read_only and os.access(probed, os.W_OK), free_bytes=st.f_bavail * st.f_frsize,
        total_bytes=st.f_blocks * st.f_frsize,
    )


def probe_verity(directory: str) -> Outcome:
    """Enable fs-verity on an empty temporary file in *directory* (deleted at once)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".lazyfs-verity-probe-", dir=directory)
    except OSError as exc:
        return Outcome(False, f"cannot create a probe file in {directory}: {_error(exc)}")
    try:
        os.close(fd)
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)  # fs-verity wants no writer
        try:
            arg = struct.pack("=IIII Q II Q 88x", 1, FSVERITY_HASH_ALG_SHA256, 4096, 0, 0, 0, 0, 0)
            fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
        except OSError as exc:
            return Outcome(False, f"FS_IOC_ENABLE_VERITY: {_error(exc)}")
        finally:
            os.close(fd)
        return Outcome(True, "FS_IOC_ENABLE_VERITY works")
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass  # nothing else to do: the name starts with a dot and holds nothing


def parse_version(text: str) -> str | None:
    """The first version number in a ``--version`` line: ``"runc version 1.1.5+ds1"`` -> ``"1.1.5+ds1"``."""
    m = re.search(r"(?<![\w.])\d+\.\d+(?:\.\d+)?[\w.+~-]*", text)
    return m.group(0) if m else None


def probe_tools(names: Iterable[str]) -> tuple[dict[str, str | None], dict[str, str]]:
    """Path and ``--version`` number of each program (None / absent when not installed)."""
    names = tuple(names)
    paths = {name: shutil.which(name) for name in names}
    versions = {}
    for name in names:
        if paths[name] is None or name in MOUNT_TOOLS or name == "mkfs.ext4":
            continue
        try:
            out = subprocess.run([paths[name], "--version"], capture_output=True, text=True,
                                 timeout=VERSION_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = (out.stdout or out.stderr).strip().splitlines()
        if lines and (number := parse_version(lines[0])):
            versions[name] = number
    return paths, versions


def _socket_answers(path: str) -> bool:
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(path)
        return True
    except OSError:
        return False


def _fusectl_mounted() -> Outcome:
    text = _read("/proc/self/mountinfo") or ""
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) > 4 and parts[4] == FUSECTL_DIR and " - fusectl " in line:
            return Outcome(True, f"fusectl mounted at {FUSECTL_DIR}")
    if os.path.isdir(FUSECTL_DIR):
        return Outcome(False, f"fusectl is not mounted at {FUSECTL_DIR} (lazyfs mounts it when it needs it)")
    return Outcome(False, f"{FUSECTL_DIR} does not exist")


def probe_host(paths: Mapping[str, str], *, verity_in: str | None = None) -> HostFacts:
    """Probe everything; *paths* maps config field names to directories, *verity_in* is the cache root."""
    io_uring, disabled = probe_io_uring()
    tools, versions = probe_tools(MOUNT_TOOLS + OTHER_TOOLS)
    path_facts = {name: probe_path(p) for name, p in paths.items()}
    verity = None
    if verity_in is not None and os.path.isdir(verity_in):
        verity = probe_verity(verity_in)
    return HostFacts(
        kernel=probe_kernel(), euid=os.geteuid(), fuse_device=probe_fuse_device(), pyfuse3=probe_pyfuse3(),
        fusectl=_fusectl_mounted(), loop=probe_loop(), io_uring=io_uring, io_uring_disabled=disabled,
        kvm=probe_kvm(), cpu_virtualization=cpu_virtualization(_read("/proc/cpuinfo") or ""),
        configfs_target=os.path.isdir(CONFIGFS_TARGET),
        containerd_socket=_socket_answers(CONTAINERD_SOCKET), tools=tools, versions=versions, paths=path_facts,
        verity=verity, native_reads=probe_native_reads(), device_mapper=probe_device_mapper(),
    )
