"""A fault-injecting HTTP/1.1 reverse proxy, for testing and benchmarking remote reads.

`FaultProxy` listens on 127.0.0.1 (a free port) and forwards every request to one upstream on
the loopback interface (a docker-registry, say), so that a client pointed at ``proxy.url`` sees
the upstream's answers, except where `Faults` say otherwise:

* ``faults.fail(503)``: answer with an error status, never asking the upstream;
* ``faults.reset()``: reset the connection (TCP RST) instead of answering;
* ``faults.truncate(after=N)``: cut the response body after N bytes and close the connection;
* ``faults.corrupt(offset=N)``: flip one byte of the response body (at N, or a random one);
* ``faults.stall(seconds=S, after=N)``: hold the response for S seconds (None: until
  `Faults.clear` or `Faults.release_stalls`), before its head or after N body bytes;
* ``faults.forge(content, path=...)``: answer GET and HEAD with *content* as if it were the
  blob (ranges sliced from it, 206 with Content-Range), never asking the upstream: a mirror
  that serves forged but self-consistent bytes;
* ``faults.latency = L``: wait L seconds before forwarding each request (one round trip,
  since there is no tc netem here); ``faults.bandwidth = B``: share B bytes/s between all
  responses.

Each rule can be limited to requests whose target matches a regex (``re.search``, on the path
and query), to one method, and to a number of requests (``count=2``: the next two that match).
The first rule that matches a request is the one applied, and a request gets at most one rule.

The proxy records every request (method, target, Range, status, body bytes sent) before it
sends the bytes concerned, so a client that has seen a response can rely on the counters.
Offsets of truncation and corruption count body bytes of that response (after any Range).

Use it from trio (``async with FaultProxy(port) as proxy:``) or from synchronous code, where it
runs in a thread of its own (``with FaultProxy.running_in_thread(port) as proxy:``). `Faults` is
thread-safe, so a test may change the faults while requests are in flight.

HTTP parsing is h11's (sans-IO); how a fault reshapes a body is decided by `BodyShaper`, which
does no I/O either. Request bodies are read whole before they are forwarded (this is a test
proxy: it keeps them replayable), up to ``max_request_body`` bytes.
"""

from __future__ import annotations

import contextlib
import enum
import math
import queue
import random
import re
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

import h11
import trio

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
RECEIVE_SIZE = 64 * 1024
INJECTED_BODY = b"lazyfs fault proxy: injected fault\n"

# Headers that describe one hop, not the message (RFC 9110 section 7.6.1). Framing headers
# (Content-Length, Transfer-Encoding) are kept: h11 frames the forwarded message by them.
# Expect is dropped because the proxy answers 100-continue itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
    }
)


class FaultKind(enum.Enum):
    """What a `FaultRule` does to a request it matches."""

    STATUS = "status"
    RESET = "reset"
    TRUNCATE = "truncate"
    CORRUPT = "corrupt"
    STALL = "stall"
    FORGE = "forge"


@dataclass(frozen=True, slots=True, eq=False)
class FaultRule:
    """One fault and the requests it applies to.

    ``at`` depends on ``kind``: TRUNCATE, body bytes sent before the cut; CORRUPT, the body
    offset of the flipped byte (None: a random one); STALL, body bytes sent before the stall
    (None: stall before the response head). ``seconds`` is how long a STALL lasts (None: until
    released). ``count`` is how many requests the rule applies to (None: all).
    Rules compare by identity, so two equal-looking rules stay distinct.
    """

    kind: FaultKind
    path: re.Pattern[str] | None = None
    method: str | None = None
    count: int | None = None
    status: int = 503
    at: int | None = None
    seconds: float | None = None
    content: bytes | None = None  # FORGE: what to serve instead of the upstream's blob

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise ValueError(f"fault count must be at least 1, got {self.count}")
        if not 400 <= self.status <= 599:
            raise ValueError(f"fault status must be 4xx or 5xx, got {self.status}")
        if self.at is not None and self.at < 0:
            raise ValueError(f"fault offset must not be negative, got {self.at}")
        if self.kind is FaultKind.TRUNCATE and self.at is None:
            raise ValueError("a truncation needs the number of body bytes to keep")
        if self.seconds is not None and not self.seconds >= 0:
            raise ValueError(f"stall seconds must be >= 0, got {self.seconds}")
        if (self.kind is FaultKind.FORGE) != (self.content is not None):
            raise ValueError("a forgery, and only a forgery, needs the content to serve")

    def matches(self, method: str, target: str) -> bool:
        """Whether a request with *method* and *target* (path and query) is one of ours."""
        if self.method is not None and self.method != method.upper():
            return False
        return self.path is None or self.path.search(target) is not None


