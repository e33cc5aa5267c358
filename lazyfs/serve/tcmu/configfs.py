"""Expose a BlockSource as a local SCSI disk: a TCMU user backstore behind a loopback fabric LUN.

Setup, in order (the planner builds these steps as values; the executor only
runs them):

1. ``mkdir core/user_<H>/<NAME>`` (``H`` stable per name) and write
   ``control`` = ``dev_size=…,dev_config=lazyfs/<NAME>,hw_block_size=…,
   hw_max_sectors=…,nl_reply_supported=-1`` (no netlink daemon answers us),
   then ``enable`` = 1 — the kernel creates ``/dev/uioN``;
2. open the UIO device and start the handler (the initiator scans the LUN as
   soon as it exists, so someone must be answering);
3. ``mkdir loopback/naa.<T>/tpgt_1``, write its ``nexus`` = ``naa.<I>``,
   ``mkdir tpgt_1/lun/lun_0`` and symlink the backstore into it; the loopback
   HBA then shows the disk as ``/dev/sdX``.

Teardown is the reverse; it is idempotent and works from the names alone, so
``detach(name)`` also cleans up after a crashed process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Union

import trio

from lazyfs.device.source import BlockSource
from lazyfs.errors import BusyError, ConfigError, LazyfsError, NotFoundError
from lazyfs.serve.state import TCMU_NAME
from lazyfs.serve.tcmu.handler import TcmuHandler, Uio
from lazyfs.serve.tcmu.scsi import DeviceInfo

log = logging.getLogger(__name__)

CONFIGFS_TARGET = Path("/sys/kernel/config/target")
SYS_MODULE = Path("/sys/module")
SYS_CLASS_UIO = Path("/sys/class/uio")
SYS_SCSI_DEVICES = Path("/sys/bus/scsi/devices")
DEV = Path("/dev")

_NAME = re.compile(TCMU_NAME)


def check_available(configfs: Path = CONFIGFS_TARGET, sys_module: Path = SYS_MODULE) -> None:
    """Raise ConfigError (saying what is missing and how to get it) unless TCMU can be used here."""
    if not (sys_module / "target_core_user").is_dir():
        raise ConfigError(
            "target_core_user not available: kernel module target_core_user is not loaded "
            f"({sys_module / 'target_core_user'} missing; try `modprobe target_core_user tcm_loop`)")
    if not configfs.is_dir():
        raise ConfigError(
            f"target_core_user not available: {configfs} missing "
            "(mount configfs: `mount -t configfs none /sys/kernel/config`)")


def validate_name(name: str) -> str:
    """*name* if it can be a backstore name (letters, digits, ``._-``, at most 64), else ConfigError."""
    if not _NAME.match(name):
        raise ConfigError(f"TCMU device name {name!r} must be 1-64 of [A-Za-z0-9._-], starting alphanumeric")
    return name


def _hash(name: str, salt: str) -> bytes:
    return hashlib.sha256(f"lazyfs-tcmu/{salt}/{name}".encode()).digest()


# --- the plan (pure values) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mkdir:
    path: Path


@dataclass(frozen=True, slots=True)
class WriteAttr:
    path: Path
    value: str


@dataclass(frozen=True, slots=True)
class Symlink:
    target: Path
    link: Path


@dataclass(frozen=True, slots=True)
class Unlink:
    path: Path


@dataclass(frozen=True, slots=True)
class Rmdir:
    path: Path


Step = Union[Mkdir, WriteAttr, Symlink, Unlink, Rmdir]


@dataclass(frozen=True, slots=True)
class Layout:
    """Every configfs path of one lazyfs TCMU device, derived from its name."""

    name: str
    configfs: Path = CONFIGFS_TARGET

    @property
    def hba_id(self) -> int:
        return int.from_bytes(_hash(self.name, "hba")[:4], "big") & 0x7FFFFFFF

    @property
    def hba_dir(self) -> Path:
        return self.configfs / "core" / f"user_{self.hba_id}"

    @property
    def backstore(self) -> Path:
        return self.hba_dir / self.name

    @property
    def dev_config(self) -> str:
        return f"lazyfs/{self.name}"

    @property
    def uio_name(self) -> str:
        """What the kernel names the UIO device: ``tcm-user/<hba>/<name>/<dev_config>``."""
        return f"tcm-user/{self.hba_id}/{self.name}/{self.dev_config}"

    @property
    def target_wwn(self) -> str:
        return "naa.3" + _hash(self.name, "target")[:8].hex()[1:]  # NAA 3, 16 hex digits

    @property
    def initiator_wwn(self) -> str:
        return "naa.3" + _hash(self.name, "initiator")[:8].hex()[1:]

    @property
    def loopback(self) -> Path:
        return self.configfs / "loopback"

    @property
    def fabric_dir(self) -> Path:
        return self.loopback / self.target_wwn

    @property
    def tpg_dir(self) -> Path:
        return self.fabric_dir / "tpgt_1"

    @property
    def lun_dir(self) -> Path:
        return self.tpg_dir / "lun" / "lun_0"

    @property
    def lun_link(self) -> Path:
        return self.lun_dir / "lazyfs"


def control_string(size: int, dev_config: str, block_size: int, max_sectors: int) -> str:
    """The ``control`` attribute value that configures a user backstore."""
    return (f"dev_size={size},dev_config={dev_config},hw_block_size={block_size},"
            f"hw_max_sectors={max_sectors},nl_reply_supported=-1")


def plan_backstore(layout: Layout, info: DeviceInfo) -> list[Step]:
    usable = info.blocks * info.block_size
    return [
        Mkdir(layout.hba_dir),
        Mkdir(layout.backstore),
        WriteAttr(layout.backstore / "control",
                  control_string(usable, layout.dev_config, info.block_size, info.max_transfer_blocks)),
        WriteAttr(layout.backstore / "enable", "1"),
        # no ring timeout (the default fails a command the handler has not answered in 30 s with
        # CHECK CONDITION): across a daemon restart, commands wait on the kept ring for the next
        # daemon. Settable only while the device has no LUN.
        WriteAttr(layout.backstore / "attrib" / "cmd_time_out", "0"),
    ]


def plan_fabric(layout: Layout) -> list[Step]:
    return [
        Mkdir(layout.loopback),
        Mkdir(layout.fabric_dir),
        Mkdir(layout.tpg_dir),
        WriteAttr(layout.tpg_dir / "nexus", layout.initiator_wwn),
        Mkdir(layout.lun_dir),
        Symlink(layout.backstore, layout.lun_link),
    ]


def plan_fabric_teardown(layout: Layout) -> list[Step]:
    # Removing the tpg also drops the nexus; the loopback dir itself stays (shared).
    return [Unlink(layout.lun_link), Rmdir(layout.lun_dir), Rmdir(layout.tpg_dir), Rmdir(layout.fabric_dir)]


def plan_backstore_teardown(layout: Layout) -> list[Step]:
    return [Rmdir(layout.backstore), Rmdir(layout.hba_dir)]


def apply(step: Step) -> None:
    """Run one step; steps that find their work already done (or undone) succeed."""
    try:
        if isinstance(step, Mkdir):
            step.path.mkdir(exist_ok=True)
        elif isinstance(step, WriteAttr):
            with open(step.path, "w") as f:
                f.write(step.value)
        elif isinstance(step, Symlink):
            if not step.link.is_symlink():
                os.symlink(step.target, step.link)
        elif isinstance(step, Unlink):
            step.path.unlink(missing_ok=True)
        elif isinstance(step, Rmdir):
            with contextlib.suppress(FileNotFoundError):  # already gone: that is the goal
                step.path.rmdir()
    except OSError as exc:
        if isinstance(step, Rmdir) and exc.errno in (errno.ENOTEMPTY, errno.EBUSY):
            raise BusyError(f"cannot remove {step.path}: {exc.strerror}") from exc
        raise LazyfsError(f"configfs step {step} failed: {exc}") from exc


# --- finding what the kernel made ---------------------------------------------------------------


def find_uio(layout: Layout, sys_class_uio: Path = SYS_CLASS_UIO) -> str | None:
    """The ``uioN`` whose name is the backstore's, or None."""
    try:
        entries = sorted(sys_class_uio.iterdir())
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            if (entry / "name").read_text().strip() == layout.uio_name:
                return entry.name
        except OSError:
            continue
    return None


