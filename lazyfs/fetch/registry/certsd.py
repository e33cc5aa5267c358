"""containerd's registry host directory (``/etc/containerd/certs.d``) read as registry configuration.

The layout, as containerd reads it::

    certs.d/
      registry.example.com/hosts.toml     # or  HOST_PORT_/ (":" is "_" there) or HOST:PORT/
      _default/hosts.toml                 # for every registry without a directory of its own
      legacy.example.com/ca.crt, client.cert, client.key   # docker's layout, without hosts.toml

and a ``hosts.toml``::

    server = "https://registry.example.com"        # the origin; default https://<dir name>
    ca = "/etc/certs/ca.pem"                       # also for the origin: ca, client, skip_verify

    [host."https://mirror.example.com:5000"]       # tried first, in file order
      capabilities = ["pull", "resolve"]           # default: pull, resolve, push
      ca = ["mirror-ca.pem"]                       # relative to the host's directory
      client = [["client.crt", "client.key"]]      # or "both.pem", or ["client.crt", "client.key"]
      skip_verify = false
      override_path = false                        # true: the URL's path is the API root as is

``parse_hosts_toml`` is pure; ``load_hosts_dir`` reads a directory (bounded). Keys that
containerd accepts but lazyfs does not use (``header``, ``dial_timeout``) are ignored; any
other key is a ConfigError naming the file and the key, so typos do not pass silently.
"""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from pathlib import Path

from lazyfs.errors import ConfigError, FormatError
from lazyfs.fetch.registry.hosts import CAPABILITIES, Endpoint, HostsEntry, TlsProfile
from lazyfs.format.reference import check_registry

HOSTS_FILE = "hosts.toml"
DEFAULT_DIR = "_default"
MAX_HOST_DIRS = 4096
MAX_HOSTS_FILE = 1 << 20
_HOST_KEYS = {"capabilities", "ca", "client", "skip_verify", "override_path", "header", "dial_timeout"}
_TOP_KEYS = _HOST_KEYS | {"server", "host"}


def registry_of_dir(name: str) -> str | None:
    """The registry a certs.d directory name stands for (``host_5000_`` -> ``host:5000``), or None."""
    if name == DEFAULT_DIR:
        return name
    if name.endswith("_") and "_" in name[:-1]:
        host, _, port = name[:-1].rpartition("_")
        if port.isdigit():
            name = f"{host}:{port}"
    try:
        return check_registry(name)
    except FormatError:
        return None


def _paths(value: object, base: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: must be a path or a list of paths")
    return tuple(os.path.join(base, v) for v in value)


def _client(value: object, base: str, where: str) -> tuple[str | None, str | None]:
    """containerd accepts a path, a list of paths, or a list of [cert, key] pairs; one pair here."""
    pairs: list[tuple[str, str | None]] = []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"{where}: must be a path, a list of paths or a list of [cert, key] pairs")
    if items and all(isinstance(i, str) for i in items) and len(items) == 2 and not isinstance(value, str):
        # ["cert", "key"]: containerd reads this as two combined files; a cert and its key is what people mean
        pairs.append((items[0], items[1]))
    else:
        for item in items:
            if isinstance(item, str) and item:
                pairs.append((item, None))
            elif isinstance(item, list) and len(item) == 2 and all(isinstance(i, str) and i for i in item):
                pairs.append((item[0], item[1]))
            else:
                raise ConfigError(f"{where}: {item!r} is neither a path nor a [cert, key] pair")
    if len(pairs) > 1:
        raise ConfigError(f"{where}: {len(pairs)} client certificates; lazyfs presents one per host")
    if not pairs:
        return None, None
    cert, key = pairs[0]
    return os.path.join(base, cert), os.path.join(base, key) if key else None


