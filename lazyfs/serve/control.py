"""The daemon's control API: JSON lines over a root-only unix socket.

Request: ``{"op": NAME, "args": {...}}``. Reply: ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": MESSAGE, "type": EXCEPTION CLASS}``. The codec is
sans-IO; ``serve_control`` and ``call`` are the thin shells around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from lazyfs import errors
from lazyfs.errors import BusyError, FormatError, LazyfsError, describe
from lazyfs.nursery import single_error

log = logging.getLogger(__name__)
MAX_LINE = 1 << 20


def encode(doc: dict) -> bytes:
    return json.dumps(doc, default=str).encode() + b"\n"


def decode(line: bytes) -> dict:
    if len(line) > MAX_LINE:
        raise FormatError(f"control message of {len(line)} bytes is too long")
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise FormatError(f"control message is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FormatError("control message is not an object")
    return doc


def error_reply(exc: BaseException) -> dict:
    return {"ok": False, "error": describe(exc), "type": type(exc).__name__}


def raise_reply(reply: dict) -> object:
    """The result of a reply, or the lazyfs exception it carries, raised again on this side."""
    if reply.get("ok"):
        return reply.get("result")
    cls = getattr(errors, str(reply.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, LazyfsError)) or cls in (errors.IntegrityError, errors.FetchError):
        cls = LazyfsError
    raise cls(str(reply.get("error", "the daemon refused the request")))


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


def call(path: str, op: str, timeout: float = 120.0, **args) -> object:
    """Send one request to the daemon at *path* and return its result (raising its error)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise errors.NotFoundError(f"no lazyfs daemon answers on {path}") from None
        sock.sendall(encode({"op": op, "args": args}))
        buf = b""
        try:
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise LazyfsError(f"the lazyfs daemon closed the connection during {op!r}")
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise FormatError("control reply too long")
        except TimeoutError:
            raise LazyfsError(f"the lazyfs daemon did not answer {op!r} within {timeout:.0f} s") from None
    return raise_reply(decode(buf.split(b"\n", 1)[0]))
