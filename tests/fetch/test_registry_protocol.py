"""The registry protocol without a registry: the auth flow, the source picker, the retry layer,
the host table and the bounds on every map the client keeps.

The auth flow runs on an ``httpx.MockTransport`` (httpx's in-memory transport) scripted as a
registry and its token server; the picker and the retry layer are driven by hand and by
trio's MockClock. The end-to-end cases against Debian's docker-registry are in test_registry.py.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from dataclasses import dataclass, field

import httpx
import pytest
import trio
import trio.testing

from lazyfs.errors import AuthError, ConfigError, FetchError, NotFoundError
from lazyfs.fetch.credentials import Credential, Credentials
from lazyfs.fetch.registry import HealthPolicy, RegistryConfig, RetryPolicy
from lazyfs.fetch.registry.auth import MAX_TOKENS, AuthCore, AuthState, RegistryAuth, TokenFetch
from lazyfs.fetch.registry.hosts import PULL, PUSH, RESOLVE, HostTable
from lazyfs.fetch.registry.picker import Health, Outcome, SourcePicker
from lazyfs.fetch.registry.retry import Transient, retrying
from lazyfs.fetch.registry.transport import ProxySettings

REG = "reg.test"
REALM = "https://auth.test/token"
SCOPE = "repository:app:pull"


def basic_of(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class FakeRegistry:
    """A registry and its token server, scripted: which scheme it wants, which tokens it accepts."""

    scheme: str = "bearer"  # "none", "basic" or "bearer"
    users: dict[str, str] = field(default_factory=lambda: {"alice": "pw"})
    realm: str = REALM
    challenge_scope: str | None = None  # scope the 401 asks for (default: the request's)
    valid_tokens: set[str] = field(default_factory=set)
    token_status: int = 200
    expires_in: int = 300
    issued: int = 0
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path or token URL, auth kind)

    def handler(self, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        kind = auth.split(" ")[0].lower() if auth else "-"
        if request.url.host == "auth.test":
            q = urllib.parse.parse_qs(request.url.query.decode())
            self.log.append(("TOKEN", " ".join(q.get("scope", [])), kind))
            if self.token_status != 200:
                return httpx.Response(self.token_status, json={})
            user, _, pw = base64.b64decode(auth.split(" ")[1]).decode().partition(":") if auth else ("", "", "")
            if auth and self.users.get(user) != pw:
                return httpx.Response(401, json={})
            self.issued += 1
            token = f"T{self.issued}"
            self.valid_tokens.add(token)
            return httpx.Response(200, json={"token": token, "expires_in": self.expires_in})
        self.log.append((request.method, request.url.path, kind))
        if self.scheme == "none":
            return httpx.Response(200, text="ok")
        if self.scheme == "basic":
            if any(auth == basic_of(u, p) for u, p in self.users.items()):
                return httpx.Response(200, text="ok")
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="reg"'})
        if auth.startswith("Bearer ") and auth[7:] in self.valid_tokens:
            return httpx.Response(200, text="ok")
        scope = self.challenge_scope or SCOPE
        return httpx.Response(401, headers={
            "WWW-Authenticate": f'Bearer realm="{self.realm}",service="reg",scope="{scope}"'})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def flow_env(reg: FakeRegistry, cred: Credential | None, plain: set[str] = frozenset(), clock=None):
    creds = Credentials(None, entries={REG: cred} if cred else {})
    state = AuthState(AuthCore(lambda h: h in plain), creds, clock or Clock())
    http = httpx.AsyncClient(transport=httpx.MockTransport(reg.handler))
    return state, http


async def send(state: AuthState, http: httpx.AsyncClient, *, scopes=(SCOPE,), body: bytes | None = None,
               method: str = "GET") -> tuple[int, RegistryAuth]:
    auth = RegistryAuth(state, REG, scopes)
    request = http.build_request(method, f"https://{REG}/v2/app/blobs/x", content=body)
    response = await http.send(request, auth=auth)
    return response.status_code, auth


# --- the auth flow, as a table ----------------------------------------------------------------------

ALICE = Credential("alice", "pw")
CASES = [
    # (name, registry, credential, plain-http hosts, requests sent (two calls), expected log)
    ("anonymous", FakeRegistry(scheme="none"), None, set(), 2,
     [("GET", "/v2/app/blobs/x", "-")] * 2),
    ("basic: challenge, resend, then up front", FakeRegistry(scheme="basic"), ALICE, set(), 2,
     [("GET", "/v2/app/blobs/x", "-"), ("GET", "/v2/app/blobs/x", "basic"), ("GET", "/v2/app/blobs/x", "basic")]),
    ("bearer: challenge, token, resend, token reused", FakeRegistry(), ALICE, set(), 2,
     [("GET", "/v2/app/blobs/x", "-"), ("TOKEN", SCOPE, "basic"), ("GET", "/v2/app/blobs/x", "bearer"),
      ("GET", "/v2/app/blobs/x", "bearer")]),
    ("bearer, anonymous token", FakeRegistry(), None, set(), 1,
     [("GET", "/v2/app/blobs/x", "-"), ("TOKEN", SCOPE, "-"), ("GET", "/v2/app/blobs/x", "bearer")]),
    ("scope widening: the challenge asks for more", FakeRegistry(challenge_scope="repository:other:pull"), ALICE,
     set(), 1,
     [("GET", "/v2/app/blobs/x", "-"), ("TOKEN", f"{SCOPE} repository:other:pull", "basic"),
      ("GET", "/v2/app/blobs/x", "bearer")]),
    ("credentials go to a plain-HTTP realm of a plain-HTTP registry",
     FakeRegistry(realm="http://auth.test/token"), ALICE, {REG}, 1,
     [("GET", "/v2/app/blobs/x", "-"), ("TOKEN", SCOPE, "basic"), ("GET", "/v2/app/blobs/x", "bearer")]),
    ("an anonymous token may come from a plain-HTTP realm", FakeRegistry(realm="http://auth.test/token"), None,
     set(), 1,
     [("GET", "/v2/app/blobs/x", "-"), ("TOKEN", SCOPE, "-"), ("GET", "/v2/app/blobs/x", "bearer")]),
]


@pytest.mark.parametrize("name, reg, cred, plain, calls, expected", CASES, ids=[c[0] for c in CASES])
def test_auth_flow(name, reg, cred, plain, calls, expected) -> None:
    async def main() -> None:
        state, http = flow_env(reg, cred, plain)
        async with http:
            for _ in range(calls):
                status, auth = await send(state, http)
                assert status == 200 and not auth.refused
        assert reg.log == expected

    trio.run(main)


REFUSALS = [
    # (name, registry, credential, plain hosts, error class, message fragment)
    ("a realm on plain HTTP gets no credentials", FakeRegistry(realm="http://auth.test/token"), ALICE, set(),
     AuthError, "refusing to send credentials to plain-HTTP token realm"),
    ("basic without credentials", FakeRegistry(scheme="basic"), None, set(), AuthError,
     "requires authentication and no credentials file has no credentials"),
    ("the token server refuses the password", FakeRegistry(users={"alice": "other"}), ALICE, set(), AuthError,
     "refused user 'alice'"),
    ("the token server fails: retry later", FakeRegistry(token_status=503), ALICE, set(), Transient, "HTTP 503"),
    ("a realm that is no URL", FakeRegistry(realm="ftp://auth.test/x"), ALICE, set(), AuthError, "not an http(s) URL"),
]


@pytest.mark.parametrize("name, reg, cred, plain, error, fragment", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_auth_refusals(name, reg, cred, plain, error, fragment) -> None:
    async def main() -> None:
        state, http = flow_env(reg, cred, plain)
        async with http:
            with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
                await send(state, http)
        assert not state.flights  # a failed token fetch is settled, never left for others to wait on
        assert all("pw" not in repr(e) for e in reg.log)

    trio.run(main)


def test_token_refresh_after_a_401_and_expiry() -> None:
    reg = FakeRegistry(expires_in=60)
    clock = Clock()

    async def main() -> None:
        state, http = flow_env(reg, ALICE, clock=clock)
        async with http:
            await send(state, http)
            assert reg.issued == 1
            reg.valid_tokens.clear()  # the registry revokes T1: a 401 for a token we thought good
            status, auth = await send(state, http)
            assert status == 200 and reg.issued == 2
            assert [e[2] for e in reg.log[-3:]] == ["bearer", "basic", "bearer"]  # T1 refused, T2 fetched and used
            clock.now += 45  # 60 s token, renewed 10 % early: still good at 45 s ...
            await send(state, http)
            assert reg.issued == 2
            clock.now += 10  # ... but not at 55 s: fetched up front, no 401 on the way
            before = len(reg.log)
            await send(state, http)
            assert reg.issued == 3 and [e[0] for e in reg.log[before:]] == ["TOKEN", "GET"]

    trio.run(main)


def test_second_401_is_final_and_unreplayable_bodies_are_not_resent() -> None:
    reg = FakeRegistry()

    async def main() -> None:
        state, http = flow_env(reg, ALICE)
        async with http:
            reg.valid_tokens = set()
            original = reg.handler

            def never_valid(request: httpx.Request) -> httpx.Response:
                response = original(request)
                reg.valid_tokens.clear()  # tokens are issued but never accepted
                return response

            http._transport = httpx.MockTransport(never_valid)
            status, auth = await send(state, http)
            assert status == 401 and auth.refused and not auth.unreplayed
            assert "refused the token issued for user 'alice'" in state.core.refused(REG, (SCOPE,), ALICE, "f.json")

            async def stream():
                yield b"data"

            auth = RegistryAuth(state, REG, (SCOPE,))
            request = http.build_request("PUT", f"https://{REG}/v2/app/blobs/uploads/1", content=stream())
            response = await http.send(request, auth=auth)
            assert response.status_code == 401 and auth.unreplayed and not auth.refused

    trio.run(main)


def test_concurrent_requests_share_one_token_fetch() -> None:
    reg = FakeRegistry()

    async def main() -> None:
        state, http = flow_env(reg, ALICE)
        async with http:
            await send(state, http, scopes=("repository:warm:pull",))  # learn the challenge
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(send, state, http)
        assert reg.issued == 2 and not state.flights

    trio.run(main)


def test_auth_core_is_pure_and_bounded() -> None:
    core = AuthCore(max_tokens=8, max_hosts=4)
    assert core.authorize(REG, (SCOPE,), ALICE, 0.0) is None  # no challenge yet: anonymous
    core.challenged(REG, f'Bearer realm="{REALM}",service="reg"', (SCOPE,), None)
    for i in range(100):
        step = core.authorize(REG, (f"repository:r{i}:pull",), ALICE, 0.0)
        assert isinstance(step, TokenFetch) and "pw" not in repr(step)
        core.token_received(step, 200, json.dumps({"token": f"t{i}"}).encode(), 0.0)
    for i in range(100):
        core.challenged(f"h{i}.test", 'Basic realm="x"', (), None)
    assert core.statistics() == {"hosts": 4, "tokens": 8}
    assert MAX_TOKENS <= 4096


# --- the source picker ------------------------------------------------------------------------------

M1, M2, ORIGIN = "m1:5000", "m2:5000", "origin:5000"
SOURCES = [M1, M2, ORIGIN]
POLICY = HealthPolicy(failures=2, cooldown=10.0, max_cooldown=40.0)

# (time, event, host, expected order afterwards, expected state of host)
TRANSITIONS = [
    (0, Outcome.OK, M1, [M1, M2, ORIGIN], Health.UP),
    (1, Outcome.FAILED, M1, [M1, M2, ORIGIN], Health.UP),  # one failure: still first
    (2, Outcome.FAILED, M1, [M2, ORIGIN, M1], Health.DOWN),  # two: down, tried last (mirror -> next mirror)
    (3, Outcome.MISSING, M2, [M2, ORIGIN, M1], Health.UP),  # a 404 is no health failure
    (4, Outcome.FAILED, M2, [M2, ORIGIN, M1], Health.UP),
    (5, Outcome.FAILED, M2, [ORIGIN, M1, M2], Health.DOWN),  # both mirrors down: the origin first
    (6, Outcome.FAILED, ORIGIN, [ORIGIN, M1, M2], Health.UP),
    (7, Outcome.FAILED, ORIGIN, [M1, M2, ORIGIN], Health.DOWN),  # origin down too: the mirror back soonest first
    (12, None, M1, [M1, M2, ORIGIN], Health.PROBING),  # M1's cooldown is over: probed in its place
    (12, Outcome.FAILED, M1, [M2, ORIGIN, M1], Health.DOWN),  # a failed probe doubles the cooldown (20 s)
    (15, None, M2, [M2, ORIGIN, M1], Health.PROBING),
    (15, Outcome.OK, M2, [M2, ORIGIN, M1], Health.UP),  # a good probe: up again
    (17, None, ORIGIN, [M2, ORIGIN, M1], Health.PROBING),
    (17, Outcome.OK, ORIGIN, [M2, ORIGIN, M1], Health.UP),  # the origin back: mirror first, then origin
    (18, Outcome.BAD_BYTES, M2, [ORIGIN, M2, M1], Health.DOWN),  # bad bytes: down at once (origin <- mirror)
    (33, None, M1, [M1, M2, ORIGIN], Health.PROBING),
    (33, Outcome.OK, M1, [M1, M2, ORIGIN], Health.UP),
]


def test_mirror_health_transitions() -> None:
    picker = SourcePicker(POLICY, SOURCES)
    for now, outcome, host, order, state in TRANSITIONS:
        if outcome is not None:
            picker.record(host, outcome, now, seconds=0.01, nbytes=100)
        assert picker.order(SOURCES, now) == order, (now, outcome, host)
        assert picker.state(host, now) is state, (now, outcome, host)
    stats = {s.host: s for s in picker.statistics(40)}
    assert stats[M2].bad_bytes == 1 and stats[M2].misses == 1 and stats[M2].errors == 3
    assert stats[M1].bytes == 500 and stats[M1].latency_seconds_count == 5
    assert stats[M1].latency_buckets[-1] == (float("inf"), 5)


def test_picker_exclusions_and_bounds() -> None:
    picker = SourcePicker(HealthPolicy(max_sources=8), SOURCES)
    assert picker.order(SOURCES, 0, exclude={M1}) == [M2, ORIGIN]
    assert picker.order(SOURCES, 0, exclude=set(SOURCES)) == []
    for host in SOURCES:
        picker.record(host, Outcome.OK, 0)
    for i in range(1000):  # origins of arbitrary registries: evicted least recently used
        picker.record(f"r{i}.test", Outcome.OK, 0)
    hosts = {s.host for s in picker.statistics(0)}
    assert len(hosts) == 8 and set(SOURCES) <= hosts
    picker.reconfigure([M2, ORIGIN])  # a reload that drops M1 forgets it, keeps the others' health
    assert M1 not in {s.host for s in picker.statistics(0)}


def test_a_cold_mirror_is_asked_last_for_that_blob_only() -> None:
    picker = SourcePicker(HealthPolicy(cold_seconds=10, max_cold=4), SOURCES)
    picker.mark_cold(M1, "blob-a", 100)
    assert picker.order(SOURCES, 101, key="blob-a") == [M2, ORIGIN, M1]  # cold: after the usable ones
    assert picker.order(SOURCES, 101, key="blob-b") == [M1, M2, ORIGIN]  # another blob: in its place
    assert picker.order(SOURCES, 101) == [M1, M2, ORIGIN]
    picker.record(M2, Outcome.FAILED, 101)
    picker.record(M2, Outcome.FAILED, 101)  # down: after the cold one
    assert picker.order(SOURCES, 102, key="blob-a") == [ORIGIN, M1, M2]
    assert picker.order(SOURCES, 110, key="blob-a") == [M1, M2, ORIGIN]  # cold_seconds (and M2's cooldown) passed
    picker.mark_cold(M1, "blob-a", 120)
    picker.warm(M1, "blob-a")  # it served the blob: no longer cold
    assert picker.order(SOURCES, 121, key="blob-a")[0] == M1
    for i in range(100):  # bounded
        picker.mark_cold(M1, f"b{i}", 130)
    assert sum(picker.is_cold(M1, f"b{i}", 131) for i in range(100)) == 4
    assert {s.host: s.cold for s in picker.statistics(131)}[M1] == 102
    picker.reconfigure([M2, ORIGIN])  # a dropped source's marks go with it
    assert not picker.is_cold(M1, "b99", 131)


# --- the retry layer ----------------------------------------------------------------------------------


def run_mock(fn):
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(fn, clock=clock)


def test_retries_are_bounded_by_attempts() -> None:
    calls = []

    async def main():
        async def attempt():
            calls.append(trio.current_time())
            if len(calls) < 3:
                raise Transient("HTTP 503", 503)
            return "ok"

        assert await retrying(RetryPolicy(attempts=4, base_delay=1, max_delay=8, deadline=100), "x", attempt) == "ok"
        calls.clear()

        async def always():
            calls.append(trio.current_time())
            raise Transient("HTTP 500", 500)

        with pytest.raises(FetchError, match=r"HTTP 500 \(gave up after 4 attempts\)") as e:
            await retrying(RetryPolicy(attempts=4, base_delay=1, max_delay=8, deadline=100), "x", always)
        assert e.value.status == 500 and len(calls) == 4

    run_mock(main)


def test_one_deadline_bounds_sleeps_and_attempts() -> None:
    async def main():
        calls = []

        async def slow_down():
            calls.append(trio.current_time())
            raise Transient("HTTP 429", 429, retry_after=50)

        start = trio.current_time()
        with pytest.raises(FetchError, match="deadline is near"):
            await retrying(RetryPolicy(attempts=10, base_delay=0.1, deadline=60), "x", slow_down)
        # Retry-After 50 s is honoured once; a second wait would end past the 60 s deadline
        assert len(calls) == 2 and calls[1] - start >= 50 and trio.current_time() - start < 60

        async def hang():
            await trio.sleep_forever()

        start = trio.current_time()
        with pytest.raises(FetchError, match="no success within the 5 s deadline"):
            await retrying(RetryPolicy(deadline=5), "x", hang)
        assert trio.current_time() - start == pytest.approx(5)

        async def final():
            raise NotFoundError("gone")

        with pytest.raises(NotFoundError):
            await retrying(RetryPolicy(), "x", final)

    run_mock(main)


# --- host table and proxies ---------------------------------------------------------------------------


def test_host_table() -> None:
    table = HostTable.build([
        RegistryConfig("h:1", mirrors=("http://m:2", "n:3")),
        RegistryConfig("n:3", plain_http=True),
    ])
    assert [(e.host, e.scheme) for e in table.endpoints_for("h:1", PULL)] == [("m:2", "http"), ("n:3", "http"),
                                                                               ("h:1", "https")]
    assert [e.host for e in table.endpoints_for("h:1", RESOLVE)] == ["h:1"]  # tags never go to mirrors
    assert [e.host for e in table.endpoints_for("h:1", PUSH)] == ["h:1"]
    assert table.endpoints("docker.io")[0].base_url == "https://registry-1.docker.io"
    assert table.plain_http("n:3") and not table.plain_http("h:1")
    with pytest.raises(ConfigError, match="twice"):
        HostTable.build([RegistryConfig("a:1"), RegistryConfig("a:1")])


@pytest.mark.parametrize("env, url, proxy", [
    ({"HTTPS_PROXY": "http://p:3128"}, "https://reg.test/v2/", "http://p:3128"),
    ({"https_proxy": "p:3128"}, "https://reg.test/v2/", "http://p:3128"),
    ({"HTTPS_PROXY": "http://p:3128"}, "http://reg.test/v2/", None),  # HTTP_PROXY is for http://
    ({"HTTP_PROXY": "http://p:1", "HTTPS_PROXY": "http://p:2"}, "http://reg.test:5000/v2/", "http://p:1"),
    ({"ALL_PROXY": "http://p:9"}, "https://reg.test/v2/", "http://p:9"),
    ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "reg.test"}, "https://reg.test/v2/", None),
    ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": ".test"}, "https://a.reg.test/v2/", None),
    ({"HTTPS_PROXY": "http://p:3128", "no_proxy": "other.test"}, "https://reg.test/v2/", "http://p:3128"),
    ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "*"}, "https://reg.test/v2/", None),
    ({"HTTPS_PROXY": "http://p:3128"}, "https://127.0.0.1:5000/v2/", None),  # loopback: never (as Go)
    ({"HTTPS_PROXY": "http://p:3128"}, "https://localhost:5000/v2/", None),
])
def test_proxy_settings(env, url, proxy) -> None:
    assert ProxySettings.from_environment(env).proxy_for(httpx.URL(url)) == proxy


def test_socks_proxy_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="only http"):
        ProxySettings.from_environment({"HTTPS_PROXY": "socks5://p:1080"})


def test_every_other_client_map_is_bounded(tmp_path) -> None:
    """Blob sizes per backend, helper answers, the snapshotter's manifests: LRU/TTL bounded maps."""
    from lazyfs.config import Config
    from lazyfs.fetch.credentials import MAX_HELPER_CACHE
    from lazyfs.fetch.registry import RegistryBackend, RegistryClient
    from lazyfs.fetch.registry.backend import MAX_SIZES
    from lazyfs.serve.snapshotter.lazy import MANIFEST_CACHE_ENTRIES, LazyImages

    async def main() -> None:
        async with RegistryClient() as client:
            backend = RegistryBackend(client, "reg.test/app")
            for i in range(MAX_SIZES + 100):
                backend._sizes[f"sha256:{i:064x}"] = i
            assert len(backend._sizes) == MAX_SIZES
            assert client.statistics().sources == ()

    trio.run(main)
    creds = Credentials(None)
    for i in range(MAX_HELPER_CACHE * 2):
        creds._helped[f"h{i}.test"] = (0.0, None)
    assert len(creds._helped) == MAX_HELPER_CACHE
    images = LazyImages(Config(), str(tmp_path))
    for i in range(MANIFEST_CACHE_ENTRIES * 4):
        images._manifests[(f"reg.test/app{i}", None)] = (0.0, b"", "")
    assert len(images._manifests) == MANIFEST_CACHE_ENTRIES


