"""FaultProxy against a real HTTP/1.1 server on 127.0.0.1 (stdlib http.server, in a thread)."""

from __future__ import annotations

import http.server
import random
import re
import socket
import threading
import time
from dataclasses import dataclass

import h11
import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.support.proxy import (
    INJECTED_BODY,
    BodyShaper,
    BodyStep,
    FaultKind,
    FaultProxy,
    FaultRule,
    Faults,
    forwarded_headers,
    parse_upstream,
)

DATA = random.Random(7).randbytes(1 << 20)


# -- the upstream -------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD /data/N (Content-Length, Range), GET /chunked/N (chunked), PUT/POST /echo."""

    protocol_version = "HTTP/1.1"
    server: _Upstream

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def finish(self):
        super().finish()
        with self.server.lock:
            self.server.closed += 1

    def _note(self):
        with self.server.lock:
            self.server.seen.append((self.command, self.path, self.headers.get("Range")))

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        self._note()
        kind, _, size = self.path.partition("?")[0].strip("/").partition("/")
        if not size.isdigit() or int(size) > len(DATA) or kind not in ("data", "chunked"):
            return self._reply(404, b"not found\n")
        body = DATA[: int(size)]
        if kind == "chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), 1000):
                piece = body[start : start + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return None
        status, extra = 200, []
        if (wanted := self.headers.get("Range")) is not None:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
            first = int(match.group(1)) if match else len(body)
            last = int(match.group(2)) if match and match.group(2) else len(body) - 1
            if first >= len(body) or last < first:
                return self._reply(416, b"bad range\n")
            last = min(last, len(body) - 1)
            extra = [("Content-Range", f"bytes {first}-{last}/{len(body)}")]
            status, body = 206, body[first : last + 1]
        self._reply(status, body, extra, head=head)
        return None

    def do_PUT(self):
        self._note()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            body = b"".join(parts)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._reply(201, body, [("X-Body-Length", str(len(body)))])

    do_POST = do_PUT

    def _reply(self, status, body, extra=(), head=False):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        if "close=1" in self.path:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, idle_timeout: float | None):
        handler = type("Handler", (_Handler,), {"timeout": idle_timeout})
        super().__init__(("127.0.0.1", 0), handler)
        self.lock = threading.Lock()
        self.connections = 0
        self.closed = 0
        self.seen: list[tuple[str, str, str | None]] = []
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def stop(self):
        self.shutdown()
        self.server_close()
        self.thread.join(10)


@pytest.fixture
def make_upstream():
    servers: list[_Upstream] = []

    def make(idle_timeout: float | None = None) -> _Upstream:
        servers.append(_Upstream(idle_timeout))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def upstream(make_upstream):
    return make_upstream()


@pytest.fixture
def proxy(upstream):
    with FaultProxy.running_in_thread(upstream.port, io_timeout=30) as running:
        yield running


@pytest.fixture
def client(proxy):
    with httpx.Client(base_url=proxy.url, timeout=30, trust_env=False) as http:
        yield http


# -- a raw client that sees exactly what is on the wire ------------------------------------------


@dataclass
class RawResponse:
    status: int | None
    headers: dict[bytes, bytes]
    body: bytes
    complete: bool
    wire: bytes


def raw_request(port, target, method="GET", headers=(), *, timeout=30.0, until_body=None):
    """One request on its own connection; reads until the response ends or the proxy closes.

    With *until_body*, returns as soon as that many body bytes have arrived."""
    conn = h11.Connection(h11.CLIENT)
    wire = bytearray()
    status, head, body = None, {}, bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(
            conn.send(
                h11.Request(
                    method=method,
                    target=target,
                    headers=[("Host", "test"), ("Connection", "close"), *headers],
                )
            )
        )
        sock.sendall(conn.send(h11.EndOfMessage()))
        for _ in range(100_000):
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                break  # the connection ended before the message did
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                wire += data
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status, head = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
                if until_body is not None and len(body) >= until_body:
                    return RawResponse(status, head, bytes(body), False, bytes(wire))
            elif isinstance(event, h11.EndOfMessage):
                return RawResponse(status, head, bytes(body), True, bytes(wire))
            else:
                break
    return RawResponse(status, head, bytes(body), False, bytes(wire))


