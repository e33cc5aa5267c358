"""A read-only mount moved onto its image's hydrated file while it runs (device-mapper).

``lazyfs mount`` of a read-only image puts a one-target device-mapper ``linear`` device between
the loop device (over the FUSE-exported file) and the ext4 it mounts, where the kernel has
device-mapper. Once the image is fully local and its hydrated file exists (``hydrated.py``), the
daemon attaches a loop device to that file and swaps the table in place: ``dmsetup suspend``
waits for the reads in flight and holds new ones, ``reload`` loads the new table, ``resume``
lets reads go on, now to the local file. The ext4 above never sees a change: no remount, no
error, no wrong byte (the two files hold the same bytes). This is how LVM moves a live volume.

Loop devices under the switchable device are detached as soon as it holds them
(``losetup -d`` of an open loop device only marks it to clear itself): the old one goes away
when the switch lets go of it, the new one when ``lazyfs umount`` removes the device. So a
switch or an unmount never has a loop device to clean up, and a crash leaves none behind
unless it falls between the new loop device's attach and the reload.

Where the kernel has no device-mapper (``/sys/class/misc/device-mapper``; this project's CI host), mounts
go straight onto the loop device as before, and a running mount keeps reading through FUSE
(docs/warm.md §3 says why the other ways to switch do not work here). ``hydrated_switch``
turns it off.

Sans-IO: every function here yields ``syscmd`` steps (``Command``s) and parses their answers;
``run_steps_blocking`` (the CLI) or ``system.run_steps`` (the daemon) drives them. This module
does not import trio.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from lazyfs.errors import FormatError, LazyfsError
from lazyfs.serve.state import DM_NAME
from lazyfs.serve.syscmd import Command, CommandError, Steps, losetup_detach_steps

CONTROL = "/dev/mapper/control"
MISC = "/sys/class/misc/device-mapper"  # there while the kernel's device-mapper driver is loaded
PREFIX = "lazyfs-"
#: the names lazyfs gives its devices: PREFIX + 16 hex digits of the attachment name's SHA-256
NAME = DM_NAME
SECTOR = 512
_TABLE = re.compile(r"^0 (\d+) linear (\d+):(\d+) 0$")


def _log():
    """This module's logger. logging is imported only when a line is logged: `lazyfs mount` imports
    this module, and its start waits for imports (issue 14; tests/serve/test_mount_imports.py)."""
    import logging

    return logging.getLogger(__name__)


def _on_path(tool: str) -> bool:
    """Whether *tool* is an executable on PATH (shutil.which, without importing shutil on the mount path)."""
    return any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d)


@dataclass(frozen=True, slots=True)
class Linear:
    """A one-target linear table: *sectors* long, onto block device *major*:*minor* from sector 0."""

    sectors: int
    major: int
    minor: int

    def line(self) -> str:
        return f"0 {self.sectors} linear {self.major}:{self.minor} 0"


def unavailable_reason(misc: str = MISC, control: str = CONTROL) -> str | None:
    """Why mounts cannot be made switchable on this host, or None if they can.

    The kernel is asked (its misc device ``device-mapper``), not ``/dev/mapper/control``: dmsetup
    makes that node whenever it runs, whether the kernel has the driver or not.
    """
    if not _on_path("dmsetup"):
        return "dmsetup is not installed"
    if not os.path.exists(misc):
        return f"the kernel has no device-mapper loaded ({misc} is missing; modprobe dm_mod, if it is a module)"
    if not os.path.exists(control):
        return f"{control} is missing (the kernel has device-mapper: dmsetup mknodes makes it)"
    return None


def device_name(attachment: str) -> str:
    """The device-mapper name of *attachment*'s switchable device (short, fixed length)."""
    return PREFIX + hashlib.sha256(attachment.encode()).hexdigest()[:16]


def device_path(name: str) -> str:
    return f"/dev/mapper/{name}"


