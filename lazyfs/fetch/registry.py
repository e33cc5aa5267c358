"""The OCI distribution API over httpx (on trio): manifests, blobs, ranged reads, uploads, auth.

``RegistryClient`` talks to any number of registries through one pooled
``httpx.AsyncClient``. Every public call:

* authenticates as the registry asks: anonymous, Basic, or Bearer tokens fetched
  from the challenge's realm (cached per registry and scope until they expire);
  on a 401 it re-reads the credentials file and retries once;
* retries 5xx/429 answers, connection errors and timeouts with exponential
  backoff and jitter, up to ``RetryPolicy.attempts`` and an overall
  ``RetryPolicy.deadline``;
* raises only lazyfs errors: ``NotFoundError``, ``AuthError``, ``IntegrityError``,
  ``FetchError`` (with ``.status`` when there was an HTTP answer) — never httpx's.

Blob reads (``blob_size``, ``read_range``, ``get_blob*``) go to the registry's
mirrors first, in order, then to the registry itself, failing over on any error
(containerd's ``hosts.toml`` order). Manifests, tags and uploads use the registry
itself only.

Mirror exclusion, for callers that verify what they read: ``read_range_from``
returns the bytes together with the source (``host[:port]``) that served them;
if they fail verification, call again with ``exclude={source, ...}`` and the
next source is used. ``FetchError`` when every source is excluded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlencode

import httpx
import trio

from lazyfs.errors import (
    AuthError,
    ConfigError,
    FetchError,
    FormatError,
    IntegrityError,
    NotFoundError,
    RangeError,
)
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.credentials import Credential, Credentials
from lazyfs.format.reference import (
    Challenge,
    Reference,
    check_digest,
    check_registry,
    check_repository,
    digest_of,
    hasher_for,
    parse_reference,
    parse_www_authenticate,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

MAX_MANIFEST_SIZE = 4 << 20  # what containerd accepts; a larger "manifest" is an attack or a bug
MAX_BLOB_IN_MEMORY = 1 << 30
_MAX_ERROR_BODY = 64 << 10
_MAX_TOKEN_BODY = 1 << 20
_MAX_TAG_PAGES = 10_000
_DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token server does not say (distribution spec)
_COPY_CHUNK = 1 << 20

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """How to reach one registry (``host[:port]``, as in image references).

    ``plain_http`` speaks HTTP instead of HTTPS (only for registries you trust on
    the path, e.g. 127.0.0.1). ``ca_file`` is a PEM bundle that replaces the system
    CAs for this host. ``mirrors`` are ``host[:port]`` (or ``http://host[:port]`` for a
    plain-HTTP mirror) tried in order for blob reads; a mirror without its own
    RegistryConfig inherits ``plain_http`` and ``ca_file`` from this one.
    """

    host: str
    plain_http: bool = False
    ca_file: str | None = None
    mirrors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_registry(self.host)
        except FormatError as e:
            raise ConfigError(f"registry config: host: {e}") from None
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        for m in self.mirrors:
            try:
                check_registry(_strip_scheme(m)[0])
            except FormatError as e:
                raise ConfigError(f"registry config {self.host}: mirror {m!r}: {e}") from None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter, and a deadline per public call."""

    attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 8.0
    deadline: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0 or self.deadline <= 0:
            raise ConfigError(f"retry policy: invalid {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number *attempt* (1-based): half fixed, half random."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True, slots=True)
class SourcedBytes:
    """Bytes read from a blob, and the source (``host[:port]``) that served them."""

    data: bytes
    source: str


@dataclass(frozen=True, slots=True)
class BlobPush:
    """What ``push_blob`` did: ``outcome`` is ``"exists"``, ``"mounted"`` or ``"uploaded"``."""

    digest: str
    size: int
    outcome: str


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


@dataclass(frozen=True, slots=True)
class _Endpoint:
    host: str  # host[:port], the name credentials and tokens are keyed by
    base_url: str  # scheme://host[:port]


@dataclass(slots=True)
class _Token:
    value: str
    expires: float  # on the client's clock


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    retries: int = 0
    failovers: int = 0
    token_requests: int = 0
    auth_challenges: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0


class _Transient(Exception):
    """A failure worth retrying (5xx, 429, connection error, timeout, truncated body)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.message, self.status = message, status
        super().__init__(message)


Body = bytes | Callable[[], AsyncIterator[bytes]] | None


def _strip_scheme(host: str) -> tuple[str, str | None]:
    for scheme in ("http", "https"):
        if host.lower().startswith(scheme + "://"):
            return host[len(scheme) + 3 :].rstrip("/"), scheme
    return host, None


def _tls_verify_failure(exc: BaseException) -> str | None:
    """The certificate-verification reason hidden in *exc*'s cause chain, if that is what failed."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return e.verify_message or str(e)
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            return str(e)
        e = e.__cause__ or e.__context__
    return None


def _error_detail(body: bytes) -> tuple[str, str]:
    """(code, message) of an OCI error body ``{"errors":[{"code","message"}]}``, best effort."""
    try:
        doc = json.loads(body)
        first = doc["errors"][0]
        return str(first.get("code", "")), str(first.get("message", ""))
    except Exception:  # an HTML error page, empty body, anything: no detail
        text = body[:200].decode("utf-8", "replace").strip()
        return "", text


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def _pull(repository: str) -> str:
    return f"repository:{repository}:pull"


def _push(repository: str) -> str:
    return f"repository:{repository}:pull,push"