# -- plain forwarding ---------------------------------------------------------------------------


def test_forwards_bodies_ranges_and_chunked_on_one_connection(proxy, client, upstream):
    full = client.get("/data/70000")
    assert full.status_code == 200 and full.content == DATA[:70000]

    part = client.get("/data/70000", headers={"Range": "bytes=1000-4999"})
    assert part.status_code == 206
    assert part.headers["content-range"] == "bytes 1000-4999/70000"
    assert part.content == DATA[1000:5000]

    chunked = client.get("/chunked/12345")
    assert chunked.headers["transfer-encoding"] == "chunked"
    assert chunked.content == DATA[:12345]

    head = client.head("/data/500")
    assert head.status_code == 200 and head.headers["content-length"] == "500"

    missing = client.get("/nothing/here")
    assert missing.status_code == 404

    # keep-alive on both sides: one client connection, one upstream connection
    assert proxy.statistics().connections == 1
    assert upstream.connections == 1
    assert [(r.method, r.target, r.range, r.status, r.body_bytes) for r in proxy.requests()] == [
        ("GET", "/data/70000", None, 200, 70000),
        ("GET", "/data/70000", "bytes=1000-4999", 206, 4000),
        ("GET", "/chunked/12345", None, 200, 12345),
        ("HEAD", "/data/500", None, 200, 0),
        ("GET", "/nothing/here", None, 404, len(b"not found\n")),
    ]
    assert all(record.fault is None for record in proxy.requests())


def test_forwards_request_bodies_of_both_framings(client, upstream):
    sized = client.put("/echo", content=DATA[:100000])
    assert sized.status_code == 201 and sized.content == DATA[:100000]

    chunked = client.post("/echo", content=iter([DATA[:3000], DATA[3000:9000]]))
    assert chunked.status_code == 201
    assert chunked.headers["x-body-length"] == "9000"
    assert chunked.content == DATA[:9000]
    assert [seen[0] for seen in upstream.seen] == ["PUT", "POST"]


def test_reconnects_when_the_upstream_closes(make_upstream):
    upstream = make_upstream(idle_timeout=0.2)
    with (
        FaultProxy.running_in_thread(upstream.port) as proxy,
        httpx.Client(base_url=proxy.url, timeout=30, trust_env=False) as client,
    ):
        # The upstream announces its close ...
        assert client.get("/data/10?close=1").content == DATA[:10]
        assert client.get("/data/20").content == DATA[:20]
        # ... or drops an idle connection silently (its handler times out).
        deadline = time.monotonic() + 4  # within httpx's keep-alive expiry
        while upstream.closed < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert upstream.closed == 2
        assert client.get("/data/30").content == DATA[:30]
        assert upstream.connections == 3
        assert proxy.statistics().connections == 1
        assert [record.status for record in proxy.requests()] == [200, 200, 200]


def test_unreachable_upstream_gives_502():
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    with FaultProxy.running_in_thread(port) as proxy:
        response = raw_request(proxy.port, "/data/1")
        assert response.status == 502 and response.complete
        assert proxy.requests()[0].status == 502


# -- faults -------------------------------------------------------------------------------------


def test_status_fault_obeys_path_method_and_count(proxy, client, upstream):
    rule = proxy.faults.fail(503, path="/data/", count=2)
    assert proxy.faults.active() == [(rule, 2)]

    assert client.get("/chunked/10").status_code == 200  # path does not match
    first = client.get("/data/10")
    assert first.status_code == 503 and first.content == INJECTED_BODY
    assert client.get("/data/10").status_code == 503
    assert proxy.faults.active() == []
    assert client.get("/data/10").status_code == 200
    # the failed requests never reached the upstream
    assert [seen[1] for seen in upstream.seen] == ["/chunked/10", "/data/10"]

    proxy.faults.fail(500, method="HEAD")
    assert client.head("/data/10").status_code == 500
    assert client.get("/data/10").status_code == 200
    assert client.head("/data/10").status_code == 500

    assert proxy.count("GET", "/data/") == 4
    assert proxy.count("HEAD") == 2
    assert [r.fault for r in proxy.requests(path="/data/")] == [
        FaultKind.STATUS,
        FaultKind.STATUS,
        None,
        FaultKind.STATUS,
        None,
        FaultKind.STATUS,
    ]
    assert proxy.statistics().faults_applied == 4
    assert proxy.statistics().connections == 1  # an injected error keeps the connection