def _pattern(path: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    return re.compile(path) if isinstance(path, str) else path


class Faults:
    """The faults a `FaultProxy` injects. Thread-safe; changes apply to the next request.

    A `Faults` may be made before the proxy and shared by several proxies.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._rules: list[list] = []  # [rule, remaining count or None], oldest first
        self._latency = 0.0
        self._bandwidth: float | None = None
        self._release_epoch = 0
        self._rng = random.Random(seed)
        self._listeners: list[Callable[[], None]] = []

    # -- rules ------------------------------------------------------------------------------

    def add(self, rule: FaultRule) -> FaultRule:
        """Append *rule* (it applies after the rules already there) and return it."""
        with self._lock:
            self._rules.append([rule, rule.count])
        self._changed()
        return rule

    def fail(
        self,
        status: int = 503,
        *,
        path: str | re.Pattern[str] | None = None,
        method: str | None = None,
        count: int | None = None,
    ) -> FaultRule:
        """Answer matching requests with *status* instead of forwarding them."""
        return self.add(FaultRule(FaultKind.STATUS, _pattern(path), _method(method), count, status))

    def reset(
        self,
        *,
        path: str | re.Pattern[str] | None = None,
        method: str | None = None,
        count: int | None = None,
    ) -> FaultRule:
        """Reset the connection (RST) when a matching request arrives, without answering."""
        return self.add(FaultRule(FaultKind.RESET, _pattern(path), _method(method), count))

    def truncate(
        self,
        after: int,
        *,
        path: str | re.Pattern[str] | None = None,
        method: str | None = None,
        count: int | None = None,
    ) -> FaultRule:
        """Send the first *after* body bytes of matching responses, then close the connection.

        The head is the upstream's (so the client expects the whole body). A body no longer
        than *after* is sent whole, and the connection is still closed before the message
        ends (a chunked body then lacks its last chunk).
        """
        return self.add(
            FaultRule(FaultKind.TRUNCATE, _pattern(path), _method(method), count, at=after)
        )

    def corrupt(
        self,
        offset: int | None = None,
        *,
        path: str | re.Pattern[str] | None = None,
        method: str | None = None,
        count: int | None = None,
    ) -> FaultRule:
        """Flip (xor 0xff) the body byte at *offset* of matching responses (None: a random
        byte). A body too short to have that byte goes through unchanged."""
        return self.add(
            FaultRule(FaultKind.CORRUPT, _pattern(path), _method(method), count, at=offset)
        )

    def stall(
        self,
        seconds: float | None = None,
        *,
        after: int | None = None,
        path: str | re.Pattern[str] | None = None,
        method: str | None = None,
        count: int | None = None,
    ) -> FaultRule:
        """Hold matching responses for *seconds* (None: until `clear` or `release_stalls`),
        before the head (*after* None) or after *after* body bytes; then go on normally."""
        return self.add(
            FaultRule(
                FaultKind.STALL,
                _pattern(path),
                _method(method),
                count,
                at=after,
                seconds=seconds,
            )
        )

    def forge(
        self,
        content: bytes,
        *,
        path: str | re.Pattern[str] | None = None,
        count: int | None = None,
    ) -> FaultRule:
        """Answer matching GET and HEAD requests with *content* (a whole forged blob): a Range
        gets its slice (206), no Range the whole (200). The upstream is never asked."""
        return self.add(FaultRule(FaultKind.FORGE, _pattern(path), None, count, content=bytes(content)))

    def remove(self, rule: FaultRule) -> None:
        """Drop *rule* if it is still active."""
        with self._lock:
            self._rules = [entry for entry in self._rules if entry[0] is not rule]
        self._changed()

    def clear(self) -> None:
        """Drop every rule, latency and bandwidth limit, and release stalled responses."""
        with self._lock:
            self._rules.clear()
            self._latency = 0.0
            self._bandwidth = None
            self._release_epoch += 1
        self._changed()

    def release_stalls(self) -> None:
        """Let every response stalled so far go on (rules stay; later requests may stall)."""
        with self._lock:
            self._release_epoch += 1
        self._changed()

    def active(self) -> list[tuple[FaultRule, int | None]]:
        """The active rules in order, each with its remaining count (None: unlimited)."""
        with self._lock:
            return [(rule, remaining) for rule, remaining in self._rules]

    def take(self, method: str, target: str) -> FaultRule | None:
        """The rule to apply to one request, counting it against the rule's budget."""
        with self._lock:
            for index, entry in enumerate(self._rules):
                rule, remaining = entry
                if not rule.matches(method, target):
                    continue
                if remaining is not None:
                    if remaining <= 1:
                        del self._rules[index]
                    else:
                        entry[1] = remaining - 1
                return rule
        return None

    # -- link emulation ---------------------------------------------------------------------

    @property
    def latency(self) -> float:
        """Seconds added before forwarding each request (emulates one round trip)."""
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"latency must be >= 0, got {seconds}")
        with self._lock:
            self._latency = float(seconds)

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second shared by all responses of a proxy (None: unlimited)."""
        with self._lock:
            return self._bandwidth

    @bandwidth.setter
    def bandwidth(self, bytes_per_second: float | None) -> None:
        if bytes_per_second is not None and not bytes_per_second > 0:
            raise ValueError(f"bandwidth must be positive, got {bytes_per_second}")
        with self._lock:
            self._bandwidth = None if bytes_per_second is None else float(bytes_per_second)

    # -- for the proxy ----------------------------------------------------------------------

    @property
    def release_epoch(self) -> int:
        """Increases whenever stalled responses are released."""
        with self._lock:
            return self._release_epoch

    def random_offset(self, length: int) -> int:
        """A random offset in ``range(length)`` from this object's (seedable) generator."""
        with self._lock:
            return self._rng.randrange(length)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call *listener* (from whichever thread made the change) after every change."""
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners = [other for other in self._listeners if other is not listener]

    def _changed(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()


def _method(method: str | None) -> str | None:
    return None if method is None else method.upper()


# -- sans-IO body shaping ---------------------------------------------------------------------


class BodyStep(enum.Enum):
    """Non-data steps `BodyShaper` asks of the I/O shell."""

    STALL = "stall"  # hold the response as the rule says, then go on
    CUT = "cut"  # close the connection now, without ending the message


class BodyShaper:
    """Applies one TRUNCATE, CORRUPT or STALL rule to a response body; no I/O.

    Feed the body in pieces with `feed` and call `finish` at its end; each returns the steps
    to carry out in order: bytes to send, `BodyStep.STALL` or `BodyStep.CUT` (after which
    nothing else is returned). *length* is the body length if known (Content-Length); a random
    corruption of a body of unknown length holds the body back until `finish`.
    """

    def __init__(self, rule: FaultRule, length: int | None, faults: Faults) -> None:
        if rule.kind not in (FaultKind.TRUNCATE, FaultKind.CORRUPT, FaultKind.STALL):
            raise ValueError(f"{rule.kind} does not reshape a body")
        self.kind = rule.kind
        self.at = rule.at
        self.position = 0
        self.done = False
        self.corrupted_at: int | None = None
        self._faults = faults
        self._held: bytearray | None = None
        if self.kind is FaultKind.CORRUPT and self.at is None:
            if length is None:
                self._held = bytearray()
            elif length > 0:
                self.at = faults.random_offset(length)

    def feed(self, data: bytes) -> list[bytes | BodyStep]:
        """Steps for the next *data* of the body."""
        if self.done or not data:
            return []
        if self._held is not None:
            self._held += data
            return []
        start, end = self.position, self.position + len(data)
        self.position = end
        at = self.at
        if at is None or not start <= at < end:
            return [data]
        split = at - start
        if self.kind is FaultKind.CORRUPT:
            flipped = bytearray(data)
            flipped[split] ^= 0xFF
            self.corrupted_at = at
            return [bytes(flipped)]
        if self.kind is FaultKind.TRUNCATE:
            self.done = True
            return [data[:split], BodyStep.CUT] if split else [BodyStep.CUT]
        self.at = None  # stall once
        head, tail = data[:split], data[split:]
        return [step for step in (head, BodyStep.STALL, tail) if step]

    def finish(self) -> list[bytes | BodyStep]:
        """Steps at the end of the body (before the message is ended)."""
        if self.done:
            return []
        self.done = True
        if self._held is not None:
            held, self._held = self._held, None
            if held:
                offset = self._faults.random_offset(len(held))
                held[offset] ^= 0xFF
                self.corrupted_at = self.position + offset
                self.position += len(held)
            return [bytes(held)] if held else []
        if self.kind is FaultKind.TRUNCATE:
            return [BodyStep.CUT]
        if self.kind is FaultKind.STALL and self.at is not None:
            return [BodyStep.STALL]  # the body was shorter than `after`
        return []


def forwarded_headers(headers) -> list[tuple[bytes, bytes]]:
    """*headers* (h11's, or name-value pairs) without hop-by-hop ones, original spelling kept."""
    items = headers.raw_items() if hasattr(headers, "raw_items") else list(headers)
    named = {bytes(name).lower() for name, _ in items}
    hop = set(_HOP_BY_HOP)
    for name, value in items:
        if bytes(name).lower() == b"connection":  # Connection names more hop-by-hop headers
            hop.update(token.strip().lower() for token in bytes(value).split(b","))
    hop -= {b"content-length", b"transfer-encoding"} & named
    return [(bytes(name), bytes(value)) for name, value in items if bytes(name).lower() not in hop]


def parse_upstream(upstream: int | str | tuple[str, int]) -> tuple[str, int]:
    """``(host, port)`` from a port, ``"host:port"`` or a pair; the host must be loopback."""
    if isinstance(upstream, int):
        host, port = "127.0.0.1", upstream
    elif isinstance(upstream, str):
        host, sep, port_text = upstream.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"upstream must be host:port, got {upstream!r}")
        host, port = host.strip("[]"), int(port_text)
    else:
        host, port = upstream
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the fault proxy only forwards to loopback, not {host!r}")
    if not 0 < port < 65536:
        raise ValueError(f"bad upstream port {port}")
    return host, port


