"""The daemon's control API: JSON lines over a root-only unix socket.

Request: ``{"op": NAME, "args": {...}}``. Reply: ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": MESSAGE, "type": EXCEPTION CLASS}``. The codec is
sans-IO; ``call`` here (a blocking client, no trio: the CLI's mount path uses it) and
``controlserver.serve_control`` (the daemon's trio server) are the thin shells around it.
"""

from __future__ import annotations

import json
import socket

from lazyfs import errors
from lazyfs.errors import FormatError, LazyfsError, describe

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