class RegistryClient:
    """An OCI distribution client with pooled connections; use ``async with`` or ``aclose()``.

    *registries* configures hosts (TLS, plain HTTP, mirrors); unlisted hosts get
    HTTPS verified against the system CAs. *credentials* defaults to none
    (anonymous). *clock* (seconds, monotonic) decides token expiry.
    """

    def __init__(
        self,
        registries: Iterable[RegistryConfig] = (),
        credentials: Credentials | None = None,
        *,
        retry: RetryPolicy = RetryPolicy(),
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_connections: int = 64,
        max_keepalive_connections: int = 16,
        user_agent: str = "lazyfs/0.1",
        trust_env: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = credentials if credentials is not None else Credentials(None)
        self.retry = retry
        self._clock = clock
        self._configs: dict[str, RegistryConfig] = {}
        for cfg in registries:
            if cfg.host in self._configs:
                raise ConfigError(f"registry config: {cfg.host} configured twice")
            self._configs[cfg.host] = cfg
        # Mirrors inherit TLS settings from their registry unless configured themselves.
        self._effective: dict[str, RegistryConfig] = dict(self._configs)
        for cfg in self._configs.values():
            for m in cfg.mirrors:
                host, scheme = _strip_scheme(m)
                if host not in self._effective:
                    plain = cfg.plain_http if scheme is None else scheme == "http"
                    self._effective[host] = RegistryConfig(host, plain_http=plain, ca_file=cfg.ca_file)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive_connections)
        contexts: dict[str | None, ssl.SSLContext] = {}
        mounts: dict[str, httpx.AsyncBaseTransport] = {}
        for host, cfg in self._effective.items():
            if cfg.plain_http or cfg.ca_file is None:
                continue
            if cfg.ca_file not in contexts:
                try:
                    contexts[cfg.ca_file] = ssl.create_default_context(cafile=cfg.ca_file)
                except (OSError, ssl.SSLError) as e:
                    raise ConfigError(f"registry {host}: ca_file {cfg.ca_file}: cannot load: {e}") from None
            mounts[f"https://{host}"] = httpx.AsyncHTTPTransport(
                verify=contexts[cfg.ca_file], limits=limits, retries=0
            )
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(verify=ssl.create_default_context(), limits=limits, retries=0),
            mounts=mounts,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            headers={"User-Agent": user_agent},
            trust_env=trust_env,
            follow_redirects=False,
        )
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], _Token] = {}
        self._token_locks: dict[tuple[str, tuple[str, ...]], trio.Lock] = {}
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

    def statistics(self) -> RegistryStatistics:
        s = self._stats
        return RegistryStatistics(
            requests=s.requests,
            retries=s.retries,
            failovers=s.failovers,
            token_requests=s.token_requests,
            auth_challenges=s.auth_challenges,
            credential_reloads=self.credentials.reloads,
            bytes_received=s.bytes_received,
            bytes_sent=s.bytes_sent,
        )

    # --- configuration --------------------------------------------------------------------------

    def config_for(self, host: str) -> RegistryConfig:
        """The effective configuration of *host* (defaults: HTTPS, system CAs, no mirrors)."""
        return self._effective.get(host) or RegistryConfig(host)

    def _endpoint(self, host: str) -> _Endpoint:
        cfg = self.config_for(host)
        netloc = "registry-1.docker.io" if host == "docker.io" else host
        return _Endpoint(host, f"{'http' if cfg.plain_http else 'https'}://{netloc}")

    def sources(self, registry: str) -> tuple[str, ...]:
        """Where blob reads for *registry* go, in order: its mirrors, then itself."""
        mirrors = tuple(_strip_scheme(m)[0] for m in self.config_for(registry).mirrors)
        return mirrors + (registry,)

    # --- retries and deadlines ------------------------------------------------------------------

    async def _call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run *attempt* until it succeeds, retrying _Transient failures within the policy."""
        last: _Transient | None = None
        seen: list[str] = []  # each distinct failure, for the final message
        status: int | None = None  # the last HTTP status seen (a later reset has none)
        with trio.move_on_after(self.retry.deadline):
            for n in range(1, self.retry.attempts + 1):
                try:
                    return await attempt()
                except _Transient as e:
                    last = e
                    status = e.status if e.status is not None else status
                    if e.message not in seen:
                        seen.append(e.message)
                if n < self.retry.attempts:
                    self._stats.retries += 1
                    await trio.sleep(self.retry.delay(n))
            assert last is not None
            others = [m for m in seen if m != last.message]
            before = f"; earlier: {'; '.join(others)}" if others else ""
            raise FetchError(
                f"{what}: {last.message} (gave up after {self.retry.attempts} attempts{before})", status
            )
        cause = f"; last error: {last.message}" if last is not None else ""
        raise FetchError(f"{what}: no success within the {self.retry.deadline:g} s deadline{cause}", status)

    async def _from_sources(
        self, what: str, registry: str, exclude: Collection[str], attempt: Callable[[_Endpoint], Awaitable[T]]
    ) -> T:
        """Run *attempt* against each blob source in order until one succeeds; retry rounds
        while any failure was transient. NotFoundError only if every source said so."""
        hosts = [h for h in self.sources(registry) if h not in exclude]
        if not hosts:
            raise FetchError(f"{what}: every source is excluded ({', '.join(self.sources(registry))})")
        endpoints = [self._endpoint(h) for h in hosts]

        async def one_round() -> T:
            transient: list[str] = []
            permanent: list[BaseException] = []
            missing = 0
            status = None
            for i, ep in enumerate(endpoints):
                if i:
                    self._stats.failovers += 1
                try:
                    return await attempt(ep)
                except _Transient as e:
                    transient.append(f"{ep.host}: {e.message}")
                    status = e.status
                except NotFoundError as e:
                    missing += 1
                    permanent.append(e)
                except (FetchError, IntegrityError) as e:  # AuthError is a FetchError
                    permanent.append(e)
            if transient:
                raise _Transient("; ".join(transient), status)
            if missing == len(endpoints):
                raise NotFoundError(f"{what}: not found on {', '.join(hosts)}")
            if len(permanent) == 1:
                raise permanent[0]
            raise next(e for e in reversed(permanent) if not isinstance(e, NotFoundError))

        return await self._call(what, one_round)

    # --- one HTTP exchange ----------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        ep: _Endpoint,
        url: str | httpx.URL,
        headers: dict[str, str],
        body: Body,
        follow_redirects: bool,
    ) -> httpx.Response:
        """Send one request, streaming the response; translate transport failures."""
        content: bytes | AsyncIterator[bytes] | None = body() if callable(body) else body
        if isinstance(content, bytes):
            self._stats.bytes_sent += len(content)
        self._stats.requests += 1
        try:
            request = self._http.build_request(method, url, headers=headers, content=content)
            return await self._http.send(request, stream=True, follow_redirects=follow_redirects)
        except httpx.TimeoutException as e:
            raise _Transient(f"{method} {url}: timed out ({type(e).__name__})") from None
        except httpx.ConnectError as e:
            reason = _tls_verify_failure(e)
            if reason is not None:
                raise FetchError(
                    f"{ep.host}: TLS certificate verification failed ({reason}); "
                    "give this registry a ca_file that signs its certificate"
                ) from None
            raise _Transient(f"cannot connect to {ep.base_url}: {e}") from None
        except httpx.TooManyRedirects as e:
            raise FetchError(f"{method} {url}: {e}") from None
        except httpx.TransportError as e:
            raise _Transient(f"{method} {url}: {type(e).__name__}: {e}") from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as e:
            raise FetchError(f"{method} {url}: {type(e).__name__}: {e}") from None

    async def _request(
        self,
        method: str,
        ep: _Endpoint,
        url: str | httpx.URL,
        *,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None = None,
        body: Body = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """An authenticated exchange: the caller owns (and must ``aclose``) the streamed response.

        On a 401: remember the challenge, re-read the credentials, get fresh
        authorization and send once more; a second 401 is an AuthError.
        """
        hdrs = dict(headers or {})
        auth = await self._authorization(ep, scopes, ())
        if auth:
            hdrs["Authorization"] = auth
        response = await self._send(method, ep, url, hdrs, body, follow_redirects)
        if response.status_code != 401:
            return response
        header = response.headers.get("www-authenticate", "")
        await response.aclose()
        self._stats.auth_challenges += 1
        if not header:
            raise AuthError(f"{ep.host}: 401 Unauthorized without a WWW-Authenticate challenge", 401)
        try:
            challenge = parse_www_authenticate(header)
        except FormatError as e:
            raise AuthError(f"{ep.host}: unusable auth challenge: {e}", 401) from None
        self._challenges[ep.host] = challenge
        self.credentials.reload()  # rotated credentials take effect without a restart
        self._drop_token(ep.host, scopes, auth)
        auth = await self._authorization(ep, scopes, challenge.scopes)
        if auth is None:
            raise AuthError(
                f"registry {ep.host} requires authentication and {self.credentials.source()} "
                f"has no credentials for it",
                401,
            )
        hdrs["Authorization"] = auth
        response = await self._send(method, ep, url, hdrs, body, follow_redirects)
        if response.status_code == 401:
            await response.aclose()
            self._drop_token(ep.host, scopes, auth)
            raise AuthError(self._refused(ep.host, challenge, scopes), 401)
        return response

    def _drop_token(self, host: str, scopes: tuple[str, ...], sent: str | None) -> None:
        """Forget the cached token if it is the one a refused request carried (a concurrent
        request may already have replaced it with a fresh one, which must stay)."""
        cached = self._tokens.get((host, scopes))
        if cached is not None and sent == f"Bearer {cached.value}":
            del self._tokens[(host, scopes)]

    def _refused(self, host: str, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        cred = self.credentials.lookup(host)
        who = f"user {cred.username!r}" if cred is not None and cred.username else "anonymous access"
        if challenge.scheme == "basic":
            return f"registry {host} rejected the credentials of {who} (from {self.credentials.source()})"
        return (
            f"registry {host} refused the token issued for {who} (from {self.credentials.source()}) "
            f"for {' '.join(scopes)}: access denied"
        )

    # --- authentication -------------------------------------------------------------------------

    async def _authorization(self, ep: _Endpoint, scopes: tuple[str, ...], extra: tuple[str, ...]) -> str | None:
        """The Authorization header value for *ep*, or None to go anonymous."""
        challenge = self._challenges.get(ep.host)
        if challenge is None:
            return None
        cred = self.credentials.lookup(ep.host)
        if challenge.scheme == "basic":
            if cred is None or not cred.username:
                return None
            pair = f"{cred.username}:{cred.password}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        if challenge.scheme == "bearer":
            return "Bearer " + await self._bearer_token(ep, challenge, scopes, extra, cred)
        raise AuthError(f"registry {ep.host}: unsupported auth scheme {challenge.scheme!r}", 401)

    async def _bearer_token(
        self,
        ep: _Endpoint,
        challenge: Challenge,
        scopes: tuple[str, ...],
        extra: tuple[str, ...],
        cred: Credential | None,
    ) -> str:
        key = (ep.host, scopes)
        cached = self._tokens.get(key)
        if cached is not None and self._clock() < cached.expires:
            return cached.value
        lock = self._token_locks.setdefault(key, trio.Lock())
        async with lock:  # concurrent requests for one scope share one token fetch
            cached = self._tokens.get(key)
            if cached is not None and self._clock() < cached.expires:
                return cached.value
            wanted = tuple(dict.fromkeys(scopes + extra))
            token = await self._fetch_token(ep, challenge, wanted, cred)
            self._tokens[key] = token
            return token.value

    async def _fetch_token(
        self, ep: _Endpoint, challenge: Challenge, scopes: tuple[str, ...], cred: Credential | None
    ) -> _Token:
        realm = challenge.get("realm")
        if not realm:
            raise AuthError(f"registry {ep.host}: Bearer challenge without a realm", 401)
        try:
            realm_url = httpx.URL(realm)
        except (httpx.InvalidURL, TypeError) as e:
            raise AuthError(f"registry {ep.host}: bad token realm {realm!r}: {e}", 401) from None
        if realm_url.scheme not in ("http", "https"):
            raise AuthError(f"registry {ep.host}: token realm {realm!r} is not http(s)", 401)
        realm_host = realm_url.netloc.decode("ascii")
        if (
            cred is not None
            and realm_url.scheme == "http"
            and not self.config_for(ep.host).plain_http
            and not self.config_for(realm_host).plain_http
        ):
            raise AuthError(
                f"registry {ep.host}: refusing to send credentials to plain-HTTP token realm {realm}; "
                f"configure {realm_host} as plain_http if that is intended",
                401,
            )
        service = challenge.get("service")
        token_ep = _Endpoint(realm_host, f"{realm_url.scheme}://{realm_host}")
        headers: dict[str, str] = {"Accept": "application/json"}
        started = self._clock()
        if cred is not None and cred.identity_token:
            # OAuth2 refresh-token grant (what docker does with an identitytoken).
            form = {"grant_type": "refresh_token", "refresh_token": cred.identity_token, "client_id": "lazyfs"}
            if service:
                form["service"] = service
            if scopes:
                form["scope"] = " ".join(scopes)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            method, url, body = "POST", realm_url, urlencode(form).encode()
        else:
            params: list[tuple[str, str]] = []
            if service:
                params.append(("service", service))
            params.extend(("scope", s) for s in scopes)
            if cred is not None and cred.username:
                params.append(("account", cred.username))
                pair = f"{cred.username}:{cred.password}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
            method, url, body = "GET", realm_url.copy_merge_params(params), None
        self._stats.token_requests += 1
        response = await self._send(method, token_ep, url, headers, body, follow_redirects=False)
        try:
            status = response.status_code
            if status in (401, 403):
                who = f"user {cred.username!r}" if cred is not None and cred.username else "anonymous access"
                raise AuthError(
                    f"token server {realm} refused {who} (from {self.credentials.source()}) "
                    f"for registry {ep.host}: HTTP {status}",
                    status,
                )
            if status == 429 or status >= 500:
                raise _Transient(f"token server {realm}: HTTP {status}", status)
            if status != 200:
                raise AuthError(f"token server {realm}: unexpected HTTP {status}", status)
            raw = await self._read_body(response, _MAX_TOKEN_BODY, f"token from {realm}")
        finally:
            await response.aclose()
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise AuthError(f"token server {realm}: answer is not JSON") from None
        value = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value or any(c.isspace() for c in value):
            raise AuthError(f"token server {realm}: answer has no usable 'token'")
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = _DEFAULT_TOKEN_LIFETIME
        # Renew a little early so a token does not expire between check and use.
        margin = min(10.0, lifetime * 0.1)
        return _Token(value, started + lifetime - margin)

    # --- response helpers -----------------------------------------------------------------------

    async def _read_body(self, response: httpx.Response, limit: int, what: str) -> bytes:
        """The whole body, refusing more than *limit* bytes (FetchError) before or while reading."""
        declared = response.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise FetchError(f"{what}: bad Content-Length {declared!r}", response.status_code)
            if int(declared) > limit:
                raise FetchError(f"{what}: {declared} bytes, more than the {limit} expected", response.status_code)
        parts: list[bytes] = []
        total = 0
        try:
            async for piece in response.aiter_bytes():
                total += len(piece)
                if total > limit:
                    raise FetchError(f"{what}: more than the {limit} bytes expected", response.status_code)
                parts.append(piece)
        except httpx.TimeoutException:
            raise _Transient(f"{what}: timed out reading the body") from None
        except (httpx.TransportError, httpx.DecodingError) as e:
            raise _Transient(f"{what}: body cut short: {type(e).__name__}: {e}") from None
        finally:
            self._stats.bytes_received += total
        return b"".join(parts)

    async def _fail(self, response: httpx.Response, what: str) -> None:
        """Raise the error an unexpected answer stands for (the caller closes *response*)."""
        status = response.status_code
        try:
            body = await self._read_body(response, _MAX_ERROR_BODY, what)
        except (FetchError, _Transient):
            body = b""
        code, message = _error_detail(body)
        detail = f" ({code}: {message})" if code else (f" ({message})" if message else "")
        if status == 404:
            raise NotFoundError(f"{what}: not found{detail}")
        if status in (401, 403):
            raise AuthError(f"{what}: access denied, HTTP {status}{detail}", status)
        if status == 429 or (status >= 500 and status not in (501, 505)):
            raise _Transient(f"HTTP {status}{detail}", status)
        if code == "DIGEST_INVALID":
            raise IntegrityError(what, "the digest we sent", f"registry says: {message or 'DIGEST_INVALID'}")
        raise FetchError(f"{what}: unexpected HTTP {status}{detail}", status)

    def _repo(self, repo: Reference | str) -> Reference:
        if isinstance(repo, Reference):
            return repo
        return parse_reference(repo)

    # --- manifests ------------------------------------------------------------------------------

    async def get_manifest(
        self, ref: Reference | str, accept: Iterable[str] = MANIFEST_MEDIA_TYPES
    ) -> tuple[bytes, str, str]:
        """``(bytes, media_type, digest)`` of the manifest *ref* names (by digest if it has one,
        else by tag, else ``latest``). Fetched by digest, the bytes are verified (IntegrityError)."""
        ref = self._repo(ref)
        ep = self._endpoint(ref.registry)
        url = f"{ep.base_url}/v2/{ref.repository}/manifests/{ref.reference}"
        what = f"manifest {ref}"
        headers = {"Accept": ", ".join(accept)}

        async def attempt() -> tuple[bytes, str, str]:
            response = await self._request(
                "GET", ep, url, scopes=(_pull(ref.repository),), headers=headers, follow_redirects=True
            )
            try:
                if response.status_code != 200:
                    await self._fail(response, what)
                data = await self._read_body(response, MAX_MANIFEST_SIZE, what)
                headers_ = response.headers
                return data, headers_.get("content-type", ""), headers_.get("docker-content-digest", "")
            finally:
                await response.aclose()

        data, content_type, header_digest = await self._call(what, attempt)
        # Hash with the algorithm the caller (or else the registry) named; sha256 by default.
        algorithm = (ref.digest or header_digest or "sha256:").partition(":")[0]
        if algorithm not in ("sha256", "sha512"):
            algorithm = "sha256"
        digest = await trio.to_thread.run_sync(digest_of, data, algorithm)
        if ref.digest is not None and digest != ref.digest:
            raise IntegrityError(what, ref.digest, digest, ep.host)
        if header_digest and header_digest.partition(":")[0] == algorithm and header_digest != digest:
            raise IntegrityError(f"{what} (Docker-Content-Digest)", header_digest, digest, ep.host)
        return data, _media_type(content_type, data, what), digest

    async def head_manifest(
        self, ref: Reference | str, accept: Iterable[str] = MANIFEST_MEDIA_TYPES
    ) -> tuple[str, str, int]:
        """``(media_type, digest, size)`` of the manifest *ref* names, without its body
        (falls back to a GET when the registry does not send ``Docker-Content-Digest``)."""
        ref = self._repo(ref)
        ep = self._endpoint(ref.registry)
        url = f"{ep.base_url}/v2/{ref.repository}/manifests/{ref.reference}"
        what = f"manifest {ref}"
        headers = {"Accept": ", ".join(accept)}

        async def attempt() -> tuple[str, str, int] | None:
            response = await self._request(
                "HEAD", ep, url, scopes=(_pull(ref.repository),), headers=headers, follow_redirects=True
            )
            try:
                if response.status_code != 200:
                    await self._fail(response, what)
                digest = response.headers.get("docker-content-digest")
                size = response.headers.get("content-length", "")
                media = response.headers.get("content-type", "").split(";")[0].strip()
                if not digest or not size.isdigit() or not media:
                    return None
                return media, check_digest(digest, f"{what}: Docker-Content-Digest"), int(size)
            except FormatError as e:
                raise FetchError(str(e)) from None
            finally:
                await response.aclose()

        found = await self._call(what, attempt)
        if found is not None:
            if ref.digest is not None and found[1] != ref.digest:
                raise IntegrityError(what, ref.digest, found[1], ep.host)
            return found
        data, media_type, digest = await self.get_manifest(ref, accept)
        return media_type, digest, len(data)

    async def put_manifest(self, ref: Reference | str, data: bytes, media_type: str) -> str:
        """Store *data* as a manifest under *ref*'s tag (or its digest if it has no tag); the digest.

        If *ref* carries a digest it must be the digest of *data* (IntegrityError).
        """
        ref = self._repo(ref)
        if len(data) > MAX_MANIFEST_SIZE:
            raise FormatError(f"manifest for {ref}: {len(data)} bytes, more than {MAX_MANIFEST_SIZE}")
        algorithm = ref.digest.partition(":")[0] if ref.digest else "sha256"
        digest = digest_of(data, algorithm)
        if ref.digest is not None and ref.digest != digest:
            raise IntegrityError(f"manifest for {ref}", ref.digest, digest)
        target = ref.tag or digest
        ep = self._endpoint(ref.registry)
        url = f"{ep.base_url}/v2/{ref.repository}/manifests/{target}"
        what = f"put manifest {ref.name}:{target}" if ref.tag else f"put manifest {ref.name}@{digest}"

        async def attempt() -> str:
            response = await self._request(
                "PUT", ep, url, scopes=(_push(ref.repository),), headers={"Content-Type": media_type}, body=data
            )
            try:
                if response.status_code not in (200, 201, 202):
                    await self._fail(response, what)
                return response.headers.get("docker-content-digest", "")
            finally:
                await response.aclose()

        stored = await self._call(what, attempt)
        if stored and stored.partition(":")[0] == algorithm and stored != digest:
            raise IntegrityError(what, digest, stored, ep.host)
        return digest

    async def list_tags(self, repo: Reference | str, *, page_size: int | None = None) -> list[str]:
        """Every tag of *repo*, following ``Link: <…>; rel="next"`` pages (of *page_size* tags
        if given, else the registry's default)."""
        ref = self._repo(repo)
        ep = self._endpoint(ref.registry)
        what = f"tags of {ref.name}"
        url: httpx.URL | None = httpx.URL(f"{ep.base_url}/v2/{ref.repository}/tags/list")
        if page_size is not None:
            if page_size <= 0:
                raise ConfigError(f"list_tags: page_size must be positive, got {page_size}")
            url = url.copy_merge_params({"n": str(page_size)})
        tags: list[str] = []
        for _ in range(_MAX_TAG_PAGES):
            if url is None:
                return tags
            page_url = url

            async def attempt() -> tuple[list[str], httpx.URL | None]:
                response = await self._request("GET", ep, page_url, scopes=(_pull(ref.repository),))
                try:
                    if response.status_code != 200:
                        await self._fail(response, what)
                    body = await self._read_body(response, MAX_MANIFEST_SIZE, what)
                    link = _LINK_NEXT.search(response.headers.get("link", ""))
                    try:
                        following = response.url.join(link.group(1)) if link else None
                    except httpx.InvalidURL as e:
                        raise FetchError(f"{what}: bad Link header: {e}") from None
                    return _parse_tags(body, what), following
                finally:
                    await response.aclose()

            page, url = await self._call(what, attempt)
            tags.extend(page)
        raise FetchError(f"{what}: more than {_MAX_TAG_PAGES} pages")

    # --- blob reads (mirrors first) -------------------------------------------------------------

    async def blob_size(self, repo: Reference | str, digest: str, *, exclude: Collection[str] = ()) -> int:
        """The size of blob *digest* in *repo* (HEAD), NotFoundError if no source has it."""
        ref = self._repo(repo)
        check_digest(digest)
        what = f"blob {digest} in {ref.name}"

        async def attempt(ep: _Endpoint) -> int:
            url = f"{ep.base_url}/v2/{ref.repository}/blobs/{digest}"
            response = await self._request("HEAD", ep, url, scopes=(_pull(ref.repository),), follow_redirects=True)
            try:
                if response.status_code != 200:
                    await self._fail(response, f"{what} at {ep.host}")
                size = response.headers.get("content-length", "")
                if not size.isdigit():
                    raise FetchError(f"{what} at {ep.host}: HEAD without a usable Content-Length ({size!r})")
                answered = response.headers.get("docker-content-digest")
                if answered and answered != digest:
                    raise IntegrityError(what, digest, answered, ep.host)
                return int(size)
            finally:
                await response.aclose()

        return await self._from_sources(what, ref.registry, exclude, attempt)

    async def read_range(
        self, repo: Reference | str, digest: str, offset: int, length: int, *, exclude: Collection[str] = ()
    ) -> bytes:
        """Exactly *length* bytes of blob *digest* from *offset* (one ``Range`` GET).

        FetchError if a source returns fewer or more bytes, or ignores the range
        (a 200 is accepted only when it is exactly the requested bytes, i.e. the
        range is the whole blob). *exclude* skips sources by ``host[:port]``.
        """
        return (await self.read_range_from(repo, digest, offset, length, exclude=exclude)).data

    async def read_range_from(
        self, repo: Reference | str, digest: str, offset: int, length: int, *, exclude: Collection[str] = ()
    ) -> SourcedBytes:
        """``read_range`` that also says which source served the bytes (see module docstring)."""
        ref = self._repo(repo)
        check_digest(digest)
        if offset < 0 or length < 0:
            raise RangeError(f"read_range: negative offset {offset} or length {length}")
        if length == 0:
            return SourcedBytes(b"", self.sources(ref.registry)[0])
        last = offset + length - 1
        what = f"blob {digest} bytes {offset}-{last} in {ref.name}"

        async def attempt(ep: _Endpoint) -> SourcedBytes:
            url = f"{ep.base_url}/v2/{ref.repository}/blobs/{digest}"
            headers = {"Range": f"bytes={offset}-{last}", "Accept-Encoding": "identity"}
            response = await self._request(
                "GET", ep, url, scopes=(_pull(ref.repository),), headers=headers, follow_redirects=True
            )
            where = f"{what} at {ep.host}"
            try:
                status = response.status_code
                if status == 206:
                    _check_content_range(response.headers.get("content-range"), offset, last, where)
                elif status == 200:
                    if offset != 0:
                        raise FetchError(f"{where}: server ignored the Range header (HTTP 200)", 200)
                elif status == 416:
                    raise FetchError(f"{where}: range not satisfiable (beyond the end of the blob)", 416)
                else:
                    await self._fail(response, where)
                try:
                    data = await self._read_body(response, length, where)
                except FetchError as e:
                    if status == 200:  # a whole blob larger than the range
                        raise FetchError(
                            f"{where}: server ignored the Range header (HTTP 200): {e}", 200
                        ) from None
                    raise
            finally:
                await response.aclose()
            if len(data) != length:
                if status == 200:
                    raise FetchError(
                        f"{where}: server ignored the Range header and the blob is {len(data)} bytes", 200
                    )
                raise _Transient(f"{where}: short read, {len(data)} of {length} bytes", status)
            return SourcedBytes(data, ep.host)

        return await self._from_sources(what, ref.registry, exclude, attempt)

    async def get_blob(
        self,
        repo: Reference | str,
        digest: str,
        *,
        max_size: int = MAX_BLOB_IN_MEMORY,
        exclude: Collection[str] = (),
    ) -> bytes:
        """The whole blob, verified against *digest* (IntegrityError); at most *max_size* bytes."""
        ref = self._repo(repo)
        check_digest(digest)
        what = f"blob {digest} in {ref.name}"

        async def attempt(ep: _Endpoint) -> bytes:
            url = f"{ep.base_url}/v2/{ref.repository}/blobs/{digest}"
            response = await self._request(
                "GET", ep, url, scopes=(_pull(ref.repository),), headers={"Accept-Encoding": "identity"},
                follow_redirects=True,
            )
            try:
                if response.status_code != 200:
                    await self._fail(response, f"{what} at {ep.host}")
                data = await self._read_body(response, max_size, f"{what} at {ep.host}")
            finally:
                await response.aclose()
            got = await trio.to_thread.run_sync(digest_of, data, digest.partition(":")[0])
            if got != digest:
                raise IntegrityError(f"blob {digest}", digest, got, ep.host)
            return data

        return await self._from_sources(what, ref.registry, exclude, attempt)

    async def get_blob_to_file(
        self, repo: Reference | str, digest: str, dest: str | os.PathLike, *, exclude: Collection[str] = ()
    ) -> int:
        """Stream the blob into *dest* (written to a temporary file beside it, verified, then
        renamed into place; nothing is left behind on failure). Returns its size."""
        ref = self._repo(repo)
        check_digest(digest)
        dest = Path(dest)
        what = f"blob {digest} in {ref.name}"

        async def attempt(ep: _Endpoint) -> int:
            url = f"{ep.base_url}/v2/{ref.repository}/blobs/{digest}"
            tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}-{random.getrandbits(32):08x}")
            hasher = hasher_for(digest)
            size = 0
            response = await self._request(
                "GET", ep, url, scopes=(_pull(ref.repository),), headers={"Accept-Encoding": "identity"},
                follow_redirects=True,
            )
            try:
                if response.status_code != 200:
                    await self._fail(response, f"{what} at {ep.host}")
                f = await trio.open_file(tmp, "wb")
                try:
                    async with f:
                        try:
                            async for piece in response.aiter_bytes(_COPY_CHUNK):
                                size += len(piece)
                                self._stats.bytes_received += len(piece)
                                hasher.update(piece)
                                await f.write(piece)
                        except httpx.TimeoutException:
                            raise _Transient(f"{what} at {ep.host}: timed out reading the body") from None
                        except (httpx.TransportError, httpx.DecodingError) as e:
                            raise _Transient(f"{what} at {ep.host}: body cut short: {e}") from None
                    got = f"{digest.partition(':')[0]}:{hasher.hexdigest()}"
                    if got != digest:
                        raise IntegrityError(f"blob {digest}", digest, got, ep.host)
                    await trio.Path(tmp).replace(dest)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await trio.Path(tmp).unlink(missing_ok=True)
                    raise
            except OSError as e:
                raise FetchError(f"{what}: cannot write {dest}: {e.strerror or e}") from None
            finally:
                await response.aclose()
            return size

        return await self._from_sources(what, ref.registry, exclude, attempt)

    # --- uploads --------------------------------------------------------------------------------

    async def push_blob(
        self,
        repo: Reference | str,
        data_or_path: bytes | str | os.PathLike,
        digest: str | None = None,
        *,
        chunk_size: int | None = None,
        mount_from: str | None = None,
    ) -> BlobPush:
        """Make blob *digest* (computed if not given) exist in *repo*.

        Skipped if the registry already has it (``"exists"``). With *mount_from*
        (another repository of the same registry) a cross-repository mount is
        tried first (``"mounted"``). Otherwise it is uploaded (``"uploaded"``):
        monolithically (POST, then one PUT) when *chunk_size* is None, else in
        PATCH chunks of *chunk_size* bytes. The registry verifies the digest.
        """
        ref = self._repo(repo)
        if chunk_size is not None and chunk_size <= 0:
            raise ConfigError(f"push_blob: chunk_size must be positive, got {chunk_size}")
        path: Path | None = None
        data: bytes | None = None
        if isinstance(data_or_path, (bytes, bytearray, memoryview)):
            data = bytes(data_or_path)
            size = len(data)
            if digest is None:
                digest = await trio.to_thread.run_sync(digest_of, data)
        else:
            path = Path(data_or_path)
            try:
                size = os.stat(path).st_size
            except OSError as e:
                raise FetchError(f"push_blob: cannot read {path}: {e.strerror or e}") from None
            if digest is None:
                digest = await trio.to_thread.run_sync(_hash_file, path)
        check_digest(digest)
        if mount_from is not None:
            try:
                check_repository(mount_from)
            except FormatError as e:
                raise ConfigError(f"push_blob: mount_from: {e}") from None
        ep = self._endpoint(ref.registry)
        scopes = (_push(ref.repository),) + ((_pull(mount_from),) if mount_from else ())
        what = f"push blob {digest} to {ref.name}"
        blob_url = f"{ep.base_url}/v2/{ref.repository}/blobs/{digest}"

        async def exists() -> bool:
            response = await self._request("HEAD", ep, blob_url, scopes=scopes, follow_redirects=True)
            try:
                if response.status_code == 200:
                    return True
                if response.status_code == 404:
                    return False
                await self._fail(response, what)
                return False
            finally:
                await response.aclose()

        if await self._call(what, exists):
            return BlobPush(digest, size, "exists")

        def chunks() -> Callable[[], AsyncIterator[bytes]]:
            async def gen() -> AsyncIterator[bytes]:
                assert path is not None
                f = await trio.open_file(path, "rb")
                async with f:
                    sent = 0
                    while sent < size:
                        piece = await f.read(min(_COPY_CHUNK, size - sent))
                        if not piece:
                            raise FetchError(f"push_blob: {path} shrank while uploading")
                        sent += len(piece)
                        self._stats.bytes_sent += len(piece)
                        yield piece

            return gen

        async def read_part(start: int, n: int) -> bytes:
            if data is not None:
                return data[start : start + n]

            def read() -> bytes:
                with open(path, "rb") as f:  # type: ignore[arg-type]
                    f.seek(start)
                    return f.read(n)

            part = await trio.to_thread.run_sync(read)
            if len(part) != n:
                raise FetchError(f"push_blob: {path} shrank while uploading")
            return part

        async def upload() -> str:
            start_url = f"{ep.base_url}/v2/{ref.repository}/blobs/uploads/"
            if mount_from:
                start_url += "?" + urlencode({"mount": digest, "from": mount_from})
            response = await self._request("POST", ep, start_url, scopes=scopes, body=b"")
            try:
                if mount_from and response.status_code == 201:
                    return "mounted"
                if response.status_code != 202:
                    await self._fail(response, f"{what}: start upload")
                location = _location(response, what)
            finally:
                await response.aclose()
            if chunk_size is not None and size > 0:
                sent = 0
                while sent < size:
                    n = min(chunk_size, size - sent)
                    part = await read_part(sent, n)
                    headers = {
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{sent}-{sent + n - 1}",
                        "Content-Length": str(n),
                    }
                    response = await self._request(
                        "PATCH", ep, location, scopes=scopes, headers=headers, body=part
                    )
                    try:
                        if response.status_code != 202:
                            await self._fail(response, f"{what}: chunk at {sent}")
                        location = _location(response, what)
                    finally:
                        await response.aclose()
                    sent += n
                final_body: Body = b""
            else:
                final_body = data if data is not None else chunks()
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(0 if final_body == b"" else size),
            }
            put_url = location.copy_merge_params({"digest": digest})
            response = await self._request("PUT", ep, put_url, scopes=scopes, headers=headers, body=final_body)
            try:
                if response.status_code not in (201, 204):
                    await self._fail(response, f"{what}: finish upload")
                stored = response.headers.get("docker-content-digest")
                if stored and stored != digest:
                    raise IntegrityError(what, digest, stored, ep.host)
            finally:
                await response.aclose()
            return "uploaded"

        outcome = await self._call(what, upload)
        return BlobPush(digest, size, outcome)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(_COPY_CHUNK):
            h.update(piece)
    return f"sha256:{h.hexdigest()}"