def find_disk(layout: Layout, sys_scsi: Path = SYS_SCSI_DEVICES) -> str | None:
    """The ``sdX`` the loopback LUN became, or None (yet)."""
    try:
        address = (layout.tpg_dir / "address").read_text().strip()  # "host:channel:target"
        block = sys_scsi / f"{address}:0" / "block"
        names = sorted(p.name for p in block.iterdir())
    except OSError:
        return None
    return names[0] if names else None


# --- attach / detach ---------------------------------------------------------------------------------


@dataclass(eq=False)
class TcmuDevice:
    """A source served as a SCSI disk. ``disk`` is like ``/dev/sdb``."""

    name: str
    layout: Layout
    uio: Uio
    handler: TcmuHandler
    disk: Path | None = None
    _scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    _stopped: trio.Event = field(default_factory=trio.Event)

    def statistics(self) -> dict:
        return self.handler.statistics()


_ATTACHED: dict[str, TcmuDevice] = {}


async def _run_steps(steps: list[Step]) -> None:
    for step in steps:
        await trio.to_thread.run_sync(apply, step)


async def _run_teardown(steps: list[Step]) -> None:
    for step in steps:
        try:
            await trio.to_thread.run_sync(apply, step)
        except LazyfsError as exc:
            log.warning("TCMU teardown: %s", exc)