def test_reset_closes_without_a_response(proxy, client):
    proxy.faults.reset(path="/data/1", count=1)
    with pytest.raises(ConnectionResetError):
        raw_request(proxy.port, "/data/100")
    record = proxy.requests()[-1]
    assert (record.status, record.body_bytes, record.fault) == (None, 0, FaultKind.RESET)
    assert client.get("/data/100").content == DATA[:100]


def test_truncate_cuts_a_sized_body(proxy, client):
    proxy.faults.truncate(after=1234, path="/data/")
    response = raw_request(proxy.port, "/data/10000")
    assert response.status == 200
    assert response.headers[b"content-length"] == b"10000"
    assert response.body == DATA[:1234]
    assert not response.complete
    assert proxy.requests()[-1].body_bytes == 1234

    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/data/10000")


def test_truncate_cuts_a_chunked_body_and_a_range(proxy):
    proxy.faults.truncate(after=1500, count=1)
    response = raw_request(proxy.port, "/chunked/5000")
    assert response.body == DATA[:1500] and not response.complete

    proxy.faults.truncate(after=0, count=1)
    cut = raw_request(proxy.port, "/data/5000", headers=[("Range", "bytes=100-199")])
    assert cut.status == 206 and cut.body == b"" and not cut.complete

    # a body shorter than the cut arrives whole, but the chunked message never ends
    proxy.faults.truncate(after=9999, count=1)
    short = raw_request(proxy.port, "/chunked/3000")
    assert short.body == DATA[:3000] and not short.complete
    assert raw_request(proxy.port, "/chunked/3000").complete


def _flipped_positions(got: bytes, want: bytes) -> list[int]:
    assert len(got) == len(want)
    return [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]


def test_corrupt_flips_one_byte_at_an_offset(proxy, client):
    proxy.faults.corrupt(offset=100, count=1)
    got = client.get("/data/5000").content
    assert _flipped_positions(got, DATA[:5000]) == [100]
    assert got[100] == DATA[100] ^ 0xFF
    assert proxy.requests()[-1].corrupted_offset == 100

    # the offset counts bytes of the ranged body, not of the blob
    proxy.faults.corrupt(offset=10, count=1)
    got = client.get("/data/5000", headers={"Range": "bytes=2000-2999"}).content
    assert _flipped_positions(got, DATA[2000:3000]) == [10]

    # past the end of the body nothing happens
    proxy.faults.corrupt(offset=5000, count=1)
    assert client.get("/data/5000").content == DATA[:5000]
    assert proxy.requests()[-1].corrupted_offset is None

    assert client.get("/data/5000").content == DATA[:5000]


@pytest.mark.parametrize("kind", ["data", "chunked"])
def test_corrupt_flips_one_random_byte(proxy, client, kind):
    proxy.faults.corrupt(count=3)
    for _ in range(3):
        got = client.get(f"/{kind}/65536").content
        flipped = _flipped_positions(got, DATA[:65536])
        assert len(flipped) == 1
        assert proxy.requests()[-1].corrupted_offset == flipped[0]
    assert client.get(f"/{kind}/65536").content == DATA[:65536]


def test_stall_for_seconds_then_answers(proxy, client):
    proxy.faults.stall(seconds=0.5, count=1)
    start = time.monotonic()
    assert client.get("/data/1000").content == DATA[:1000]
    assert time.monotonic() - start >= 0.5
    assert proxy.requests()[-1].fault is FaultKind.STALL