def _location(response: httpx.Response, what: str) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        status = response.status_code
        raise FetchError(f"{what}: registry answered HTTP {status} without a Location", status)
    try:
        return response.url.join(location)
    except httpx.InvalidURL as e:
        raise FetchError(f"{what}: bad Location {location!r}: {e}") from None


def _check_content_range(header: str | None, first: int, last: int, where: str) -> None:
    if header is None:
        return  # the body length check still applies
    m = _CONTENT_RANGE.match(header.strip())
    if m is None:
        raise FetchError(f"{where}: malformed Content-Range {header!r}", 206)
    a, b, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if total != "*" and last >= int(total):
        raise FetchError(f"{where}: range beyond the end of the blob ({total} bytes)", 206)
    if (a, b) != (first, last):
        raise FetchError(f"{where}: server sent bytes {a}-{b} instead", 206)


def _media_type(content_type: str, data: bytes, what: str) -> str:
    media = content_type.split(";")[0].strip()
    if media and media not in ("application/json", "text/plain", "application/octet-stream"):
        return media
    try:  # no useful Content-Type: the manifest names its own type
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{what}: neither a manifest Content-Type nor JSON") from None
    named = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(named, str) and named:
        return named
    if media:
        return media
    raise FormatError(f"{what}: no media type in the answer or the manifest")