# -- records ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the proxy handled it.

    ``status`` is the status sent to the client (None: none was sent, e.g. a reset);
    ``body_bytes`` counts response body bytes handed to the client's socket;
    ``authorization`` says whether the request carried an Authorization header.
    """

    method: str
    target: str
    range: str | None
    status: int | None
    body_bytes: int
    fault: FaultKind | None
    corrupted_offset: int | None
    authorization: bool = False

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.partition("?")[0]


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """Counts since start or `FaultProxy.reset_counters`."""

    connections: int
    requests: int
    faults_applied: int
    bytes_to_client: int
    body_bytes_to_client: int


class _Exchange:
    """The mutable record of a request in flight (snapshotted as a `RequestRecord`)."""

    __slots__ = ("method", "target", "range", "status", "body_bytes", "fault", "corrupted_offset", "authorization")

    def __init__(self, method: str, target: str, range_: str | None, authorization: bool = False) -> None:
        self.method, self.target, self.range = method, target, range_
        self.authorization = authorization
        self.status: int | None = None
        self.body_bytes = 0
        self.fault: FaultKind | None = None
        self.corrupted_offset: int | None = None

    def snapshot(self) -> RequestRecord:
        return RequestRecord(
            self.method,
            self.target,
            self.range,
            self.status,
            self.body_bytes,
            self.fault,
            self.corrupted_offset,
            self.authorization,
        )


# -- I/O shell ----------------------------------------------------------------------------------


class _UpstreamError(Exception):
    """The upstream could not be reached or gave no response head."""


class _Cut(Exception):
    """The exchange ended the connection on purpose."""


_CONNECTION_ERRORS = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    h11.ProtocolError,
    OSError,
    _Cut,
)


class _Peer:
    """A socket stream with the h11 connection that parses it."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, timeout: float) -> None:
        self.stream, self.conn, self.timeout = stream, conn, timeout

    async def next_event(self, timeout: float | None = None) -> object:
        # Bounded: every pass either returns an event or waits at most `timeout` for bytes.
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.fail_after(self.timeout if timeout is None else timeout):
                data = await self.stream.receive_some(RECEIVE_SIZE)
            self.conn.receive_data(data)  # b"" is end of file

    async def send(self, event: object) -> None:
        data = self.conn.send(event)
        if data:
            with trio.fail_after(self.timeout):
                await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()

    def looks_closed(self) -> bool:
        """Whether an idle kept-alive connection has been closed (or sent junk) meanwhile."""
        poller = select.poll()
        poller.register(self.stream.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))