# --- one retry layer, one failover layer: the scheduler over a multi-source backend ------------------


def test_scheduler_calls_a_self_retrying_backend_once_and_excludes_bad_sources(tmp_path) -> None:
    from lazyfs.fetch.backend import Backend, SourcedBytes
    from lazyfs.fetch.cache import ChunkCache
    from lazyfs.fetch.scheduler import FetchScheduler
    from tests.fetch.test_scheduler import make_chunks, write_blob
    from tests.support.layers import write_frames_blob  # noqa: F401  (write_blob's helper)

    blob, locs = write_blob(tmp_path / "oci", raws := make_chunks(2))
    data = (tmp_path / "oci" / "blobs" / "sha256" / blob.split(":")[1]).read_bytes()

    class Sourced(Backend):
        """Three sources: the first serves corrupt bytes, the second fails, the third is good."""

        retries = True
        name = "multi"

        def __init__(self, fail_all: bool = False) -> None:
            self.calls: list[frozenset[str]] = []
            self.reported: list[str] = []
            self.fail_all = fail_all

        @property
        def sources(self) -> tuple[str, ...]:
            return ("bad", "good")

        async def read_range(self, blob, offset, length):
            raise AssertionError("the scheduler reads with read_range_from")

        async def read_range_from(self, blob, offset, length, *, exclude=()):
            self.calls.append(frozenset(exclude))
            if self.fail_all:
                raise FetchError("gave up after 4 attempts")
            piece = data[offset : offset + length]
            if "bad" not in exclude:
                return SourcedBytes(bytes(b ^ 0xFF for b in piece), "bad")
            return SourcedBytes(piece, "good")

        def source_failed_verification(self, source):
            self.reported.append(source)

        async def blob_size(self, blob):
            return len(data)

    async def main() -> None:
        backend = Sourced()
        async with FetchScheduler.open([backend], ChunkCache(None, 0, 1 << 20), backoff_base=0.001) as sched:
            assert await sched.get(locs[0]) == raws[0]
        assert backend.calls == [frozenset(), frozenset({"bad"})] and backend.reported == ["bad"]
        failing = Sourced(fail_all=True)
        async with FetchScheduler.open([failing], ChunkCache(None, 0, 1 << 20), backoff_base=0.001) as sched:
            with pytest.raises(FetchError):
                await sched.get(locs[1])
            assert sched.statistics()["retries"] == 0
        assert len(failing.calls) == 1  # the backend's own retry layer is the only one

    trio.run(main)