def _capabilities(value: object, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: must be a list of pull, resolve, push")
    caps = frozenset(v.lower() for v in value)
    unknown = caps - CAPABILITIES
    if unknown:
        raise ConfigError(f"{where}: unknown capability {sorted(unknown)[0]!r} (pull, resolve, push)")
    return caps or CAPABILITIES


def _endpoint(url: str, table: dict, base: str, where: str) -> Endpoint:
    unknown = set(table) - _HOST_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    text = url if url.startswith(("http://", "https://")) else "https://" + url
    parts = urllib.parse.urlsplit(text)
    host = parts.netloc
    if host:
        try:
            check_registry(host)
        except FormatError as e:
            raise ConfigError(f"{where}: {e}") from None
    override = table.get("override_path", False)
    if not isinstance(override, bool):
        raise ConfigError(f"{where}: override_path must be true or false")
    path = os.path.normpath(parts.path) if parts.path not in ("", "/") else ""
    if not override and not path.endswith("/v2"):
        path = path.rstrip("/") + "/v2"
    skip = table.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise ConfigError(f"{where}: skip_verify must be true or false")
    cas = _paths(table["ca"], base, f"{where}: ca") if "ca" in table else ()
    cert, key = _client(table["client"], base, f"{where}: client") if "client" in table else (None, None)
    caps = _capabilities(table["capabilities"], f"{where}: capabilities") if "capabilities" in table else CAPABILITIES
    tls = TlsProfile(cas, system_cas=True, client_cert=cert, client_key=key, skip_verify=skip)
    return Endpoint(host, parts.scheme, path=path or "/v2", capabilities=caps, tls=tls)


def parse_hosts_toml(data: bytes, registry: str, directory: str, source: str = HOSTS_FILE) -> HostsEntry:
    """The endpoints a ``hosts.toml`` gives *registry*: its ``[host."…"]`` tables in file order,
    then the ``server`` (default ``https://<registry>``; no host for ``_default``).
    Relative certificate paths are relative to *directory*. ConfigError names *source*."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key {sorted(unknown)[0]!r}")
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict) or not all(isinstance(v, dict) for v in hosts.values()):
        raise ConfigError(f"{source}: 'host' must be tables [host.\"URL\"]")
    endpoints = [_endpoint(url, table, directory, f"{source}: host {url!r}") for url, table in hosts.items()]
    if any(not ep.host for ep in endpoints):
        raise ConfigError(f"{source}: a [host] table without a host name")
    server = doc.get("server")
    if server is not None and (not isinstance(server, str) or not server):
        raise ConfigError(f"{source}: server must be a URL")
    top = {k: v for k, v in doc.items() if k in _HOST_KEYS}
    default_server = "" if registry == DEFAULT_DIR else f"https://{registry}"
    origin = _endpoint(server or default_server, top, directory, f"{source}: server")
    if origin.host == "" and registry != DEFAULT_DIR:
        raise ConfigError(f"{source}: server has no host")
    return HostsEntry(registry, (*endpoints, origin), source)


def _legacy(directory: Path, registry: str) -> HostsEntry | None:
    """docker's certs.d layout: ``*.crt`` CAs, ``*.cert`` client certificates with ``*.key``."""
    cas, certs = [], []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name)[:MAX_HOST_DIRS]:
        if not entry.is_file():
            continue
        if entry.name.endswith(".crt"):
            cas.append(entry.path)
        elif entry.name.endswith(".cert"):
            key = entry.path[: -len(".cert")] + ".key"
            certs.append((entry.path, key if os.path.exists(key) else None))
    if not cas and not certs:
        return None
    if len(certs) > 1:
        raise ConfigError(f"{directory}: {len(certs)} client certificates; lazyfs presents one per host")
    cert, key = certs[0] if certs else (None, None)
    tls = TlsProfile(tuple(cas), system_cas=True, client_cert=cert, client_key=key)
    host = "" if registry == DEFAULT_DIR else registry
    return HostsEntry(registry, (Endpoint(host, "https", tls=tls),), str(directory))


def load_hosts_dir(root: str | os.PathLike) -> list[HostsEntry]:
    """Every registry configured under a certs.d directory *root* (ConfigError if unreadable or malformed).

    Blocking file I/O: call it from a worker thread inside trio."""
    root = Path(root)
    try:
        names = sorted(os.listdir(root))
    except OSError as e:
        raise ConfigError(f"hosts_dir {root}: cannot read: {e.strerror or e}") from None
    if len(names) > MAX_HOST_DIRS:
        raise ConfigError(f"hosts_dir {root}: more than {MAX_HOST_DIRS} entries")
    entries: list[HostsEntry] = []
    seen: dict[str, str] = {}
    for name in names:
        directory = root / name
        registry = registry_of_dir(name)
        if registry is None or not directory.is_dir():
            continue
        if registry in seen:  # HOST_PORT_ wins over HOST:PORT, as in containerd
            if name.endswith("_"):
                entries = [e for e in entries if e.registry != registry]
            else:
                continue
        seen[registry] = name
        hosts_file = directory / HOSTS_FILE
        try:
            with open(hosts_file, "rb") as f:
                data = f.read(MAX_HOSTS_FILE + 1)
        except FileNotFoundError:
            legacy = _legacy(directory, registry)
            if legacy is not None:
                entries.append(legacy)
            continue
        except OSError as e:
            raise ConfigError(f"{hosts_file}: cannot read: {e.strerror or e}") from None
        if len(data) > MAX_HOSTS_FILE:
            raise ConfigError(f"{hosts_file}: larger than {MAX_HOSTS_FILE} bytes")
        entries.append(parse_hosts_toml(data, registry, str(directory), str(hosts_file)))
    return entries
