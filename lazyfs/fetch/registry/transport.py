"""The HTTP transport under the registry client: per-host TLS, proxies, bounded bodies.

``HostTransport`` is one ``httpx`` transport that sends each request through a pooled
``httpx.AsyncHTTPTransport`` chosen by where it goes:

* TLS: the ``TlsProfile`` the host table gives the request's ``host[:port]`` (CAs, client
  certificate for mTLS, skip_verify). Requests with equal profiles share one pool.
* Proxies: ``ProxySettings`` from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` and
  ``NO_PROXY`` (upper or lower case), as Go's net/http reads them (so as docker and
  containerd do): loopback addresses and ``localhost`` are never proxied.
* Threads: a request with ``extensions[THREADED]`` that goes direct (no proxy) is sent by a
  ``ThreadedPool`` in a worker thread, its body read there (``threaded``: blob ranges).
* Bodies: a 401's body, which httpx reads whole before the auth flow resends, is cut at
  64 KiB; a request may set ``extensions[BODY_LIMIT]`` to bound its response body
  (``BodyTooLarge`` past it).

``retarget`` swaps in a new host table or proxies (a reload): pools whose settings are
gone are closed once their last response is closed.
"""

from __future__ import annotations

import ipaddress
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import httpcore
import httpx

from lazyfs.errors import ConfigError
from lazyfs.fetch.registry.hosts import TlsProfile
from lazyfs.fetch.registry.threaded import THREADED, ThreadedPool

# Blob ranges are megabytes: read the socket up to 1 MiB at a time (httpcore's default is 64 KiB), so
# a body costs fewer passes through httpcore/h11/httpx on the trio thread when the thread is busy
# and data has piled up in the socket (a recv never waits for more than is there). The cold fetch
# benchmark's profile had that per-piece overhead as the trio thread's largest cost (BENCHMARKS.md).
READ_NUM_BYTES = 1 << 20
if getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", READ_NUM_BYTES) < READ_NUM_BYTES:
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_NUM_BYTES

BODY_LIMIT = "lazyfs.body_limit"
CHALLENGE_BODY_LIMIT = 64 << 10


class BodyTooLarge(Exception):
    """A response body longer than the request's ``BODY_LIMIT``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"more than the {limit} bytes expected")


def ssl_context(profile: TlsProfile) -> ssl.SSLContext:
    """The SSL context of *profile* (ConfigError naming the file that cannot be used)."""
    try:
        if profile.skip_verify:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif profile.system_cas or not profile.ca_files:
            ctx = ssl.create_default_context()
        else:
            ctx = ssl.create_default_context(cafile=profile.ca_files[0])
        for ca in profile.ca_files if profile.system_cas else profile.ca_files[1:]:
            ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        files = ", ".join(profile.ca_files)
        raise ConfigError(f"ca_file {files}: cannot load: {getattr(e, 'strerror', None) or e}") from None
    if profile.client_cert is not None:
        try:
            ctx.load_cert_chain(profile.client_cert, profile.client_key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"client_cert {profile.client_cert}: cannot load with key "
                f"{profile.client_key or '(in the same file)'}: {getattr(e, 'strerror', None) or e}"
            ) from None
    return ctx


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Proxy URLs by target scheme, and the ``NO_PROXY`` list."""

    http: str | None = None
    https: str | None = None
    no_proxy: str = ""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ProxySettings:
        """Read ``HTTP(S)_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (either case) from *environ*
        (default: this process's environment)."""
        if environ is None:
            found = urllib.request.getproxies_environment()
        else:
            found = {}
            for name, value in environ.items():
                if value and name.lower().endswith("_proxy"):
                    found.setdefault(name.lower()[: -len("_proxy")], value)
            for name, value in environ.items():  # lower case wins, as in urllib
                if value and name.endswith("_proxy"):
                    found[name[: -len("_proxy")]] = value
        fallback = found.get("all")
        settings = cls(found.get("http") or fallback, found.get("https") or fallback, found.get("no", ""))
        for url in (settings.http, settings.https):
            if url is not None and httpx.URL(url if "://" in url else "http://" + url).scheme not in ("http", "https"):
                raise ConfigError(f"proxy {url}: only http:// and https:// proxies are supported")
        return settings

    def proxy_for(self, url: httpx.URL) -> str | None:
        """The proxy to send a request for *url* through, or None to go direct."""
        proxy = self.https if url.scheme == "https" else self.http
        if proxy is None:
            return None
        host = url.host
        if host == "localhost" or host.endswith(".localhost"):
            return None
        try:
            if ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:  # a host name, not an IP address: no_proxy decides
            pass
        if self.no_proxy:
            if self.no_proxy.strip() == "*":
                return None
            target = f"{host}:{url.port}" if url.port else host
            if urllib.request.proxy_bypass_environment(target, {"no": self.no_proxy}):
                return None
        return proxy if "://" in proxy else "http://" + proxy


