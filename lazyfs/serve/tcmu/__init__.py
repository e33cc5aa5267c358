"""TCMU front end: any BlockSource as a SCSI LUN through Linux ``target_core_user``.

``ring`` (sans-IO command ring), ``scsi`` (sans-IO SCSI target + I/O shell),
``handler`` (trio shell over a UIO device), ``configfs`` (backstore + loopback
LUN setup: ``attach``/``detach``).
"""

from lazyfs.serve.tcmu.configfs import TcmuDevice, attach, check_available, detach
from lazyfs.serve.tcmu.handler import TcmuHandler, Uio, serve
from lazyfs.serve.tcmu.scsi import DeviceInfo, Result, execute, handle

__all__ = ["DeviceInfo", "Result", "TcmuDevice", "TcmuHandler", "Uio", "attach", "check_available", "detach",
           "execute", "handle", "serve"]