def test_stall_until_cleared(proxy, client):
    proxy.faults.stall(path="/data/")
    with pytest.raises(httpx.ReadTimeout):
        client.get("/data/1000", timeout=0.5)

    results = []

    def stalled_get():
        with httpx.Client(base_url=proxy.url, timeout=30, trust_env=False) as other:
            results.append(other.get("/data/2000"))

    thread = threading.Thread(target=stalled_get)
    thread.start()
    deadline = time.monotonic() + 30
    while proxy.count(path="/data/2000") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.requests(path="/data/2000")[0].status is None  # still held
    proxy.faults.clear()
    thread.join(30)
    assert [r.content for r in results] == [DATA[:2000]]
    assert client.get("/data/3000").content == DATA[:3000]


def test_stall_after_some_body_bytes(proxy):
    proxy.faults.stall(after=1000, count=1)
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(
            conn.send(h11.Request(method="GET", target="/data/5000", headers=[("Host", "t")]))
        )
        sock.sendall(conn.send(h11.EndOfMessage()))

        def receive_body(expected):
            body = b""
            while len(body) < expected:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Data):
                    body += event.data
            return body

        assert receive_body(1000) == DATA[:1000]
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # held after 1000 bytes
        sock.settimeout(30)
        proxy.faults.release_stalls()
        assert receive_body(4000) == DATA[1000:5000]
        assert isinstance(conn.next_event(), h11.EndOfMessage)


def test_latency_per_request(proxy, client):
    proxy.faults.latency = 0.2
    start = time.monotonic()
    for _ in range(3):
        assert client.get("/data/10").status_code == 200
    assert time.monotonic() - start >= 0.6
    proxy.faults.clear()
    assert proxy.faults.latency == 0


def test_bandwidth_is_shared(proxy, client):
    proxy.faults.bandwidth = 200_000
    start = time.monotonic()
    assert client.get("/data/100000").content == DATA[:100000]
    assert time.monotonic() - start >= 0.5


# -- counters -----------------------------------------------------------------------------------


def test_counters_match_the_wire(proxy, client):
    wires = [
        raw_request(proxy.port, "/data/3000"),
        raw_request(proxy.port, "/chunked/2500"),
        raw_request(proxy.port, "/data/3000", headers=[("Range", "bytes=0-99")]),
    ]
    stats = proxy.statistics()
    assert stats.connections == 3 and stats.requests == 3 and stats.faults_applied == 0
    assert stats.bytes_to_client == sum(len(w.wire) for w in wires)
    assert stats.body_bytes_to_client == 3000 + 2500 + 100
    assert [r.body_bytes for r in proxy.requests()] == [3000, 2500, 100]
    assert proxy.count("GET", r"^/data/") == 2
    assert proxy.count("PUT") == 0
    assert proxy.requests()[0].path == "/data/3000"

    proxy.reset_counters()
    assert proxy.statistics().requests == 0 and proxy.requests() == []
    client.get("/data/1?x=1")
    assert [(r.target, r.path) for r in proxy.requests()] == [("/data/1?x=1", "/data/1")]


# -- from trio ----------------------------------------------------------------------------------


def test_async_context_manager(upstream):
    async def main():
        faults = Faults(seed=1)
        async with (
            FaultProxy(f"127.0.0.1:{upstream.port}", faults=faults) as proxy,
            httpx.AsyncClient(base_url=proxy.url, trust_env=False) as client,
        ):
            faults.fail(502, count=1)
            assert (await client.get("/data/10")).status_code == 502
            assert (await client.get("/data/10")).content == DATA[:10]
            faults.stall(path="/data/")  # until cleared: released from a trio task
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_clear_when_held, proxy)
                with trio.fail_after(30):
                    assert (await client.get("/data/20")).content == DATA[:20]
        return proxy

    proxy = trio.run(main)
    assert proxy.count() == 3

    async def raises_inside():
        async with FaultProxy(upstream.port):
            raise KeyError("body error")

    with pytest.raises(KeyError):  # not wrapped in an exception group
        trio.run(raises_inside)