# --- containerd hosts.toml -------------------------------------------------------------------------


def test_hosts_toml_parsing(tmp_path) -> None:
    from lazyfs.fetch.registry.certsd import load_hosts_dir, parse_hosts_toml, registry_of_dir

    data = b'''
server = "https://registry.example.com"
ca = "origin-ca.pem"

[host."https://mirror-a.example.com:5000"]
  capabilities = ["pull"]
  ca = ["/abs/a.pem", "b.pem"]
  client = [["c.crt", "c.key"]]

[host."http://10.1.2.3:5000/prefix/v2"]
  skip_verify = true
  override_path = true
  header = {"x-extra" = "ignored"}
'''
    entry = parse_hosts_toml(data, "registry.example.com", "/etc/containerd/certs.d/registry.example.com")
    a, b, origin = entry.endpoints
    assert (a.host, a.scheme, a.path, sorted(a.capabilities)) == ("mirror-a.example.com:5000", "https", "/v2", ["pull"])
    assert a.tls.ca_files == ("/abs/a.pem", "/etc/containerd/certs.d/registry.example.com/b.pem")
    assert a.tls.client_cert.endswith("/c.crt") and a.tls.client_key.endswith("/c.key")
    assert (b.scheme, b.path, b.tls.skip_verify, len(b.capabilities)) == ("http", "/prefix/v2", True, 3)
    assert b.url("app/blobs/x") == "http://10.1.2.3:5000/prefix/v2/app/blobs/x"
    assert (origin.host, origin.tls.ca_files[0].endswith("origin-ca.pem")) == ("registry.example.com", True)
    assert registry_of_dir("host_5000_") == "host:5000" and registry_of_dir("host:5000") == "host:5000"
    assert registry_of_dir("_default") == "_default" and registry_of_dir("not a host") is None
    for bad, needle in [
        (b'[host."https://m"]\ncapabilitys = ["pull"]\n', "unknown key 'capabilitys'"),
        (b'[host."https://m"]\ncapabilities = ["fly"]\n', "unknown capability 'fly'"),
        (b'[host."https://m"]\nclient = ["a.pem", "b.pem", "c.pem"]\n', "one per host"),
        (b'server = [1]\n', "server must be a URL"),
        (b'server = "https://ok\n', "not valid TOML"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            parse_hosts_toml(bad, "r.test", "/d", "/d/hosts.toml")
    # a directory: per-host files and _default for every other registry
    (tmp_path / "r.test_5000_").mkdir()
    (tmp_path / "r.test_5000_" / "hosts.toml").write_text('[host."http://m.test:1"]\ncapabilities = ["pull"]\n')
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text("skip_verify = true\n")
    table = HostTable.build(hosts=load_hosts_dir(tmp_path))
    assert [e.host for e in table.endpoints("r.test:5000")] == ["m.test:1", "r.test:5000"]
    assert [e.host for e in table.endpoints_for("r.test:5000", RESOLVE)] == ["r.test:5000"]
    other = table.endpoints("elsewhere.test")
    assert [e.host for e in other] == ["elsewhere.test"] and other[0].tls.skip_verify
    assert table.tls_for("elsewhere.test").skip_verify
