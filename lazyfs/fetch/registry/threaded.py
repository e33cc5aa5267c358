"""Blob range bodies read in worker threads, off the trio thread.

A ranged blob GET is megabytes of body; read through httpx on trio, every piece passes
through httpcore, h11 and httpx on the one trio thread that also serves warm reads (the cold
fetch benchmark's profile had it as that thread's largest cost, BENCHMARKS.md). A request
that carries ``extensions[THREADED]`` (its body's bound; ``read_range_from`` sets it) and goes direct (no
proxy) is sent instead by ``ThreadedPool``: one blocking HTTP/1.1 exchange in a worker
thread, whose body ``http.client`` reads straight from the socket into one ``bytes`` of its
final size (one copy from the kernel). What decides *what* to send stays where it was: the
auth flow (``RegistryAuth``, tokens, 401 replays), redirects, the source picker and the retry
layer all run above the transport on trio, exactly as for any other request; only the bytes
on the wire move.

Bounds: at most the request's ``THREADED`` bound of body is read (a 401's body is cut at 64 KiB), so a
read never buffers more than asked for. Every socket operation has the request's read timeout,
and a cancelled exchange (an attempt deadline, a cancelled fetch) shuts its socket down from
the trio side, so the worker's blocked ``recv`` returns at once and the thread ends instead of
holding its buffer until a timeout. Idle keep-alive connections are pooled per
(scheme, host, port), at most ``max_idle`` each; a reused connection the server has closed
is retried once on a fresh one.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections.abc import Callable

import httpx
import trio

THREADED = "lazyfs.threaded"
_RETRYABLE = (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError, BrokenPipeError)


class _Aborted(Exception):
    """The exchange was cancelled from the trio side."""


class _Exchange:
    """One exchange's link between the trio task and its worker thread."""

    __slots__ = ("_lock", "_conn", "aborted")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.aborted = False

    def attach(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if self.aborted:
                raise _Aborted()
            self._conn = conn

    def detach(self) -> None:
        with self._lock:
            self._conn = None
            if self.aborted:
                raise _Aborted()

    def abort(self) -> None:
        """Make the worker's blocked socket call return now (called on the trio thread; never blocks)."""
        with self._lock:
            self.aborted = True
            conn = self._conn
            sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # not connected yet, or already closed
                pass


class ThreadedPool:
    """Blocking HTTP/1.1 connections for body-heavy requests, used from worker threads."""

    def __init__(self, *, max_threads: int = 16, max_idle: int = 8) -> None:
        self._limiter = trio.CapacityLimiter(max_threads)
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._closed = False
        self.counters = {"exchanges": 0, "reused": 0, "aborted": 0, "threads_done": 0}
        # A test hook: called in the worker after the response head is read (None normally).
        self.after_head: Callable[[], None] | None = None

    async def send(self, request: httpx.Request, context: ssl.SSLContext | None, limit: int) -> httpx.Response:
        """Send *request* in a worker thread; the response comes back with its body read, at most
        *limit* bytes of it (a longer body is cut at *limit* + 1 bytes, or left unread when its
        Content-Length says so, for the caller to refuse; its connection is closed)."""
        exchange = _Exchange()
        self.counters["exchanges"] += 1
        try:
            status, headers, body = await trio.to_thread.run_sync(
                self._exchange, request, context, limit, exchange, limiter=self._limiter, abandon_on_cancel=True)
        except BaseException:
            exchange.abort()  # cancelled (or failed): the worker, if still blocked, returns at once
            raise
        return httpx.Response(status, headers=headers, content=body, request=request,
                              extensions={"http_version": b"HTTP/1.1"})

    # --- in the worker thread -------------------------------------------------------------------

    def _exchange(self, request: httpx.Request, context: ssl.SSLContext | None, limit: int,
                  exchange: _Exchange) -> tuple[int, list[tuple[str, str]], bytes]:
        try:
            return self._exchange_inner(request, context, limit, exchange)
        except _Aborted:
            self.counters["aborted"] += 1
            raise httpx.ReadError("the exchange was cancelled") from None
        except socket.timeout as e:
            if exchange.aborted:
                self.counters["aborted"] += 1
            raise httpx.ReadTimeout(f"timed out: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            if exchange.aborted:
                self.counters["aborted"] += 1
            raise httpx.ReadError(f"{type(e).__name__}: {e}") from None
        finally:
            self.counters["threads_done"] += 1

    def _exchange_inner(self, request: httpx.Request, context: ssl.SSLContext | None, limit: int,
                        exchange: _Exchange) -> tuple[int, list[tuple[str, str]], bytes]:
        url = request.url
        https = url.scheme == "https"
        port = url.port or (443 if https else 80)
        key = (url.scheme, url.host, port, id(context))
        timeouts = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read") or None
        connect_timeout = timeouts.get("connect") or read_timeout
        target = url.raw_path.decode("ascii")
        for reuse in (True, False):
            conn = self._take(key) if reuse else None
            reused = conn is not None
            if conn is None:
                if https:
                    conn = http.client.HTTPSConnection(url.host, port, timeout=connect_timeout,
                                                       context=context or ssl.create_default_context())
                else:
                    conn = http.client.HTTPConnection(url.host, port, timeout=connect_timeout)
            exchange.attach(conn)
            keep = False
            try:
                if conn.sock is None:
                    try:
                        conn.connect()
                    except OSError as e:  # refused, unreachable, a TLS handshake (certificates): as httpx says it
                        if exchange.aborted:
                            raise _Aborted() from None
                        raise httpx.ConnectError(f"{type(e).__name__}: {e}") from e
                    exchange.attach(conn)  # the socket exists now: an abort from here on shuts it down
                conn.sock.settimeout(read_timeout)
                try:
                    conn.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
                    for name, value in request.headers.multi_items():
                        conn.putheader(name, value)
                    conn.endheaders()
                    response = conn.getresponse()
                except _RETRYABLE:
                    if reused and not exchange.aborted:
                        continue  # a stale keep-alive connection: once more on a fresh one
                    raise
                if self.after_head is not None:
                    self.after_head()
                self.counters["reused"] += reused
                status = response.status
                cap = min(limit, 64 << 10) if status == 401 else limit
                declared = response.getheader("content-length")
                over = False
                if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                    body = b""
                elif declared is not None and declared.isdigit() and int(declared) <= cap:
                    body = response.read(int(declared))
                elif declared is not None and declared.isdigit() and status != 401:
                    body, over = b"", True  # too long: the caller refuses it by its Content-Length, unread
                else:
                    body = response.read(cap + 1)
                    if len(body) > cap:  # a 401's page is cut; a longer body goes up for the caller to refuse
                        body, over = body[:cap] if status == 401 else body, True
                headers = response.getheaders()
                keep = not over and not response.will_close and response.isclosed()
                exchange.detach()
                return status, headers, body
            finally:
                if keep and not exchange.aborted:
                    self._give(key, conn)
                else:
                    conn.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def _take(self, key: tuple) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def _give(self, key: tuple, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self._closed and len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self, *, final: bool = True) -> None:
        """Close the idle connections (those in use close when their exchange ends); *final*:
        pool none from now on."""
        with self._lock:
            self._closed = self._closed or final
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()

    def statistics(self) -> dict[str, int]:
        with self._lock:
            idle = sum(len(v) for v in self._idle.values())
        return {**self.counters, "idle": idle}