class _UpstreamLink:
    """The upstream connection of one client connection, reused while both keep it alive."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.peer: _Peer | None = None

    async def request(self, method: bytes, target: bytes, headers, body: bytes) -> h11.Response:
        """Send one request and return the response head; retries once on a fresh connection
        when a reused one turns out dead before any response."""
        for attempt in range(2):
            if self.peer is not None and (
                self.peer.conn.our_state is not h11.IDLE or self.peer.looks_closed()
            ):
                await self.aclose()
            fresh = self.peer is None
            try:
                if self.peer is None:
                    with trio.fail_after(self.timeout):
                        stream = await trio.open_tcp_stream(self.host, self.port)
                    self.peer = _Peer(stream, h11.Connection(h11.CLIENT), self.timeout)
                await self.peer.send(h11.Request(method=method, target=target, headers=headers))
                if body:
                    await self.peer.send(h11.Data(data=body))
                await self.peer.send(h11.EndOfMessage())
                while True:  # bounded: 1xx heads are few, each read is timed
                    event = await self.peer.next_event()
                    if isinstance(event, h11.Response):
                        return event
                    if not isinstance(event, h11.InformationalResponse):
                        raise _UpstreamError(f"upstream sent {type(event).__name__} for a head")
            except (*_CONNECTION_ERRORS, _UpstreamError) as exc:
                await self.aclose()
                if fresh or attempt:
                    raise _UpstreamError(f"upstream {self.host}:{self.port}: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def next_event(self) -> object:
        assert self.peer is not None
        return await self.peer.next_event()

    async def end_exchange(self) -> None:
        """Keep the connection for the next request if both sides allow it."""
        if self.peer is None:
            return
        conn = self.peer.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()

    async def aclose(self) -> None:
        if self.peer is not None:
            peer, self.peer = self.peer, None
            await peer.aclose()


class FaultProxy:
    """A reverse proxy from ``127.0.0.1:port`` to *upstream* that injects `faults`.

    *upstream* is a port on 127.0.0.1, ``"host:port"`` or ``(host, port)`` (loopback only).
    *io_timeout* bounds each wait for the peers while a request is handled, *idle_timeout*
    the wait for the next request on a kept-alive connection.
    """

    def __init__(
        self,
        upstream: int | str | tuple[str, int],
        *,
        faults: Faults | None = None,
        io_timeout: float = 60.0,
        idle_timeout: float = 120.0,
        max_request_body: int = 1 << 30,
        max_records: int = 100_000,
    ) -> None:
        self.upstream = parse_upstream(upstream)
        self.faults = faults if faults is not None else Faults()
        self.io_timeout = io_timeout
        self.idle_timeout = idle_timeout
        self.max_request_body = max_request_body
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._lock = threading.Lock()
        self._records: deque[_Exchange] = deque(maxlen=max_records)
        self._connections = 0
        self._requests = 0
        self._faults_applied = 0
        self._bytes_to_client = 0
        self._body_bytes_to_client = 0
        self._link_free_at = 0.0
        self._changed: trio.Event | None = None
        self._nursery_manager = None
        self._cancel_scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` once the proxy listens."""
        if self.port is None:
            raise RuntimeError("the proxy is not running")
        return f"http://{self.host}:{self.port}"

    # -- counters ----------------------------------------------------------------------------

    def statistics(self) -> ProxyStatistics:
        with self._lock:
            return ProxyStatistics(
                connections=self._connections,
                requests=self._requests,
                faults_applied=self._faults_applied,
                bytes_to_client=self._bytes_to_client,
                body_bytes_to_client=self._body_bytes_to_client,
            )

    def requests(
        self, method: str | None = None, path: str | re.Pattern[str] | None = None
    ) -> list[RequestRecord]:
        """Records of the requests so far (the last *max_records*), oldest first, optionally
        only those with *method* and a target matching *path* (``re.search``)."""
        pattern = _pattern(path)
        with self._lock:
            records = [exchange.snapshot() for exchange in self._records]
        return [
            record
            for record in records
            if (method is None or record.method == method.upper())
            and (pattern is None or pattern.search(record.target))
        ]

    def count(self, method: str | None = None, path: str | re.Pattern[str] | None = None) -> int:
        """How many recorded requests have *method* and match *path*."""
        return len(self.requests(method, path))

    def reset_counters(self) -> None:
        with self._lock:
            self._records.clear()
            self._connections = self._requests = self._faults_applied = 0
            self._bytes_to_client = self._body_bytes_to_client = 0

    # -- running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status.started(self)`` once listening."""
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        self._changed = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def on_faults_changed() -> None:
            # Called from any thread; wake the stalls in this proxy's trio thread.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._wake_stalls)

        self.faults.subscribe(on_faults_changed)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                await trio.serve_listeners(self._serve_client, listeners, handler_nursery=nursery)
        finally:
            self.faults.unsubscribe(on_faults_changed)
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def __aenter__(self) -> FaultProxy:
        manager = trio.open_nursery()
        nursery = await manager.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException:
            nursery.cancel_scope.cancel()
            await manager.__aexit__(None, None, None)
            raise
        self._nursery_manager, self._cancel_scope = manager, nursery.cancel_scope
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        # The body's exception is not handed to the nursery, so it propagates as it is rather
        # than wrapped in an exception group; a crash of the proxy itself still surfaces.
        manager, self._nursery_manager = self._nursery_manager, None
        assert manager is not None and self._cancel_scope is not None
        self._cancel_scope.cancel()
        await manager.__aexit__(None, None, None)
        return False

    @classmethod
    @contextlib.contextmanager
    def running_in_thread(
        cls,
        upstream: int | str | tuple[str, int],
        *,
        start_timeout: float = 30.0,
        **options,
    ) -> Iterator[FaultProxy]:
        """Run a proxy in a thread of its own for synchronous code; stop it on exit.

        A crash of the proxy is raised on exit."""
        proxy = cls(upstream, **options)
        ready: queue.Queue = queue.Queue()
        failures: list[BaseException] = []

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.run)
                ready.put((trio.lowlevel.current_trio_token(), nursery.cancel_scope))

        def thread_main() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                failures.append(exc)
                ready.put(exc)

        thread = threading.Thread(target=thread_main, name="lazyfs-fault-proxy", daemon=True)
        thread.start()
        try:
            started = ready.get(timeout=start_timeout)
        except queue.Empty:
            raise RuntimeError(f"fault proxy did not start within {start_timeout}s") from None
        if isinstance(started, BaseException):
            thread.join(start_timeout)
            raise RuntimeError("fault proxy failed to start") from started
        token, cancel_scope = started
        try:
            yield proxy
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(cancel_scope.cancel)
            thread.join(start_timeout)
            if thread.is_alive():
                raise RuntimeError("fault proxy thread did not stop")
            if failures:
                raise RuntimeError("fault proxy crashed") from failures[0]

    # -- serving -----------------------------------------------------------------------------

    def _wake_stalls(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = trio.Event()

    async def _stall(self, rule: FaultRule) -> None:
        epoch = self.faults.release_epoch
        with trio.move_on_after(math.inf if rule.seconds is None else rule.seconds):
            # Bounded by the rule's seconds, a release, or the proxy's shutdown.
            while self.faults.release_epoch == epoch:
                assert self._changed is not None
                await self._changed.wait()

    async def _to_client(self, client: _Peer, event: object, exchange: _Exchange) -> None:
        """Send *event*, counting its bytes first, at the emulated bandwidth."""
        data = client.conn.send(event)
        if not data:
            return
        body = len(event.data) if isinstance(event, h11.Data) else 0
        with self._lock:
            self._bytes_to_client += len(data)
            self._body_bytes_to_client += body
            exchange.body_bytes += body
        rate = self.faults.bandwidth
        if rate is not None:
            # One link shared by every connection: each send books the next free slot.
            start = max(trio.current_time(), self._link_free_at)
            self._link_free_at = start + len(data) / rate
            await trio.sleep_until(self._link_free_at)
        with trio.fail_after(self.io_timeout):
            await client.stream.send_all(data)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        with self._lock:
            self._connections += 1
        client = _Peer(stream, h11.Connection(h11.SERVER), self.io_timeout)
        upstream = _UpstreamLink(*self.upstream, self.io_timeout)
        try:
            # Bounded: each exchange waits at most idle_timeout for its request.
            while await self._exchange(client, upstream):
                pass
        except _CONNECTION_ERRORS:
            pass  # the connection is gone or was cut on purpose; the client sees that
        finally:
            with trio.CancelScope(shield=True):
                await upstream.aclose()
                await client.aclose()

    async def _exchange(self, client: _Peer, upstream: _UpstreamLink) -> bool:
        """Handle one request; whether the client connection can take another."""
        request = await client.next_event(self.idle_timeout)
        if not isinstance(request, h11.Request):
            return False  # closed, or pipelining (which we do not do)
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        range_ = next((v.decode("latin-1") for k, v in request.headers if k == b"range"), None)
        exchange = _Exchange(method, target, range_, any(k == b"authorization" for k, _ in request.headers))
        rule = self.faults.take(method, target)
        exchange.fault = rule.kind if rule else None
        with self._lock:
            self._records.append(exchange)
            self._requests += 1
            self._faults_applied += rule is not None

        latency = self.faults.latency
        if latency:
            await trio.sleep(latency)
        if rule is not None and rule.kind is FaultKind.RESET:
            # SO_LINGER 0: close() sends RST, so the client sees a reset, not a clean EOF.
            client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise _Cut

        if client.conn.they_are_waiting_for_100_continue:
            await client.send(h11.InformationalResponse(status_code=100, headers=[]))
        body = await self._request_body(client)
        if body is None:
            await self._answer(client, request, exchange, 413, b"request body too large\n")
            return False
        if rule is not None and rule.kind is FaultKind.STATUS:
            await self._answer(client, request, exchange, rule.status, INJECTED_BODY)
            return _next_cycle(client.conn)
        if rule is not None and rule.kind is FaultKind.FORGE:
            await self._forged(client, request, exchange, rule.content, range_)
            return _next_cycle(client.conn)
        if rule is not None and rule.kind is FaultKind.STALL and rule.at is None:
            await self._stall(rule)

        headers = forwarded_headers(request.headers)
        if not any(name.lower() == b"host" for name, _ in headers):
            headers.append((b"Host", f"{self.upstream[0]}:{self.upstream[1]}".encode()))
        try:
            response = await upstream.request(request.method, request.target, headers, body)
        except _UpstreamError as exc:
            await self._answer(client, request, exchange, 502, f"{exc}\n".encode())
            return _next_cycle(client.conn)

        shaper = None
        if rule is not None and rule.kind is not FaultKind.STATUS:
            shaper = BodyShaper(rule, _body_length(request.method, response), self.faults)
        exchange.status = response.status_code
        await self._to_client(
            client,
            h11.Response(
                status_code=response.status_code,
                headers=forwarded_headers(response.headers),
                reason=response.reason,
            ),
            exchange,
        )
        while True:  # bounded: ends at the end of the body; each read is timed
            event = await upstream.next_event()
            if isinstance(event, h11.Data):
                steps = shaper.feed(event.data) if shaper else [event.data]
            elif isinstance(event, h11.EndOfMessage):
                steps = shaper.finish() if shaper else []
            else:
                raise _Cut  # the upstream broke off mid-body: so do we
            if shaper is not None and shaper.corrupted_at is not None:
                exchange.corrupted_offset = shaper.corrupted_at  # recorded before it is sent
            for step in steps:
                if step is BodyStep.CUT:
                    raise _Cut
                if step is BodyStep.STALL:
                    await self._stall(rule)
                else:
                    await self._to_client(client, h11.Data(data=step), exchange)
            if isinstance(event, h11.EndOfMessage):
                break
        await self._to_client(client, h11.EndOfMessage(), exchange)
        await upstream.end_exchange()
        return _next_cycle(client.conn)

    async def _request_body(self, client: _Peer) -> bytes | None:
        """The whole request body, or None past max_request_body."""
        parts: list[bytes] = []
        size = 0
        while True:  # bounded: ends at the end of the body or the size cap; each read is timed
            event = await client.next_event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            if not isinstance(event, h11.Data):
                raise _Cut
            size += len(event.data)
            if size > self.max_request_body:
                return None
            parts.append(bytes(event.data))

    async def _forged(self, client: _Peer, request: h11.Request, exchange: _Exchange, content: bytes,
                      range_: str | None) -> None:
        """Serve *content* as the blob this request asks for."""
        status, headers, body = forged_answer(content, range_)
        exchange.status = status
        await self._to_client(client, h11.Response(status_code=status, headers=headers), exchange)
        if request.method != b"HEAD" and body:
            await self._to_client(client, h11.Data(data=body), exchange)
        await self._to_client(client, h11.EndOfMessage(), exchange)

    async def _answer(
        self, client: _Peer, request: h11.Request, exchange: _Exchange, status: int, body: bytes
    ) -> None:
        """A response made by the proxy itself."""
        exchange.status = status
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
        ]
        await self._to_client(client, h11.Response(status_code=status, headers=headers), exchange)
        if request.method != b"HEAD":
            await self._to_client(client, h11.Data(data=body), exchange)
        await self._to_client(client, h11.EndOfMessage(), exchange)