def _parse_tags(body: bytes, what: str) -> list[str]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FetchError(f"{what}: answer is not JSON") from None
    tags = doc.get("tags") if isinstance(doc, dict) else None
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise FetchError(f"{what}: 'tags' is not a list of strings")
    return tags


class RegistryBackend(Backend):
    """The blobs of one repository as a ``Backend``, read through the client's mirrors.

    ``read_range(..., exclude={host})`` / ``read_range_from`` let a verifier retry a
    range that failed its digest check on the next source (see the module docstring).
    The client is shared and not closed by ``aclose`` unless *close_client*.
    """

    def __init__(self, client: RegistryClient, repository: Reference | str, *, close_client: bool = False) -> None:
        self.client = client
        self.repository = client._repo(repository).repo()
        self.name = f"registry {self.repository.name}"
        self._close_client = close_client
        self._sizes: dict[str, int] = {}

    @property
    def sources(self) -> tuple[str, ...]:
        """The ``host[:port]`` of each source, in the order they are tried."""
        return self.client.sources(self.repository.registry)

    async def read_range(self, blob: str, offset: int, length: int, *, exclude: Collection[str] = ()) -> bytes:
        return await self.client.read_range(self.repository, blob, offset, length, exclude=exclude)

    async def read_range_from(
        self, blob: str, offset: int, length: int, *, exclude: Collection[str] = ()
    ) -> SourcedBytes:
        """The bytes and the source that served them; pass that source in *exclude* to retry elsewhere."""
        return await self.client.read_range_from(self.repository, blob, offset, length, exclude=exclude)

    async def blob_size(self, blob: str) -> int:
        size = self._sizes.get(blob)
        if size is None:
            size = self._sizes[blob] = await self.client.blob_size(self.repository, blob)
        return size

    async def aclose(self) -> None:
        if self._close_client:
            await self.client.aclose()