def _check_name(name: str) -> str:
    if not re.fullmatch(NAME, name):
        raise FormatError(f"{name!r} is not a device-mapper name lazyfs made")
    return name


def parse_table(text: str, name: str) -> Linear:
    """The table ``dmsetup table NAME`` printed, which must be one linear target from sector 0."""
    m = _TABLE.match(text.strip())
    if m is None:
        raise FormatError(f"device-mapper device {name} has the table {text.strip()!r}, not one linear target")
    return Linear(int(m[1]), int(m[2]), int(m[3]))


def linear_onto(dev: str, sectors: int) -> Steps:
    """The table mapping *sectors* onto block device *dev* (a path: its numbers are read from it)."""
    rdev = yield (lambda: os.stat(dev).st_rdev)
    return Linear(sectors, os.major(rdev), os.minor(rdev))


def _dmsetup(*args: str, timeout: float) -> Command:
    # --noudevsync: udev need not run (containers, minimal hosts); mknodes below makes the node
    return Command(("dmsetup", *args, "--noudevsync"), (), timeout)


def create_steps(name: str, dev: str, size: int, timeout: float = 60.0) -> Steps:
    """Create read-only device *name* mapping *size* bytes onto block device *dev*, then detach
    *dev* (it clears itself once the device lets go of it). Returns the device's path."""
    _check_name(name)
    if size <= 0 or size % SECTOR:
        raise FormatError(f"a switchable device needs a size in whole sectors, not {size}")
    table = yield from linear_onto(dev, size // SECTOR)
    yield _dmsetup("create", name, "--readonly", "--table", table.line(), timeout=timeout)
    try:
        yield _dmsetup("mknodes", name, timeout=timeout)
        yield from losetup_detach_steps(dev, timeout)
    except Exception:  # not BaseException: a closed generator (GeneratorExit) may not yield
        yield from remove_steps(name, timeout)
        raise
    return device_path(name)


def table_steps(name: str, timeout: float = 60.0) -> Steps:
    """The live table of device *name*, as a `Linear`."""
    return parse_table((yield _dmsetup("table", _check_name(name), timeout=timeout)), name)


def switch_steps(name: str, dev: str, timeout: float = 60.0) -> Steps:
    """Point device *name* at block device *dev* (same size) while it is in use, then detach
    *dev* as `create_steps` does. Returns the old `Linear` table.

    Reads in flight finish on the old device before ``suspend`` returns; reads issued meanwhile
    wait and go to the new one. Whatever fails, the device is resumed: a suspended device would
    hang every reader. So the steps must not be abandoned between suspend and resume: the daemon
    runs them shielded from cancellation.
    """
    old = yield from table_steps(name, timeout)
    new = yield from linear_onto(dev, old.sectors)
    if (new.major, new.minor) == (old.major, old.minor):
        return old
    yield _dmsetup("suspend", name, timeout=timeout)
    try:
        yield _dmsetup("reload", name, "--readonly", "--table", new.line(), timeout=timeout)
    finally:
        # resumed whatever happened: with the new table if the reload loaded it, else the old one
        yield _dmsetup("resume", name, timeout=timeout)
    try:
        yield from losetup_detach_steps(dev, timeout)
    except LazyfsError as exc:  # the switch is done; the device only stays attached after the unmount
        _log().warning("%s is not set to detach itself after %s is removed: %s", dev, name, exc)
    return old


def remove_steps(name: str, timeout: float = 60.0) -> Steps:
    """Remove device *name* if it exists (``--retry``: udev may hold it for a moment)."""
    _check_name(name)
    try:
        yield _dmsetup("remove", "--retry", name, timeout=timeout)
    except CommandError as exc:
        if "no such device" not in (exc.stderr + exc.stdout).lower():
            raise
        return False
    return True


__all__ = ["CONTROL", "MISC", "NAME", "Linear", "create_steps", "device_name", "device_path", "linear_onto",
           "parse_table", "remove_steps", "switch_steps", "table_steps", "unavailable_reason"]
