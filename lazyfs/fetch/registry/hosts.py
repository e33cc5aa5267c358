"""Where a registry's requests go: endpoints, their capabilities and TLS settings (no I/O).

A registry (``host[:port]`` as in image references) is reached through an ordered list of
``Endpoint``s, containerd's model: its mirrors first, the registry itself (the *origin*)
last. Each endpoint says what it may be asked (``pull``: blobs and manifests by digest;
``resolve``: manifests by tag; ``push``: uploads) and how to talk TLS to it.

The list comes from, in order of precedence:

1. a ``RegistryConfig`` for that host (the lazyfs config's ``registries``): its ``mirrors``
   may only ``pull``; the origin may do everything;
2. a containerd ``hosts.toml`` for that host in the configured certs.d directory (see
   ``certsd``), with the capabilities it states;
3. otherwise the origin alone, over HTTPS verified against the system CAs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lazyfs.errors import ConfigError, FormatError
from lazyfs.format.reference import check_registry

PULL, RESOLVE, PUSH = "pull", "resolve", "push"
CAPABILITIES = frozenset({PULL, RESOLVE, PUSH})
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


def strip_scheme(host: str) -> tuple[str, str | None]:
    """``("host[:port]", "http" | "https" | None)`` of ``[scheme://]host[:port][/]``."""
    for scheme in ("http", "https"):
        if host.lower().startswith(scheme + "://"):
            return host[len(scheme) + 3 :].rstrip("/"), scheme
    return host, None


@dataclass(frozen=True, slots=True)
class TlsProfile:
    """How to verify a server and prove who we are; hashable, so equal profiles share a pool.

    ``ca_files`` are PEM bundles. With ``system_cas`` they are added to the system CAs
    (containerd's ``ca``), else they replace them (lazyfs's ``ca_file``). ``client_cert``
    and ``client_key`` are the mTLS pair (the key may sit in the certificate file).
    """

    ca_files: tuple[str, ...] = ()
    system_cas: bool = True
    client_cert: str | None = None
    client_key: str | None = None
    skip_verify: bool = False


DEFAULT_TLS = TlsProfile()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place a registry's API answers.

    ``host`` (``host[:port]``) names it for credentials, tokens and health; ``netloc`` is
    where to connect (they differ only for Docker Hub); ``path`` is the API root.
    """

    host: str
    scheme: str = "https"
    netloc: str = ""
    path: str = "/v2"
    capabilities: frozenset[str] = CAPABILITIES
    tls: TlsProfile = DEFAULT_TLS

    def __post_init__(self) -> None:
        if not self.netloc:
            object.__setattr__(self, "netloc", DOCKER_HUB_API if self.host == DOCKER_HUB else self.host)
        if self.scheme not in ("http", "https"):
            raise ConfigError(f"endpoint {self.host}: scheme must be http or https, not {self.scheme!r}")

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    def url(self, rest: str) -> str:
        """The URL of API path *rest* (``"<repo>/blobs/<digest>"``, ``""`` for the root)."""
        return f"{self.scheme}://{self.netloc}{self.path.rstrip('/')}/{rest}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """How to reach one registry (``host[:port]``, as in image references).

    ``plain_http`` speaks HTTP instead of HTTPS (only for registries you trust on the path,
    e.g. 127.0.0.1). ``ca_file`` is a PEM bundle that replaces the system CAs for this host.
    ``client_cert``/``client_key`` present a client certificate (mTLS); ``skip_verify``
    accepts any server certificate. ``mirrors`` are ``host[:port]`` (or ``http://host[:port]``
    for a plain-HTTP mirror) tried in order for blob reads; a mirror without its own
    RegistryConfig inherits ``plain_http`` and the TLS settings from this one.
    """

    host: str
    plain_http: bool = False
    ca_file: str | None = None
    mirrors: tuple[str, ...] = ()
    client_cert: str | None = None
    client_key: str | None = None
    skip_verify: bool = False

    def __post_init__(self) -> None:
        try:
            check_registry(self.host)
        except FormatError as e:
            raise ConfigError(f"registry config: host: {e}") from None
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        for m in self.mirrors:
            try:
                check_registry(strip_scheme(m)[0])
            except FormatError as e:
                raise ConfigError(f"registry config {self.host}: mirror {m!r}: {e}") from None
        if self.client_key is not None and self.client_cert is None:
            raise ConfigError(f"registry config {self.host}: client_key without client_cert")

    @property
    def tls(self) -> TlsProfile:
        return TlsProfile(
            (self.ca_file,) if self.ca_file else (),
            system_cas=self.ca_file is None,
            client_cert=self.client_cert,
            client_key=self.client_key,
            skip_verify=self.skip_verify,
        )

    def origin(self) -> Endpoint:
        return Endpoint(self.host, "http" if self.plain_http else "https", tls=self.tls)


@dataclass(frozen=True, slots=True)
class HostsEntry:
    """A registry's endpoints as a containerd ``hosts.toml`` lists them (origin last)."""

    registry: str
    endpoints: tuple[Endpoint, ...]
    source: str  # the file, for messages


@dataclass(frozen=True, slots=True)
class HostTable:
    """Every configured registry and the endpoints that serve it; an immutable value.

    ``hosts`` are the parsed ``hosts.toml`` entries by registry (``"_default"`` for the
    certs.d default). Build one with ``HostTable.build``.
    """

    configs: Mapping[str, RegistryConfig] = field(default_factory=dict)
    hosts: Mapping[str, HostsEntry] = field(default_factory=dict)
    _lists: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    _tls: Mapping[str, TlsProfile] = field(default_factory=dict)
    _plain: frozenset[str] = frozenset()

    @classmethod
    def build(cls, configs: Iterable[RegistryConfig] = (), hosts: Iterable[HostsEntry] = ()) -> HostTable:
        by_host: dict[str, RegistryConfig] = {}
        for cfg in configs:
            if cfg.host in by_host:
                raise ConfigError(f"registry config: {cfg.host} configured twice")
            by_host[cfg.host] = cfg
        entries = {e.registry: e for e in hosts}
        lists: dict[str, tuple[Endpoint, ...]] = {}
        for cfg in by_host.values():
            mirrors = []
            for m in cfg.mirrors:
                name, scheme = strip_scheme(m)
                own = by_host.get(name)
                if own is not None:
                    ep = own.origin()
                    if scheme is not None:
                        ep = Endpoint(name, scheme, tls=ep.tls)
                else:
                    plain = cfg.plain_http if scheme is None else scheme == "http"
                    ep = Endpoint(name, "http" if plain else "https", tls=cfg.tls)
                mirrors.append(Endpoint(ep.host, ep.scheme, capabilities=frozenset({PULL}), tls=ep.tls))
            lists[cfg.host] = (*mirrors, cfg.origin())
        for name, entry in entries.items():
            if name not in lists and name != "_default":
                lists[name] = entry.endpoints
        # TLS by where we connect: explicit configs win over what mirrors inherit.
        tls: dict[str, TlsProfile] = {}
        for name, eps in lists.items():
            for ep in eps:
                tls.setdefault(ep.netloc, ep.tls)
        for cfg in by_host.values():
            origin = cfg.origin()
            tls[origin.netloc] = origin.tls
        plain = frozenset(c.host for c in by_host.values() if c.plain_http) | frozenset(
            ep.host for eps in lists.values() for ep in eps if ep.scheme == "http"
        )
        return cls(by_host, entries, lists, tls, plain)

    def endpoints(self, registry: str) -> tuple[Endpoint, ...]:
        """Every endpoint of *registry*, in the order they are tried (the origin last)."""
        found = self._lists.get(registry)
        if found is not None:
            return found
        default = self.hosts.get("_default")
        if default is not None:
            return tuple(ep if ep.host else _named(ep, registry) for ep in default.endpoints)
        return (Endpoint(registry),)

    def endpoints_for(self, registry: str, capability: str) -> tuple[Endpoint, ...]:
        """The endpoints of *registry* that may be asked for *capability*, in order."""
        found = tuple(ep for ep in self.endpoints(registry) if ep.can(capability))
        if not found:
            raise ConfigError(f"registry {registry}: no configured host may {capability}")
        return found

    def origin(self, registry: str) -> Endpoint:
        return self.endpoints(registry)[-1]

    def tls_for(self, netloc: str) -> TlsProfile:
        """The TLS settings for connections to *netloc* (``host[:port]``)."""
        found = self._tls.get(netloc)
        if found is not None:
            return found
        default = self.hosts.get("_default")
        return default.endpoints[-1].tls if default is not None else DEFAULT_TLS

    def plain_http(self, host: str) -> bool:
        """Whether *host* is configured to speak plain HTTP (then its token realm may too)."""
        return host in self._plain

    def config_for(self, host: str) -> RegistryConfig:
        """The effective configuration of *host* as a RegistryConfig (defaults: HTTPS, system CAs)."""
        cfg = self.configs.get(host)
        if cfg is not None:
            return cfg
        eps = self.endpoints(host)
        if host not in self._lists:  # not a configured registry: perhaps a configured mirror
            eps = next(((ep,) for lst in self._lists.values() for ep in lst if ep.host == host), eps)
        origin = eps[-1]
        return RegistryConfig(
            host,
            plain_http=origin.scheme == "http",
            ca_file=origin.tls.ca_files[0] if origin.tls.ca_files else None,
            mirrors=tuple(f"{ep.scheme}://{ep.host}" for ep in eps[:-1]),
            client_cert=origin.tls.client_cert,
            client_key=origin.tls.client_key,
            skip_verify=origin.tls.skip_verify,
        )

    def profiles(self) -> set[TlsProfile]:
        """Every TLS profile configured (to build, and so check, their contexts up front)."""
        found = set(self._tls.values())
        for entry in self.hosts.values():
            found.update(ep.tls for ep in entry.endpoints)
        return found


def _named(ep: Endpoint, registry: str) -> Endpoint:
    """The certs.d ``_default`` server endpoint (no host of its own) made concrete for *registry*."""
    return Endpoint(registry, ep.scheme, path=ep.path, capabilities=ep.capabilities, tls=ep.tls)
