"""The daemon's side of the control API (``lazyfs.serve.control``): a trio server on a unix socket."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from lazyfs.errors import BusyError, FormatError, LazyfsError
from lazyfs.nursery import single_error
from lazyfs.serve.control import MAX_LINE, decode, encode, error_reply

log = logging.getLogger("lazyfs.serve.control")  # the name its log lines always had


Handler = Callable[[str, dict], Awaitable[object]]


async def serve_control(path: str, handle: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on unix socket *path* (mode 0600) and answer requests with *handle(op, args)*.

    A socket left at *path* is replaced only if nothing answers on it (`BusyError` otherwise),
    and on the way out only the socket this call bound is removed.
    """
    if os.path.lexists(path):
        await _remove_dead_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    bound = os.stat(path)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _connection(stream, handle), [listener])
    finally:
        with trio.CancelScope(shield=True):
            _unlink_if_same(path, bound)


async def _remove_dead_socket(path: str) -> None:
    """Unlink the socket at *path* unless something listens on it (a hanging connect counts as live)."""
    dead = False
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, trio.move_on_after(5):
        try:
            await probe.connect(path)
        except OSError:  # refused, or not a socket: nobody listens there
            dead = True
    if not dead:
        raise BusyError(f"a lazyfs daemon already answers on {path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _unlink_if_same(path: str, bound: os.stat_result) -> None:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
        os.unlink(path)


async def _connection(stream: trio.SocketStream, handle: Handler) -> None:
    buf = b""
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            buf += chunk
            if len(buf) > MAX_LINE:
                await stream.send_all(encode(error_reply(FormatError("control message too long"))))
                return
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    req = decode(line)
                    op, args = req.get("op"), req.get("args") or {}
                    if not isinstance(op, str) or not isinstance(args, dict):
                        raise FormatError("control request needs a string 'op' and an object 'args'")
                    reply = {"ok": True, "result": await handle(op, args)}
                except Exception as raised:  # cancellation (a BaseException) is no reply: it goes on
                    exc = single_error(raised)
                    if not isinstance(exc, (LazyfsError, OSError)):  # a bug must not kill the daemon: report it
                        log.error("control request failed", exc_info=exc)
                    reply = error_reply(exc)
                try:
                    await stream.send_all(encode(reply))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