def forged_answer(content: bytes, range_: str | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``(status, headers, body)`` serving *content* for a request with Range header *range_*."""
    headers = [(b"Content-Type", b"application/octet-stream"), (b"Accept-Ranges", b"bytes")]
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", range_.strip()) if range_ else None
    if range_ and m is None:
        return 416, headers + [(b"Content-Length", b"0")], b""
    if m is None:
        return 200, headers + [(b"Content-Length", str(len(content)).encode())], content
    first = int(m.group(1))
    last = min(int(m.group(2)) if m.group(2) else len(content) - 1, len(content) - 1)
    if first > last:
        return 416, headers + [(b"Content-Range", f"bytes */{len(content)}".encode()), (b"Content-Length", b"0")], b""
    body = content[first : last + 1]
    return 206, headers + [(b"Content-Range", f"bytes {first}-{last}/{len(content)}".encode()),
                           (b"Content-Length", str(len(body)).encode())], body


def _body_length(method: bytes, response: h11.Response) -> int | None:
    """The response body length if the head tells it (None: unknown, or no body)."""
    if method == b"HEAD" or response.status_code in (204, 304):
        return 0
    for name, value in response.headers:
        if name == b"content-length":
            return int(value)
    return None


def _next_cycle(conn: h11.Connection) -> bool:
    """Prepare *conn* for the next request if both sides keep it alive."""
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        return True
    return False
