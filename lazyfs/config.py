"""Host configuration: one TOML or JSON file with sane defaults, validated by msgspec.

``Config`` is a frozen value the rest of the code reads (fields and a few derived paths).
``load_config`` reads ``--config``, ``$LAZYFS_CONFIG``, ``/etc/lazyfs/config.toml`` or
``/etc/lazyfs/config.json`` (the first that is given or exists) and fails with a
ConfigError whose message names the file and the field. ``config_schema()`` is the JSON
schema of the file (``lazyfs config schema``); ``Config.to_json()`` the effective values
(``lazyfs config show``).

Registries can also be configured the way containerd does, with a ``certs.d`` directory of
``HOST/hosts.toml`` files (``hosts_dir``); an entry in ``registries`` wins over a
``hosts.toml`` for the same host.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from lazyfs.errors import ConfigError, FormatError

DEFAULT_CONFIG_PATHS = ("/etc/lazyfs/config.toml", "/etc/lazyfs/config.json")
DEFAULT_CONFIG_PATH = DEFAULT_CONFIG_PATHS[1]
_MAX_FILE = 1 << 20


def _doc(text: str, **constraints) -> msgspec.Meta:
    return msgspec.Meta(description=text, **constraints)


Bytes = Annotated[int, _doc("bytes", ge=0)]
Seconds = Annotated[float, _doc("seconds", ge=0)]


def _host(value: str, what: str) -> None:
    # imported here: a config without registries (what `lazyfs mount` loads) needs none of it (issue 14)
    from lazyfs.format.reference import check_registry

    scheme, sep, rest = value.partition("://")
    try:
        check_registry(rest if sep and scheme in ("http", "https") else value)
    except FormatError as e:
        raise ValueError(f"{what}: {e}") from None


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """One registry: how to reach it, and its mirrors (tried first for blobs)."""

    host: Annotated[str, _doc("host[:port] as written in image references")]
    plain_http: Annotated[bool, _doc("speak HTTP, not HTTPS (only for hosts you trust on the path)")] = False
    ca_file: Annotated[str | None, _doc("PEM bundle that replaces the system CAs for this host")] = None
    mirrors: Annotated[tuple[str, ...], _doc("host[:port] or http://host[:port], tried in order for blob reads")] = ()
    client_cert: Annotated[str | None, _doc("client certificate (PEM) for mTLS")] = None
    client_key: Annotated[str | None, _doc("its private key (PEM), if not in client_cert")] = None
    skip_verify: Annotated[bool, _doc("accept any server certificate (testing only)")] = False

    def __post_init__(self) -> None:
        _host(self.host, "host")
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        for i, m in enumerate(self.mirrors):
            _host(m, f"mirrors[{i}]")
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key without client_cert")


@dataclass(frozen=True, slots=True)
class TrustSettings:
    """Which artifacts found through referrers (lazyfs twins, reusable layers) this host accepts (docs/trust.md).

    Artifacts this host made are always accepted; others only with a Notary Project signature
    that verifies against ``trust_store``.
    """

    trust_store: Annotated[tuple[str, ...], _doc(
        "PEM files, or directories of .pem/.crt files, holding the root certificates signatures must chain to "
        "(a Notary Project trust store of type ca)")] = ()
    trusted_identities: Annotated[tuple[str, ...], _doc(
        "signers accepted under those roots: '*' or 'x509.subject: C=.., ST=.., O=..' entries")] = ("*",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_store", tuple(self.trust_store))
        object.__setattr__(self, "trusted_identities", tuple(self.trusted_identities))
        if "*" in self.trusted_identities:
            if len(self.trusted_identities) > 1:
                raise ValueError("'*' must be the only trusted identity")
            return
        if not self.trusted_identities:
            raise ValueError("no trusted identity (use '*' to accept every signer under the roots)")
        from lazyfs.format.notation import parse_identity

        for text in self.trusted_identities:
            try:
                parse_identity(text)
            except FormatError as e:
                raise ValueError(str(e)) from None


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the daemon and the commands need to know about this host."""

    run_dir: Annotated[str, _doc("control socket, FUSE export dir, state file", min_length=1)] = "/run/lazyfs"
    state_dir: Annotated[str, _doc("attachments to restore after a restart", min_length=1)] = "/var/lib/lazyfs"
    cache_root: Annotated[str, _doc("big, cheap disk: verified chunks", min_length=1)] = "/var/lib/lazyfs/cache"
    writable_root: Annotated[str, _doc("fast disk: writable layers", min_length=1)] = "/var/lib/lazyfs/writable"
    cache_size: Bytes = 10 << 30
    flat_cache_size: Annotated[int, _doc(
        "bytes of layer blocks kept in flat files under cache_root/flat, read at their offsets (0: off)", ge=0)] = 10 << 30
    memory_cache_size: Bytes = 256 << 20
    fuse_threads: Annotated[int, _doc(
        "worker threads reading the FUSE connection, answering reads of blocks in the flat files themselves "
        "(0: the event loop reads it)", ge=0, le=64)] = 4
    fuse_native_reads: Annotated[bool, _doc(
        "the worker threads answer reads of blocks in the flat files in C, with the GIL released "
        "(false: in Python; docs/warm.md)")] = True
    credentials: Annotated[str, _doc(
        "docker-style config.json (auths, credsStore, credHelpers); default ~/.docker/config.json",
        min_length=1)] | None = None
    registries: tuple[RegistrySettings, ...] = ()
    hosts_dir: Annotated[str, _doc(
        "containerd certs.d directory of HOST/hosts.toml files, e.g. /etc/containerd/certs.d", min_length=1)] | None = None
    max_range: Annotated[int, _doc("largest coalesced ranged GET, bytes", gt=0)] = 4 << 20
    fetch_concurrency: Annotated[int, _doc("ranged GETs in flight per registry", gt=0)] = 8
    fetch_deadline: Annotated[float, _doc("seconds before a read fails with EIO (retries included)", gt=0)] = 30.0
    decode_threads: Annotated[int, _doc("threads decoding and verifying fetched chunks (0: one per core)", ge=0)] = 0
    registry_probe_interval: Annotated[float, _doc(
        "seconds between health probes of every endpoint of registries with mirrors (0: off)", ge=0)] = 10.0
    readahead_chunks: Annotated[int, _doc("chunks or spans queued after a demand miss (0: off); "
                                          "none after a read of a chunk the replayed startup trace names",
                                          ge=0)] = 4
    trace_record_seconds: Annotated[float, _doc(
        "record a startup trace for this long after the first attach", ge=0)] = 30.0
    trace_replay: bool = True
    trace_publish: Annotated[bool, _doc(
        "record startup traces and push them into the image's repository (off: traces are only read)")] = False
    trace_concurrency: Annotated[int, _doc("chunks in flight while replaying a trace", ge=0)] = 8
    background_download: bool = False
    background_delay: Seconds = 30.0
    background_rate: Annotated[int, _doc("bytes per second", ge=0)] = 20 << 20
    read_only_loop: Annotated[Literal["buffered", "direct"], _doc(
        "how lazyfs mount attaches the loop device of a read-only image: buffered (the kernel serves "
        "re-reads from the page cache of the exported file; costs a second cached copy) or direct "
        "(O_DIRECT: one copy, every read a FUSE request); docs/warm.md")] = "buffered"
    export_readahead: Annotated[int, _doc(
        "kernel readahead on the exported image files (read_ahead_kb of the FUSE export), bytes: how far a "
        "buffered loop reads ahead of a read that follows cached blocks; 1 MiB speeds up warm reads from the "
        "disk tier and costs cold starts a little (0: none; docs/warm.md)", ge=0, le=1 << 30)] = 128 << 10
    local_readahead: Annotated[int, _doc(
        "window of the daemon's local readahead, bytes: a window whose blocks are all on local disk, read at "
        "one page in 8 since it was last read ahead, is read whole into the exported file's page cache "
        "(never a fetch; buffered readers only; 0: off; at least 64 KiB; docs/warm.md §4)",
        ge=0, le=64 << 20,
        multiple_of=4096)] = 256 << 10
    hydrated_max_bytes: Annotated[int, _doc(
        "disk the hydrated files of fully local read-only images may take under cache_root/hydrated "
        "(new mounts then bypass FUSE; 0: off), bytes", ge=0)] = 10 << 30
    hydrated_check_interval: Annotated[float, _doc(
        "seconds between the daemon's checks for read-only images that became fully local", gt=0)] = 10.0
    hydrated_switch: Annotated[Literal["auto", "off"], _doc(
        "auto: a read-only lazyfs mount goes through a device-mapper device where the kernel has "
        "device-mapper, and the daemon moves it onto its image's hydrated file while it runs (no remount); "
        "off: the loop device is mounted directly (docs/warm.md)")] = "auto"
    hydrate: Annotated[bool, _doc(
        "make every attached image fully local in the background (lazyfs mount --hydrate; docs/daemon.md)")] = False
    hydrate_rate: Annotated[int, _doc(
        "bytes per second for hydration without its own rate or deadline (0: as fast as fetching goes)",
        ge=0)] = 0
    metrics_address: Annotated[str, _doc(
        "HOST:PORT to serve Prometheus metrics on, e.g. 127.0.0.1:9750", pattern=r"^\S+:[0-9]{1,5}$")] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Bounds on what a registry or a tar may make this host hold (docs/format.md, "Limits"):
    max_virtual_size: Annotated[int, _doc("largest image (virtual disk) accepted, bytes: 1 TiB", gt=0)] = 1 << 40
    metadata_budget: Annotated[int, _doc("memory one image's layer metadata may take, bytes", gt=0)] = 128 << 20
    convert_max_layer_bytes: Annotated[int, _doc(
        "decompressed tar bytes one source layer may have in lazyfs convert", gt=0)] = 32 << 30
    trust: TrustSettings = TrustSettings()

    @property
    def socket_path(self) -> str:
        return os.path.join(self.run_dir, "lazyfs.sock")

    @property
    def export_dir(self) -> str:
        return os.path.join(self.run_dir, "export")

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, "attachments.json")

    @property
    def credentials_path(self) -> str | None:
        if self.credentials:
            return self.credentials
        default = os.path.expanduser("~/.docker/config.json")
        return default if os.path.exists(default) else None

    def registry(self, host: str) -> RegistrySettings | None:
        return next((r for r in self.registries if r.host == host), None)

    def with_registry(self, settings: RegistrySettings) -> Config:
        others = tuple(r for r in self.registries if r.host != settings.host)
        return dataclasses.replace(self, registries=others + (settings,))

    def with_plain_http(self, hosts: Iterable[str]) -> "Config":
        """This config with *hosts* spoken to over plain HTTP (their other settings kept)."""
        config = self
        for host in hosts:
            known = config.registry(host)
            config = config.with_registry(dataclasses.replace(known, plain_http=True) if known
                                          else RegistrySettings(host, plain_http=True))
        return config

    def plain_http_hosts(self) -> tuple[str, ...]:
        """The registries this config speaks plain HTTP to."""
        return tuple(r.host for r in self.registries if r.plain_http)

    def to_json(self) -> dict:
        """The effective values as JSON types (every field, defaults included)."""
        return msgspec.to_builtins(self)

    def to_toml(self) -> str:
        """The effective values as TOML (fields that are null are left out: TOML has no null)."""
        import tomli_w

        def strip(value):
            if isinstance(value, dict):
                return {k: strip(v) for k, v in value.items() if v is not None}
            if isinstance(value, (list, tuple)):
                return [strip(v) for v in value]
            return value

        return tomli_w.dumps(strip(self.to_json()))