async def _poll(what: str, find, timeout: float):
    with trio.move_on_after(timeout):
        while True:
            found = await trio.to_thread.run_sync(find)
            if found is not None:
                return found
            await trio.sleep(0.05)
    raise LazyfsError(f"timed out after {timeout}s waiting for {what}")


async def attach(source: BlockSource, name: str, *, nursery: trio.Nursery, block_size: int = 512,
                 max_inflight: int = 64, configfs: Path = CONFIGFS_TARGET, timeout: float = 30.0,
                 keep: Callable[[int, str], None] | None = None) -> TcmuDevice:
    """Serve *source* as SCSI disk *name*; the handler runs in *nursery* until ``detach(name)``.

    *keep*: called (in a worker thread) with the uio fd and device name (``uio0``) before the
    LUN exists, to keep the fd across a restart (``lazyfs.serve.tcmu.keep``); the ring is then
    restartable (in-order completion, see ``ring.py``) and ``adopt`` takes it over.

    Raises ConfigError when configfs/target_core_user is missing, BusyError
    when *name* is attached already. On failure everything made so far is
    removed again. Use the disk (``device.disk``) from other threads or
    processes, never blocking on it from the trio thread that serves it.
    """
    validate_name(name)
    check_available(configfs)
    if name in _ATTACHED:
        raise BusyError(f"TCMU device {name} is already attached")
    layout = Layout(name, configfs)
    if layout.backstore.exists():
        raise BusyError(f"{layout.backstore} exists: {name} is attached by another process (or detach it)")
    info = DeviceInfo.for_source(source, name, block_size=block_size)
    device: TcmuDevice | None = None
    try:
        await _run_steps(plan_backstore(layout, info))
        uio_dev = await _poll(f"the UIO device of {name}", lambda: find_uio(layout), timeout)
        uio = await trio.to_thread.run_sync(Uio.open, DEV / uio_dev)
        try:
            handler = TcmuHandler(source, uio, info, max_inflight=max_inflight, restartable=keep is not None)
            if keep is not None:
                await trio.to_thread.run_sync(keep, uio.fileno(), uio_dev)
        except BaseException:
            uio.close()
            raise
        device = TcmuDevice(name, layout, uio, handler)
        await nursery.start(_serve, device)
        _ATTACHED[name] = device
        await _run_steps(plan_fabric(layout))
        disk = await _poll(f"the SCSI disk of {name}", lambda: find_disk(layout), timeout)
        device.disk = DEV / disk
        return device
    except BaseException:
        with trio.CancelScope(shield=True):
            await _teardown(layout, device)
        raise


