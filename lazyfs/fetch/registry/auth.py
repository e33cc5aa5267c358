"""Registry authentication: the challenge -> token -> resend flow.

``AuthCore`` is the protocol, as pure code: challenges in; an ``Authorization`` value, or
a description of the token request to make, out. It remembers each host's last challenge
and caches tokens per ``(host, scopes)`` until shortly before they expire, both in
bounded LRU maps. It knows nothing of sockets, files or trio.

``RegistryAuth`` is the thin ``httpx.Auth`` flow that drives it for one request:

1. authorize up front when the host's challenge is known (Basic, or a cached or fresh
   Bearer token: concurrent requests needing the same token share one token request);
2. send; on a 401, remember the challenge, drop the token that was refused, re-read the
   credentials, and authorize again with the scopes the challenge asks for (scope
   widening), then resend once; a second 401 is final.

A request whose body cannot be replayed (a streamed upload) is not resent: the caller's
retry layer repeats the whole exchange, which then starts with a fresh token.

Credentials never go to a plain-HTTP token realm unless that host (or the registry) is
configured as plain HTTP; secrets never appear in messages.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from urllib.parse import urlencode

import cachetools
import httpx
import trio

from lazyfs.errors import AuthError, FormatError
from lazyfs.fetch.credentials import Credential, Credentials
from lazyfs.fetch.registry.retry import Transient, parse_retry_after
from lazyfs.fetch.registry.transport import BODY_LIMIT, BodyTooLarge
from lazyfs.format.reference import Challenge, parse_www_authenticate

DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token server does not say (distribution spec)
MAX_TOKEN_BODY = 1 << 20
MAX_HOSTS = 256
MAX_TOKENS = 1024
MAX_TOKEN_WAITS = 3

TokenKey = tuple[str, tuple[str, ...]]  # (host, scopes asked for)


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def basic(cred: Credential) -> str:
    return "Basic " + base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode("ascii")


def who(cred: Credential | None) -> str:
    return f"user {cred.username!r}" if cred is not None and cred.username else "anonymous access"


@dataclass(frozen=True, slots=True)
class TokenFetch:
    """A token request to make: the HTTP request, and what it is for."""

    key: TokenKey
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    realm: str
    who: str

    def __repr__(self) -> str:  # the headers and body carry secrets
        return f"TokenFetch({self.method} {self.realm}, key={self.key!r}, for {self.who})"


@dataclass(slots=True)
class _Token:
    value: str
    expires: float  # on the core's clock


class AuthCore:
    """Challenges and tokens per host; every method is pure (*now* is passed in).

    *plain_http(host)* says whether a host is configured for plain HTTP, which is what
    allows sending credentials to a plain-HTTP token realm.
    """

    def __init__(self, plain_http: Callable[[str], bool] = lambda host: False, *,
                 max_hosts: int = MAX_HOSTS, max_tokens: int = MAX_TOKENS) -> None:
        self.plain_http = plain_http
        self._challenges: cachetools.LRUCache[str, Challenge] = cachetools.LRUCache(max_hosts)
        self._tokens: cachetools.LRUCache[TokenKey, _Token] = cachetools.LRUCache(max_tokens)

    def challenge(self, host: str) -> Challenge | None:
        return self._challenges.get(host)

    def authorize(self, host: str, scopes: tuple[str, ...], cred: Credential | None, now: float,
                  extra: tuple[str, ...] = ()) -> str | TokenFetch | None:
        """The ``Authorization`` value for a request to *host* needing *scopes*; None to go
        anonymous; or the token request to make first."""
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return basic(cred) if cred is not None and cred.username else None
        if challenge.scheme != "bearer":
            raise AuthError(f"registry {host}: unsupported auth scheme {challenge.scheme!r}", 401)
        token = self._tokens.get((host, scopes))
        if token is not None and now < token.expires:
            return f"Bearer {token.value}"
        return self._token_fetch(host, challenge, scopes, extra, cred)

    def _token_fetch(self, host: str, challenge: Challenge, scopes: tuple[str, ...], extra: tuple[str, ...],
                     cred: Credential | None) -> TokenFetch:
        realm = challenge.get("realm")
        if not realm:
            raise AuthError(f"registry {host}: Bearer challenge without a realm", 401)
        try:
            url = httpx.URL(realm)
        except (httpx.InvalidURL, TypeError) as e:
            raise AuthError(f"registry {host}: bad token realm {realm!r}: {e}", 401) from None
        if url.scheme not in ("http", "https") or not url.host:
            raise AuthError(f"registry {host}: token realm {realm!r} is not an http(s) URL", 401)
        realm_host = url.netloc.decode("ascii")
        if cred is not None and url.scheme == "http" and not self.plain_http(host) and not self.plain_http(realm_host):
            raise AuthError(
                f"registry {host}: refusing to send credentials to plain-HTTP token realm {realm}; "
                f"configure {realm_host} as plain_http if that is intended",
                401,
            )
        wanted = tuple(dict.fromkeys(scopes + extra))
        service = challenge.get("service")
        headers = [("Accept", "application/json")]
        if cred is not None and cred.identity_token:
            # OAuth2 refresh-token grant (what docker does with an identitytoken)
            form = {"grant_type": "refresh_token", "refresh_token": cred.identity_token, "client_id": "lazyfs"}
            if service:
                form["service"] = service
            if wanted:
                form["scope"] = " ".join(wanted)
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
            return TokenFetch((host, scopes), "POST", str(url), tuple(headers), urlencode(form).encode(), realm, who(cred))
        params: list[tuple[str, str]] = [("service", service)] if service else []
        params.extend(("scope", s) for s in wanted)
        if cred is not None and cred.username:
            params.append(("account", cred.username))
            headers.append(("Authorization", basic(cred)))
        return TokenFetch((host, scopes), "GET", str(url.copy_merge_params(params)), tuple(headers), None, realm,
                          who(cred))

    def token_received(self, fetch: TokenFetch, status: int, body: bytes, started: float, *,
                       source: str = "", retry_after: float | None = None) -> str:
        """Store the token the realm answered *fetch* with; the ``Authorization`` value.

        AuthError for a refusal or an unusable answer; Transient for 429 and 5xx."""
        host = fetch.key[0]
        if status in (401, 403):
            from_ = f" (from {source})" if source else ""
            raise AuthError(f"token server {fetch.realm} refused {fetch.who}{from_} for registry {host}: HTTP {status}",
                            status)
        if status == 429 or status >= 500:
            raise Transient(f"token server {fetch.realm}: HTTP {status}", status, retry_after)
        if status != 200:
            raise AuthError(f"token server {fetch.realm}: unexpected HTTP {status}", status)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise AuthError(f"token server {fetch.realm}: answer is not JSON") from None
        value = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value or any(c.isspace() for c in value):
            raise AuthError(f"token server {fetch.realm}: answer has no usable 'token'")
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        margin = min(10.0, lifetime * 0.1)  # renew early so a token does not expire between check and use
        self._tokens[fetch.key] = _Token(value, started + lifetime - margin)
        return f"Bearer {value}"

    def challenged(self, host: str, www_authenticate: str, scopes: tuple[str, ...], sent: str | None) -> Challenge:
        """A 401 from *host*: remember its challenge and forget the token that was refused
        (unless a concurrent request already replaced it with a fresh one)."""
        if not www_authenticate:
            raise AuthError(f"{host}: 401 Unauthorized without a WWW-Authenticate challenge", 401)
        try:
            challenge = parse_www_authenticate(www_authenticate)
        except FormatError as e:
            raise AuthError(f"{host}: unusable auth challenge: {e}", 401) from None
        self._challenges[host] = challenge
        self.drop_token(host, scopes, sent)
        return challenge

    def drop_token(self, host: str, scopes: tuple[str, ...], sent: str | None) -> None:
        cached = self._tokens.get((host, scopes))
        if cached is not None and sent == f"Bearer {cached.value}":
            del self._tokens[(host, scopes)]

    def refused(self, host: str, scopes: tuple[str, ...], cred: Credential | None, source: str) -> str:
        """The message for a request refused even with fresh authorization."""
        challenge = self._challenges.get(host)
        if challenge is not None and challenge.scheme == "basic":
            return f"registry {host} rejected the credentials of {who(cred)} (from {source})"
        return (f"registry {host} refused the token issued for {who(cred)} (from {source}) "
                f"for {' '.join(scopes)}: access denied")

    def statistics(self) -> dict[str, int]:
        return {"hosts": len(self._challenges), "tokens": len(self._tokens)}


@dataclass(slots=True)
class AuthCounters:
    token_requests: int = 0
    auth_challenges: int = 0


class AuthState:
    """What every request's flow shares: the core, the credentials, token fetches in flight."""

    def __init__(self, core: AuthCore, credentials: Credentials, clock: Callable[[], float]) -> None:
        self.core, self.credentials, self.clock = core, credentials, clock
        self.counters = AuthCounters()
        self.flights: dict[TokenKey, trio.Event] = {}  # token requests in flight; bounded by them


