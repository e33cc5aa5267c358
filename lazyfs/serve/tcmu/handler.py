"""The trio I/O shell that serves a BlockSource on one TCMU ring.

A :class:`Uio` is the userspace end of a UIO device: a file descriptor that
becomes readable (4-byte event count) when the kernel queued work and accepts
a 4-byte write to say "look at cmd_tail", plus the mmapped map0 region. For a
real device both are ``/dev/uioN`` (``Uio.open``); the kernel emulation in
``tests.support.tcmu_kernel`` hands in a socket and a shared file through
``Uio.from_fds`` — everything after that is the same code.

:class:`TcmuHandler` waits for events, takes new entries off the ring, runs
each command in its own task (at most ``max_inflight`` at once) against the
source, writes the response and tells the kernel. Completions are batched: one
notification covers every response written in the same scheduler pass.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
from pathlib import Path

import trio

from lazyfs.device.source import BlockSource
from lazyfs.errors import ConfigError
from lazyfs.nursery import open_nursery
from lazyfs.serve.tcmu import scsi
from lazyfs.serve.tcmu.ring import Command, Ring, TaskManagement

log = logging.getLogger(__name__)

_EVENT = struct.Struct("=I")
SYS_CLASS_UIO = Path("/sys/class/uio")


class Uio:
    """Event fd + shared region of a UIO device. Owns (and closes) both descriptors."""

    def __init__(self, event_fd: int, map_fd: int, map_size: int, *, name: str = "") -> None:
        self.name = name
        self._fd = event_fd
        os.set_blocking(event_fd, False)
        try:
            # map0 of a UIO device is mmapped at page offset 0
            self._mmap = mmap.mmap(map_fd, map_size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        except BaseException:
            os.close(event_fd)
            if map_fd != event_fd:
                os.close(map_fd)
            raise
        if map_fd != event_fd:
            os.close(map_fd)  # the mapping keeps the file
        self.region = memoryview(self._mmap)
        self.events = 0
        self.notifies = 0

    @classmethod
    def from_fds(cls, event_fd: int, map_fd: int, map_size: int, *, name: str = "") -> Uio:
        """Wrap descriptors the caller opened (and hands over)."""
        return cls(event_fd, map_fd, map_size, name=name)

    @classmethod
    def open(cls, device: str | os.PathLike, *, sysfs: str | os.PathLike = SYS_CLASS_UIO) -> Uio:
        """Open ``/dev/uioN`` and map its map0 (size from ``/sys/class/uio/uioN/maps/map0/size``)."""
        device = Path(device)
        size_file = Path(sysfs) / device.name / "maps" / "map0" / "size"
        try:
            size = int(size_file.read_text().strip(), 0)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the map size of {device} from {size_file}: {exc}") from exc
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        return cls(fd, fd, size, name=device.name)

    def fileno(self) -> int:
        return self._fd

    def read_event(self) -> int | None:
        """The event count if an event is pending, else None (never blocks)."""
        try:
            data = os.read(self._fd, _EVENT.size)
        except BlockingIOError:
            return None
        if len(data) != _EVENT.size:
            raise OSError(errno.EIO, f"short read of {len(data)} bytes from UIO device {self.name}")
        self.events += 1
        return _EVENT.unpack(data)[0]

    def notify(self) -> None:
        """Tell the kernel that cmd_tail moved (write a 4-byte 1)."""
        try:
            os.write(self._fd, _EVENT.pack(1))
        except BlockingIOError:
            pass  # a notification is already queued; the kernel reads the tail when it takes it
        self.notifies += 1

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            self.region.release()
            self._mmap.close()
        except BufferError:
            # A view of the region is still alive somewhere; the mapping goes with it.
            log.warning("UIO %s: region still referenced at close; unmapping deferred", self.name)
        finally:
            os.close(fd)


class TcmuHandler:
    """Serves *source* as the LUN described by *info* on the ring behind *uio*."""

    def __init__(self, source: BlockSource, uio: Uio, info: scsi.DeviceInfo, *, max_inflight: int = 64,
                 out_of_order: bool | None = None, restartable: bool = False) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.source = source
        self.uio = uio
        self.info = info
        # restartable: a new handler over the same region (after a daemon restart) takes over
        # what this one leaves (ring.py): in-order completion, marked responses
        self.ring = Ring(uio.region, out_of_order=out_of_order, restartable=restartable)
        self._slots = trio.Semaphore(max_inflight)
        self._kick = trio.Event()
        self._stats = {"commands": 0, "completed": 0, "check_conditions": 0, "bytes_read": 0,
                       "bytes_written": 0, "tmr": 0, "inplace_reads": 0, "ops": {}}

    def statistics(self) -> dict:
        """Commands, errors, bytes moved, in flight, notifications."""
        stats = dict(self._stats)
        stats["ops"] = dict(self._stats["ops"])
        stats["inflight"] = self.ring.inflight
        stats["notifies"] = self.uio.notifies
        stats["events"] = self.uio.events
        stats["taken_over"] = dict(self.ring.taken_over)
        return stats

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. A broken ring ends it with FormatError.

        Never do blocking I/O on the served disk from the thread running this
        handler: the kernel would wait for an answer the blocked loop cannot give.
        """
        try:
            async with open_nursery() as nursery:
                nursery.start_soon(self._notifier)
                task_status.started()
                await self._dispatch(nursery)
        except Exception:
            log.exception("TCMU handler for %s stopped", self.info.name)
            raise
        finally:
            self.ring.release()

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        while True:
            while self.uio.read_event() is not None:
                continue  # drain every pending notification; the ring itself says what is new
            moves = self.ring.tail_moves
            for event in self.ring.receive():
                if isinstance(event, Command):
                    await self._slots.acquire()
                    self._stats["commands"] += 1
                    nursery.start_soon(self._serve_command, event)
                elif isinstance(event, TaskManagement):
                    # Commands already on the ring still get answered; the kernel
                    # ignores the status of the ones it aborted.
                    self._stats["tmr"] += 1
                    log.info("TCMU task management %d for commands %s", event.tmr_type, event.cmd_ids)
            if self.ring.tail_moves != moves:
                self._kick.set()
            await trio.lowlevel.wait_readable(self.uio.fileno())

    async def _serve_command(self, cmd: Command) -> None:
        try:
            direction = scsi.data_direction(cmd.cdb)
            data_out = self.ring.read_data(cmd) if direction is scsi.Direction.OUT else None
            # reads go straight into the data area when the buffer is one piece (issue 14, item 5)
            data_in = self.ring.data_view(cmd) if direction is scsi.Direction.IN else None
            result = await scsi.execute(self.source, cmd.cdb, data_out, self.info, data_in)
            del data_in  # no view of the region outlives the command (Uio.close unmaps it)
            read_len = None
            if direction is scsi.Direction.IN and result.ok:
                if result.placed:
                    read_len = result.placed
                    self._stats["inplace_reads"] += 1
                else:
                    read_len = self.ring.write_data(cmd, result.data_in)
                if read_len < cmd.data_length:
                    self.ring.clear_data(cmd, read_len)  # never hand back stale data-area bytes
                self._stats["bytes_read"] += read_len
            elif direction is scsi.Direction.OUT and result.ok and data_out is not None:
                self._stats["bytes_written"] += len(data_out)
            if not result.ok:
                self._stats["check_conditions"] += 1
            op = cmd.cdb[0] if cmd.cdb else -1
            self._stats["ops"][op] = self._stats["ops"].get(op, 0) + 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("TCMU %s cmd %d cdb %s iov %d bytes -> status %d sense %s data %s", self.info.name,
                          cmd.cmd_id, cmd.cdb.hex(), cmd.data_length, result.status, result.sense[:14].hex(),
                          read_len)
            if self.ring.complete(cmd.cmd_id, result.status, result.sense, read_len=read_len):
                self._kick.set()
            self._stats["completed"] += 1
        finally:
            self._slots.release()

    async def _notifier(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            # Let every other completion that is ready now land first: one write covers them all.
            await trio.lowlevel.cancel_shielded_checkpoint()
            self.uio.notify()


async def serve(source: BlockSource, uio: Uio, info: scsi.DeviceInfo, *, max_inflight: int = 64,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve *source* on *uio* until cancelled (convenience wrapper around TcmuHandler)."""
    handler = TcmuHandler(source, uio, info, max_inflight=max_inflight)
    await handler.run(task_status=task_status)