def config_schema() -> dict:
    """The JSON schema of a config file (unknown fields are errors)."""
    schema = msgspec.json.schema(Config)
    for definition in schema.get("$defs", {}).values():
        if definition.get("type") == "object":
            definition["additionalProperties"] = False
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lazyfs host configuration"
    return schema


def _unknown(doc: object, cls: type, path: str) -> str | None:
    """The path of the first key in *doc* that is no field of *cls* (recursively), if any."""
    if not isinstance(doc, dict):
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    for key in doc:
        if key not in names:
            return f"{path}{key}" if not path else f"{path}.{key}"
    registries = doc.get("registries") if cls is Config else None
    if isinstance(registries, list):
        for i, entry in enumerate(registries):
            found = _unknown(entry, RegistrySettings, f"registries[{i}]")
            if found:
                return found
    if cls is Config and "trust" in doc:
        return _unknown(doc["trust"], TrustSettings, "trust")
    return None


def _field(path: str) -> str:
    """msgspec's ``$.registries[0].ca_file`` as ``registries[0].ca_file``."""
    return path.removeprefix("$").removeprefix(".") or "(top level)"


def _check_tls_files(r: RegistrySettings, field: str) -> None:
    """The CA bundle and client certificate of registry *r* load (*field* names it in the error)."""
    import ssl  # here, not at the top: only a registry with TLS files needs it, not every CLI start (issue 14)

    if r.ca_file is not None:
        try:
            ssl.create_default_context(cafile=r.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{field}.ca_file {r.ca_file}: cannot load: {getattr(e, 'strerror', None) or e}") from None
    if r.client_cert is not None:
        try:
            ssl.create_default_context().load_cert_chain(r.client_cert, r.client_key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"{field}.client_cert {r.client_cert}: cannot load with its key: "
                              f"{getattr(e, 'strerror', None) or e}") from None


def check_paths(config: Config, where: str = "config") -> None:
    """Check the files the config names: CA bundles and client certificates load, the
    hosts_dir is a directory, the credentials file (if it exists) is a file."""
    for i, r in enumerate(config.registries):
        if r.ca_file is not None or r.client_cert is not None:
            _check_tls_files(r, f"{where}: registries[{i}]")
    if config.hosts_dir is not None and not os.path.isdir(config.hosts_dir):
        raise ConfigError(f"{where}: hosts_dir {config.hosts_dir}: not a directory")
    if config.credentials is not None and os.path.exists(config.credentials) and not os.path.isfile(config.credentials):
        raise ConfigError(f"{where}: credentials {config.credentials}: not a file")
    for i, path in enumerate(config.trust.trust_store):
        if not os.path.exists(path):
            raise ConfigError(f"{where}: trust.trust_store[{i}] {path}: does not exist")


def config_from_dict(doc: dict, where: str = "config", *, check_files: bool = True) -> Config:
    """A Config from parsed JSON or TOML; ConfigError naming *where* and the field."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: must be a JSON object or a TOML table")
    unknown = _unknown(doc, Config, "")
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown!r}")
    try:
        config = msgspec.convert(doc, Config)
    except msgspec.ValidationError as e:
        message, _, path = str(e).rpartition(" - at `")
        if not message:
            message, path = str(e), "$`"
        raise ConfigError(f"{where}: field {_field(path.rstrip('`'))}: {message}") from None
    if check_files:
        check_paths(config, where)
    return config


def parse_config(data: bytes, path: str) -> dict:
    """The document in a config file: TOML if *path* ends in ``.toml``, else JSON."""
    if path.endswith(".toml"):
        import tomllib  # here, not at the top: without a TOML config file the CLI's start skips it (issue 14)

        try:
            return tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path} is not TOML: {exc}") from None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"config file {path} is not JSON: {exc}") from None


def config_path(path: str | None = None) -> str | None:
    """Which file ``load_config(path)`` reads (None: built-in defaults)."""
    return path or os.environ.get("LAZYFS_CONFIG") or next((p for p in DEFAULT_CONFIG_PATHS if os.path.exists(p)), None)


def load_config(path: str | None = None) -> Config:
    """The config at *path* (or $LAZYFS_CONFIG, or /etc/lazyfs/config.toml or .json if present), else defaults."""
    path = config_path(path)
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise ConfigError(f"config file {path}: larger than {_MAX_FILE} bytes")
    return config_from_dict(parse_config(data, path), f"config file {path}")