class RegistryAuth(httpx.Auth):
    """The auth flow of one request to *host* needing *scopes* (see the module docstring).

    Afterwards ``refused`` says a 401 was final, ``unreplayed`` that a 401 came for a body
    that could not be resent, and ``credential`` is what was used (for messages).
    """

    def __init__(self, state: AuthState, host: str, scopes: tuple[str, ...]) -> None:
        self.state, self.host, self.scopes = state, host, scopes
        self.refused = False
        self.unreplayed = False
        self.credential: Credential | None = None

    def sync_auth_flow(self, request: httpx.Request):  # pragma: no cover - the client is async only
        raise RuntimeError("RegistryAuth works with httpx.AsyncClient only")

    async def _authorization(self, extra: tuple[str, ...]) -> AsyncGenerator[httpx.Request | str | None, httpx.Response]:
        """Yields token requests to send (receiving their responses), then the header value."""
        st = self.state
        for _ in range(MAX_TOKEN_WAITS):
            cred = await st.credentials.get_async(self.host) if st.core.challenge(self.host) else None
            self.credential = cred
            step = st.core.authorize(self.host, self.scopes, cred, st.clock(), extra)
            if not isinstance(step, TokenFetch):
                yield step
                return
            flight = st.flights.get(step.key)
            if flight is not None:  # another request is fetching this very token: use its result
                await flight.wait()
                continue
            flight = st.flights[step.key] = trio.Event()
            try:
                st.counters.token_requests += 1
                started = st.clock()
                request = httpx.Request(step.method, step.url, headers=list(step.headers), content=step.body,
                                        extensions={BODY_LIMIT: MAX_TOKEN_BODY})
                response = yield request
                try:
                    body = await response.aread()
                except BodyTooLarge:
                    raise AuthError(f"token server {step.realm}: answer larger than {MAX_TOKEN_BODY} bytes") from None
                yield st.core.token_received(step, response.status_code, body, started,
                                             source=st.credentials.source(),
                                             retry_after=parse_retry_after(response.headers.get("retry-after")))
                return
            finally:
                del st.flights[step.key]
                flight.set()
        raise Transient(f"registry {self.host}: no token after {MAX_TOKEN_WAITS} shared token requests")

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        st = self.state
        replayable = isinstance(request.stream, httpx.ByteStream)  # decided before anything reads it
        extra: tuple[str, ...] = ()
        for resend in (False, True):
            header: str | None = None
            flow = self._authorization(extra)
            try:  # closed on every way out, so a token fetch in flight is always settled
                step = await flow.__anext__()
                while isinstance(step, httpx.Request):
                    step = await flow.asend((yield step))
            finally:
                await flow.aclose()
            header = step
            if resend and header is None:
                raise AuthError(f"registry {self.host} requires authentication and {st.credentials.source()} "
                                f"has no credentials for it", 401)
            if header:
                request.headers["Authorization"] = header
            else:
                request.headers.pop("Authorization", None)
            response = yield request
            if response.status_code != 401 or response.request.url.netloc != request.url.netloc:
                return  # a 401 from a redirect target is not this host's challenge
            if resend:
                self.refused = True
                st.core.drop_token(self.host, self.scopes, header)
                return
            st.counters.auth_challenges += 1
            challenge = st.core.challenged(self.host, response.headers.get("www-authenticate", ""), self.scopes, header)
            if not replayable:
                self.unreplayed = True
                return
            await st.credentials.reload_async()  # rotated credentials take effect without a restart
            extra = challenge.scopes
