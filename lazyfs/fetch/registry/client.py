"""``RegistryClient``: the trio shell that runs the registry protocol over one httpx client.

It owns the I/O and wires the pure parts together: the host table (``hosts``), the auth
flow (``auth``), the source picker (``picker``) and the retry layer (``retry``). The calls
themselves live in ``manifests``, ``blobs`` and ``uploads``; this class exposes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import trio

from lazyfs.errors import AuthError, FetchError, IntegrityError, NotFoundError, describe
from lazyfs.fetch.credentials import Credentials
from lazyfs.fetch.registry import blobs, manifests, uploads
from lazyfs.fetch.registry.answers import tls_failure
from lazyfs.fetch.registry.blobs import RangeIgnored
from lazyfs.fetch.registry.auth import AuthCore, AuthState, RegistryAuth
from lazyfs.fetch.registry.hosts import PULL, Endpoint, HostsEntry, HostTable, RegistryConfig
from lazyfs.fetch.registry.picker import HealthPolicy, Outcome, SourcePicker, SourceStatistics
from lazyfs.fetch.registry.retry import RetryPolicy, Transient, retrying
from lazyfs.fetch.registry.transport import HostTransport, ProxySettings
from lazyfs.format.reference import Reference, parse_reference

T = TypeVar("T")
Body = bytes | Callable[[], object] | None


@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    requests: int
    retries: int
    failovers: int
    token_requests: int
    auth_challenges: int
    credential_reloads: int
    bytes_received: int
    bytes_sent: int
    sources: tuple[SourceStatistics, ...] = ()
    cached_tokens: int = 0
    reloads: int = 0

    def source(self, host: str) -> SourceStatistics | None:
        return next((s for s in self.sources if s.host == host), None)


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    retries: int = 0
    failovers: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    reloads: int = 0


class RegistryClient:
    """An OCI distribution client with pooled connections; use ``async with`` or ``aclose()``.

    *registries* configures hosts (TLS, plain HTTP, mirrors); *hosts* adds registries
    configured by containerd ``hosts.toml`` files (``certsd.load_hosts_dir``); other hosts
    get HTTPS verified against the system CAs. *credentials* defaults to none (anonymous).
    *proxies* default to the environment's (``HTTPS_PROXY``, ``NO_PROXY``, …) when
    *trust_env*. *clock* (seconds) decides token expiry and source health; trio's by default.
    """

    def __init__(
        self,
        registries: Iterable[RegistryConfig] = (),
        credentials: Credentials | None = None,
        *,
        hosts: Iterable[HostsEntry] = (),
        retry: RetryPolicy = RetryPolicy(),
        health: HealthPolicy = HealthPolicy(),
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_connections: int = 64,
        max_keepalive_connections: int = 16,
        user_agent: str = "lazyfs/0.1",
        trust_env: bool = True,
        proxies: ProxySettings | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.credentials = credentials if credentials is not None else Credentials(None)
        self.retry = retry
        self._clock = clock
        self._table = HostTable.build(registries, hosts)
        if proxies is None:
            proxies = ProxySettings.from_environment() if trust_env else ProxySettings()
        self._proxies = proxies
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive_connections)
        self._transport = HostTransport(self._table.tls_for, proxies, limits=limits, profiles=self._table.profiles())
        self._http = httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            headers={"User-Agent": user_agent},
            trust_env=False,
            follow_redirects=False,
        )
        self.picker = SourcePicker(health, self._configured_sources())
        self._auth = AuthState(AuthCore(lambda host: self._table.plain_http(host)), self.credentials, clock)
        self._stats = _Counters()
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection. Idempotent."""
        if not self._closed:
            self._closed = True
            await self._http.aclose()

    def reconfigure(self, registries: Iterable[RegistryConfig] = (), hosts: Iterable[HostsEntry] = (),
                    proxies: ProxySettings | None = None) -> None:
        """Use a new registry configuration (mirror lists, TLS, proxies) from the next request on.

        Requests in flight finish on their old connections; the health of sources that stay
        configured is kept. ConfigError (e.g. an unreadable ca_file) changes nothing."""
        table = HostTable.build(registries, hosts)
        proxies = proxies if proxies is not None else self._proxies
        self._transport.retarget(table.tls_for, proxies, table.profiles())
        self._table, self._proxies = table, proxies
        self.picker.reconfigure(self._configured_sources())
        self._stats.reloads += 1

    def _configured_sources(self) -> set[str]:
        table = self._table
        return {ep.host for name in list(table.configs) + list(table.hosts) for ep in table.endpoints(name) if ep.host}

    @property
    def threaded(self):
        """The worker-thread HTTP/1.1 pool that reads blob range bodies (``threaded.ThreadedPool``)."""
        return self._transport.threaded

    def statistics(self) -> RegistryStatistics:
        s, a = self._stats, self._auth
        return RegistryStatistics(
            requests=s.requests,
            retries=s.retries,
            failovers=s.failovers,
            token_requests=a.counters.token_requests,
            auth_challenges=a.counters.auth_challenges,
            credential_reloads=self.credentials.reloads,
            bytes_received=s.bytes_received,
            bytes_sent=s.bytes_sent,
            sources=self.picker.statistics(self._clock()),
            cached_tokens=a.core.statistics()["tokens"],
            reloads=s.reloads,
        )

    # --- configuration --------------------------------------------------------------------------

    @property
    def hosts(self) -> HostTable:
        return self._table

    def config_for(self, host: str) -> RegistryConfig:
        """The effective configuration of *host* (defaults: HTTPS, system CAs, no mirrors)."""
        return self._table.config_for(host)

    def endpoints(self, registry: str, capability: str = PULL) -> tuple[Endpoint, ...]:
        return self._table.endpoints_for(registry, capability)

    def sources(self, registry: str) -> tuple[str, ...]:
        """Where blob reads for *registry* go, in configured order: its mirrors, then itself."""
        return tuple(ep.host for ep in self.endpoints(registry, PULL))

    def mirrored_registries(self) -> tuple[str, ...]:
        """The configured registries served by more than one endpoint (mirrors), sorted."""
        table = self._table
        names = (set(table.configs) | set(table.hosts)) - {"_default"}
        return tuple(sorted(n for n in names if len(table.endpoints(n)) > 1))

    def repo(self, repo: Reference | str) -> Reference:
        return repo if isinstance(repo, Reference) else parse_reference(repo)

    _repo = repo

    # --- the retry layer and the source picker --------------------------------------------------

    def _retried(self) -> None:
        self._stats.retries += 1

    async def call(self, what: str, attempt: Callable[[], Awaitable[T]], *, hard: bool = True) -> T:
        """Run *attempt* in the retry layer (see ``retry``)."""
        return await retrying(self.retry, what, attempt, hard=hard, on_retry=self._retried)

    async def from_sources(
        self, what: str, registry: str, capability: str, exclude: Collection[str],
        attempt: Callable[[Endpoint], Awaitable[T]], *, bounded: bool = True, key: str | None = None,
        avoid_cold: bool = True,
    ) -> T:
        """Run *attempt* against *registry*'s endpoints that can *capability*, in the picker's
        order, until one succeeds; rounds repeat in the retry layer while a failure was
        transient. NotFoundError only if every source said so. *bounded*: each attempt
        gets ``retry.attempt_timeout``. *key* (a blob digest): a source that ignores a Range
        for it is marked cold for it, one that serves it is not any more; with *avoid_cold*,
        sources cold for it are asked after the others (whole-blob reads, which warm a
        pull-through mirror, ask them in their place)."""
        endpoints = {ep.host: ep for ep in self.endpoints(registry, capability)}
        if not [h for h in endpoints if h not in exclude]:
            raise FetchError(f"{what}: every source is excluded ({', '.join(endpoints)})")

        async def one_round() -> T:
            transient: list[str] = []
            permanent: list[BaseException] = []
            missing = 0
            status = None
            order = self.picker.order(list(endpoints), self._clock(), exclude, key if avoid_cold else None)
            for i, host in enumerate(order):
                ep = endpoints[host]
                if i:
                    self._stats.failovers += 1
                started = self._clock()
                outcome = Outcome.FAILED
                try:
                    with trio.fail_after(self.retry.attempt_timeout) if bounded else contextlib.nullcontext():
                        result = await attempt(ep)
                    outcome = Outcome.OK
                    if key is not None:
                        self.picker.warm(host, key)
                    return result
                except trio.TooSlowError:
                    transient.append(f"{host}: no answer within {self.retry.attempt_timeout:g} s")
                except Transient as e:
                    transient.append(f"{host}: {e.message}")
                    status = e.status
                except NotFoundError as e:
                    outcome = Outcome.MISSING
                    missing += 1
                    permanent.append(e)
                except IntegrityError as e:
                    outcome = Outcome.BAD_BYTES
                    permanent.append(e)
                except AuthError as e:
                    outcome = Outcome.OK  # the source answers; we may not have what it wants
                    permanent.append(e)
                except RangeIgnored as e:  # a cold pull-through mirror: alive, just not ranged yet
                    outcome = Outcome.OK
                    permanent.append(e)
                    if key is not None:
                        self.picker.mark_cold(host, key, self._clock())
                except FetchError as e:  # a malformed answer: this source is broken for us
                    permanent.append(e)
                finally:
                    self.picker.record(host, outcome, self._clock(), seconds=self._clock() - started)
            if transient:
                raise Transient("; ".join(transient), status)
            if missing == len(order):
                raise NotFoundError(f"{what}: not found on {', '.join(order)}")
            if len(permanent) == 1:
                raise permanent[0]
            raise next(e for e in reversed(permanent) if not isinstance(e, NotFoundError))

        return await self.call(what, one_round)

    def source_failed_verification(self, host: str) -> None:
        """Bytes *host* served failed verification upstream (e.g. a chunk's blake3): take it down."""
        self.picker.record(host, Outcome.BAD_BYTES, self._clock())

    async def probe_sources(self, registry: str) -> dict[str, str]:
        """Ask every endpoint of *registry* for ``/v2/`` now and record the outcome; the
        resulting states by host. A 200 or 401 counts as alive."""
        states: dict[str, str] = {}
        for ep in self._table.endpoints(registry):
            started = self._clock()
            outcome = Outcome.FAILED
            try:
                with trio.move_on_after(self.retry.attempt_timeout):
                    request = self._http.build_request("GET", ep.url(""))
                    response = await self._http.send(request, stream=True)
                    await response.aclose()
                    outcome = Outcome.OK if response.status_code in (200, 401) else Outcome.FAILED
            except httpx.HTTPError:  # unreachable: recorded as FAILED below, like a timeout
                pass
            states[ep.host] = self.picker.record(ep.host, outcome, self._clock(),
                                                 seconds=self._clock() - started).value
        return states

    # --- one HTTP exchange ----------------------------------------------------------------------

    def received(self, host: str, n: int) -> None:
        self._stats.bytes_received += n
        self.picker.add_bytes(host, n)

    def sent(self, n: int) -> None:
        self._stats.bytes_sent += n

    async def request(
        self,
        method: str,
        ep: Endpoint,
        url: str | httpx.URL,
        *,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None = None,
        body: Body = None,
        follow_redirects: bool = False,
        extensions: dict | None = None,
    ) -> httpx.Response:
        """One authenticated exchange; the caller owns (and must ``aclose``) the streamed response.

        Transport failures become Transient (or FetchError when retrying cannot help); a
        refusal after fresh authorization becomes AuthError."""
        content = body() if callable(body) else body
        if isinstance(content, bytes):
            self.sent(len(content))
        self._stats.requests += 1
        auth = RegistryAuth(self._auth, ep.host, scopes)
        try:
            request = self._http.build_request(method, url, headers=headers, content=content, extensions=extensions)
            response = await self._http.send(request, auth=auth, stream=True, follow_redirects=follow_redirects)
        except httpx.TimeoutException as e:
            raise Transient(f"{method} {url}: timed out ({type(e).__name__})") from None
        except httpx.ConnectError as e:
            reason = tls_failure(e)
            if reason is not None:
                raise FetchError(f"{ep.host}: {reason}") from None
            raise Transient(f"cannot connect to {ep.base_url}: {describe(e)}") from None
        except httpx.TooManyRedirects as e:
            raise FetchError(f"{method} {url}: {describe(e)}") from None
        except httpx.TransportError as e:
            reason = tls_failure(e)
            if reason is not None:
                raise FetchError(f"{ep.host}: {reason}") from None
            raise Transient(f"{method} {url}: {type(e).__name__}: {describe(e)}") from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as e:
            raise FetchError(f"{method} {url}: {type(e).__name__}: {describe(e)}") from None
        if response.status_code == 401 and (auth.refused or auth.unreplayed):
            await response.aclose()
            if auth.unreplayed:  # a streamed body: the retry layer repeats the exchange with a fresh token
                raise Transient(f"{ep.host}: authorization expired while sending {method} {url}", 401)
            raise AuthError(self._auth.core.refused(ep.host, scopes, auth.credential, self.credentials.source()), 401)
        return response

    # --- the calls ------------------------------------------------------------------------------

    get_manifest = manifests.get_manifest
    head_manifest = manifests.head_manifest
    put_manifest = manifests.put_manifest
    list_tags = manifests.list_tags
    blob_size = blobs.blob_size
    read_range = blobs.read_range
    read_range_from = blobs.read_range_from
    get_blob = blobs.get_blob
    get_blob_to_file = blobs.get_blob_to_file
    push_blob = uploads.push_blob