async def _clear_when_held(proxy):
    with trio.fail_after(30):
        while proxy.count(path="/data/20") == 0:
            await trio.sleep(0.01)
    proxy.faults.clear()


# -- sans-IO parts ------------------------------------------------------------------------------


def _run_shaper(rule, pieces, length):
    shaper = BodyShaper(rule, length, Faults(seed=3))
    steps = [step for piece in pieces for step in shaper.feed(piece)] + shaper.finish()
    return shaper, steps


def _split(body, cuts):
    bounds = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


bodies = st.binary(min_size=0, max_size=300)
cut_lists = st.lists(st.integers(0, 400), max_size=6)


@given(bodies, cut_lists, st.integers(0, 320))
def test_shaper_truncates(body, cuts, after):
    _, steps = _run_shaper(FaultRule(FaultKind.TRUNCATE, at=after), _split(body, cuts), len(body))
    assert steps[-1] is BodyStep.CUT and BodyStep.CUT not in steps[:-1]
    assert b"".join(steps[:-1]) == body[:after]


@given(bodies, cut_lists, st.integers(0, 320), st.booleans())
def test_shaper_corrupts_one_byte(body, cuts, offset, random_offset):
    rule = FaultRule(FaultKind.CORRUPT, at=None if random_offset else offset)
    for length in (len(body), None):
        shaper, steps = _run_shaper(rule, _split(body, cuts), length)
        got = b"".join(steps)
        flipped = _flipped_positions(got, body)
        assert flipped == ([] if shaper.corrupted_at is None else [shaper.corrupted_at])
        if body and (random_offset or offset < len(body)):
            assert len(flipped) == 1 and got[flipped[0]] == body[flipped[0]] ^ 0xFF
        if not random_offset:
            assert shaper.corrupted_at == (offset if offset < len(body) else None)


@given(bodies, cut_lists, st.integers(0, 320))
def test_shaper_stalls_once(body, cuts, after):
    _, steps = _run_shaper(FaultRule(FaultKind.STALL, at=after), _split(body, cuts), len(body))
    assert steps.count(BodyStep.STALL) == 1
    stall = steps.index(BodyStep.STALL)
    assert b"".join(steps[:stall]) == body[:after]
    assert b"".join(steps[stall + 1 :]) == body[after:]


def test_rule_matching_and_budgets():
    faults = Faults()
    blobs = faults.fail(500, path="/blobs/", method="get", count=2)
    anything = faults.reset()
    assert faults.take("GET", "/v2/x/manifests/latest") is anything
    assert faults.take("HEAD", "/v2/x/blobs/sha256:ab") is anything
    assert faults.take("get", "/v2/x/blobs/sha256:ab") is blobs
    assert faults.take("GET", "/v2/x/blobs/sha256:ab?x=1") is blobs
    assert faults.take("GET", "/v2/x/blobs/sha256:ab") is anything
    faults.remove(anything)
    assert faults.take("GET", "/") is None
    assert faults.active() == []


def test_values_are_checked():
    with pytest.raises(ValueError):
        parse_upstream("10.0.0.1:80")
    with pytest.raises(ValueError):
        parse_upstream(("example.com", 80))
    assert parse_upstream("[::1]:5000") == ("::1", 5000)
    assert parse_upstream(5000) == ("127.0.0.1", 5000)
    with pytest.raises(ValueError):
        Faults().fail(200)
    with pytest.raises(ValueError):
        Faults().truncate(-1)
    with pytest.raises(ValueError):
        Faults().reset(count=0)
    with pytest.raises(ValueError):
        Faults().latency = -1


def test_hop_by_hop_headers_are_dropped():
    headers = [
        (b"Host", b"x"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Expect", b"100-continue"),
        (b"Docker-Content-Digest", b"sha256:00"),
    ]
    assert forwarded_headers(headers) == [
        (b"Host", b"x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Docker-Content-Digest", b"sha256:00"),
    ]