class _Pool:
    __slots__ = ("transport", "active", "retired")

    def __init__(self, transport: httpx.AsyncHTTPTransport) -> None:
        self.transport = transport
        self.active = 0  # responses not closed yet
        self.retired = False


class _TrackedStream(httpx.AsyncByteStream):
    """A response body that counts against its pool until closed, optionally bounded."""

    def __init__(self, inner: httpx.AsyncByteStream, owner: HostTransport, pool: _Pool,
                 limit: int | None, truncate: bool) -> None:
        self._inner, self._owner, self._pool = inner, owner, pool
        self._limit, self._truncate = limit, truncate
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for piece in self._inner:
            if self._limit is not None and received + len(piece) > self._limit:
                if not self._truncate:
                    raise BodyTooLarge(self._limit)
                yield piece[: self._limit - received]
                return
            received += len(piece)
            yield piece

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._inner.aclose()
            finally:
                await self._owner._released(self._pool)


class HostTransport(httpx.AsyncBaseTransport):
    """Routes each request to the pooled transport for its TLS profile and proxy."""

    def __init__(self, tls_for: Callable[[str], TlsProfile], proxies: ProxySettings, *,
                 limits: httpx.Limits, profiles: set[TlsProfile] = frozenset()) -> None:
        self._limits = limits
        self._tls_for, self._proxies = tls_for, proxies
        self._contexts: dict[TlsProfile, ssl.SSLContext] = {p: ssl_context(p) for p in profiles}
        self._pools: dict[tuple[TlsProfile | None, str | None], _Pool] = {}
        self._retired: list[_Pool] = []
        self.threaded = ThreadedPool(max_threads=limits.max_connections or 16,
                                     max_idle=limits.max_keepalive_connections or 8)

    def retarget(self, tls_for: Callable[[str], TlsProfile], proxies: ProxySettings,
                 profiles: set[TlsProfile] = frozenset()) -> None:
        """Use new TLS settings and proxies from now on (ConfigError leaves the old ones)."""
        contexts = {p: ssl_context(p) for p in profiles}
        self._tls_for, self._proxies, self._contexts = tls_for, proxies, contexts
        for pool in self._pools.values():
            pool.retired = True
            self._retired.append(pool)
        self._pools = {}
        self.threaded.close(final=False)  # idle connections of the old TLS settings

    def _pool(self, profile: TlsProfile | None, proxy: str | None) -> _Pool:
        key = (profile, proxy)
        pool = self._pools.get(key)
        if pool is None:
            verify: ssl.SSLContext | bool = True
            if profile is not None:
                ctx = self._contexts.get(profile)
                if ctx is None:
                    ctx = self._contexts[profile] = ssl_context(profile)
                verify = ctx
            transport = httpx.AsyncHTTPTransport(
                verify=verify, limits=self._limits, retries=0, trust_env=False, proxy=proxy
            )
            pool = self._pools[key] = _Pool(transport)
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for idle in [p for p in self._retired if p.active == 0]:
            self._retired.remove(idle)
            await idle.transport.aclose()
        profile = self._tls_for(request.url.netloc.decode("ascii")) if request.url.scheme == "https" else None
        proxy = self._proxies.proxy_for(request.url)
        if request.extensions.get(THREADED) and proxy is None:
            context = None
            if profile is not None:
                context = self._contexts.get(profile)
                if context is None:
                    context = self._contexts[profile] = ssl_context(profile)
            return await self.threaded.send(request, context, request.extensions[THREADED])
        pool = self._pool(profile, proxy)
        pool.active += 1
        try:
            response = await pool.transport.handle_async_request(request)
        except BaseException:
            await self._released(pool)
            raise
        limit = request.extensions.get(BODY_LIMIT)
        truncate = False
        if response.status_code == 401:
            limit, truncate = CHALLENGE_BODY_LIMIT, True
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _TrackedStream(response.stream, self, pool, limit, truncate)
        return response

    async def _released(self, pool: _Pool) -> None:
        pool.active -= 1
        if pool.retired and pool.active == 0 and pool in self._retired:
            self._retired.remove(pool)
            await pool.transport.aclose()

    async def aclose(self) -> None:
        pools = list(self._pools.values()) + self._retired
        self._pools, self._retired = {}, []
        self.threaded.close()
        for pool in pools:
            await pool.transport.aclose()

    def statistics(self) -> dict[str, int]:
        return {"pools": len(self._pools), "retired_pools": len(self._retired),
                "active_responses": sum(p.active for p in self._pools.values())}