async def adopt(source: BlockSource, name: str, fd: int, *, nursery: trio.Nursery, block_size: int = 512,
                max_inflight: int = 64, configfs: Path = CONFIGFS_TARGET, sys_class_uio: Path = SYS_CLASS_UIO,
                timeout: float = 30.0) -> TcmuDevice:
    """Take over LUN *name* from a previous daemon: *fd* is its kept uio fd (taken over: closed
    here on failure). The ring is mapped again and every command on it that the previous daemon
    had not answered is served (``Ring``, restartable). NotFoundError if the LUN is gone."""
    try:
        validate_name(name)
        layout = Layout(name, configfs)
        if name in _ATTACHED:
            raise BusyError(f"TCMU device {name} is already attached")
        uio_dev = await trio.to_thread.run_sync(find_uio, layout, sys_class_uio)
        if uio_dev is None or not layout.backstore.exists():
            raise NotFoundError(f"TCMU device {name} is gone: nothing to take over")
        size_file = sys_class_uio / uio_dev / "maps" / "map0" / "size"
        try:
            size = int(size_file.read_text().strip(), 0)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the map size of {uio_dev} from {size_file}: {exc}") from exc
        info = DeviceInfo.for_source(source, name, block_size=block_size)
    except BaseException:
        os.close(fd)
        raise
    uio = await trio.to_thread.run_sync(lambda: Uio.from_fds(fd, fd, size, name=uio_dev))
    try:
        handler = TcmuHandler(source, uio, info, max_inflight=max_inflight, restartable=True)
    except BaseException:
        uio.close()
        raise
    device = TcmuDevice(name, layout, uio, handler)
    await nursery.start(_serve, device)
    _ATTACHED[name] = device
    disk = await _poll(f"the SCSI disk of {name}", lambda: find_disk(layout), timeout)
    device.disk = DEV / disk
    log.info("TCMU %s: took over %s (%s)", name, uio_dev, device.disk)
    return device


def reopen(name: str, *, configfs: Path = CONFIGFS_TARGET, sys_class_uio: Path = SYS_CLASS_UIO,
           dev: Path = DEV) -> tuple[int, str, str] | None:
    """Open the uio device of LUN *name* again after its owner died without a keeper: the
    kernel keeps the device, its ring and the commands on it across the close. ``(fd, uioN,
    "uio device")``, or None if the device is gone or still open (EBUSY: someone holds it)."""
    uio_dev = find_uio(Layout(validate_name(name), configfs), sys_class_uio)
    if uio_dev is None:
        return None
    try:
        fd = os.open(dev / uio_dev, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        log.warning("TCMU %s: cannot open %s again: %s", name, dev / uio_dev, exc)
        return None
    return fd, uio_dev, "uio device"


def attached(name: str) -> TcmuDevice:
    """The device this process serves as *name* (NotFoundError if none)."""
    device = _ATTACHED.get(name)
    if device is None:
        raise NotFoundError(f"TCMU device {name} is not attached here")
    return device


async def _serve(device: TcmuDevice, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        with device._scope:
            await device.handler.run(task_status=task_status)
    finally:
        device.uio.close()
        device._stopped.set()


async def _teardown(layout: Layout, device: TcmuDevice | None) -> None:
    await _run_teardown(plan_fabric_teardown(layout))
    if device is not None:
        # The LUN is gone, so nothing is in flight any more; stop answering.
        device._scope.cancel()
        with trio.move_on_after(10):
            await device._stopped.wait()
        _ATTACHED.pop(layout.name, None)
    await _run_teardown(plan_backstore_teardown(layout))


async def detach(name: str, *, configfs: Path = CONFIGFS_TARGET) -> None:
    """Remove disk *name*: LUN, fabric, handler, backstore. Works after a crash too (no handler then)."""
    validate_name(name)
    layout = Layout(name, configfs)
    device = _ATTACHED.get(name)
    if device is None and not layout.backstore.exists() and not layout.fabric_dir.exists():
        raise NotFoundError(f"TCMU device {name} is not attached")
    with trio.CancelScope(shield=True):
        await _teardown(layout, device)
