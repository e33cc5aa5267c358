"""Host configuration: one JSON file with sane defaults, validated with errors that name the field."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from lazyfs.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/lazyfs/config.json"


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    host: str
    plain_http: bool = False
    ca_file: str | None = None
    mirrors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the daemon and the commands need to know about this host."""

    run_dir: str = "/run/lazyfs"  # control socket, FUSE export dir, state file
    state_dir: str = "/var/lib/lazyfs"  # attachments to restore after a restart
    cache_root: str = "/var/lib/lazyfs/cache"  # big, cheap disk: verified chunks
    writable_root: str = "/var/lib/lazyfs/writable"  # fast disk: writable layers
    cache_size: int = 10 << 30
    memory_cache_size: int = 256 << 20
    credentials: str | None = None  # docker-style config.json with "auths"; default ~/.docker/config.json
    registries: tuple[RegistrySettings, ...] = ()
    max_range: int = 4 << 20  # largest coalesced ranged GET
    fetch_concurrency: int = 8  # ranged GETs in flight per registry
    fetch_deadline: float = 30.0  # seconds before a read fails with EIO
    readahead_chunks: int = 4  # chunks queued after a demand miss (0: off)
    trace_record_seconds: float = 30.0  # record a startup trace for this long after the first attach
    trace_replay: bool = True
    trace_concurrency: int = 8
    background_download: bool = False
    background_delay: float = 30.0
    background_rate: int = 20 << 20  # bytes per second
    metrics_address: str | None = None  # "127.0.0.1:9750" to serve Prometheus metrics
    log_level: str = "info"

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

    def with_registry(self, settings: RegistrySettings) -> "Config":
        others = tuple(r for r in self.registries if r.host != settings.host)
        return dataclasses.replace(self, registries=others + (settings,))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}


def _check(name: str, value: object) -> object:
    kind = _TYPES[name]
    if name == "registries":
        if not isinstance(value, list):
            raise ConfigError("config field 'registries' must be a list")
        out = []
        for i, r in enumerate(value):
            if not isinstance(r, dict) or not isinstance(r.get("host"), str):
                raise ConfigError(f"config field 'registries[{i}]' needs a string 'host'")
            unknown = set(r) - {"host", "plain_http", "ca_file", "mirrors"}
            if unknown:
                raise ConfigError(f"config field 'registries[{i}]': unknown keys {sorted(unknown)}")
            if not isinstance(r.get("plain_http", False), bool):
                raise ConfigError(f"config field 'registries[{i}].plain_http' must be true or false")
            mirrors = r.get("mirrors", [])
            if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
                raise ConfigError(f"config field 'registries[{i}].mirrors' must be a list of hosts")
            out.append(RegistrySettings(r["host"], r.get("plain_http", False), r.get("ca_file"), tuple(mirrors)))
        return tuple(out)
    if kind in ("int", int):
        if type(value) is not int or value < 0:
            raise ConfigError(f"config field {name!r} must be a non-negative integer, not {value!r}")
    elif kind in ("float", float):
        if type(value) not in (int, float) or value < 0:
            raise ConfigError(f"config field {name!r} must be a non-negative number, not {value!r}")
        value = float(value)
    elif kind in ("bool", bool):
        if type(value) is not bool:
            raise ConfigError(f"config field {name!r} must be true or false, not {value!r}")
    elif kind in ("str", str):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config field {name!r} must be a non-empty string")
    elif value is not None and not isinstance(value, str):
        raise ConfigError(f"config field {name!r} must be a string or null")
    if name == "log_level" and value not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"config field 'log_level' must be debug, info, warning or error, not {value!r}")
    if name == "metrics_address" and value is not None:
        host, _, port = str(value).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"config field 'metrics_address' must be HOST:PORT, not {value!r}")
    return value


def config_from_dict(doc: dict, where: str = "config") -> Config:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    unknown = set(doc) - set(_TYPES)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    values = {name: _check(name, value) for name, value in doc.items()}
    if values.get("max_range", 1) <= 0 or values.get("fetch_concurrency", 1) <= 0:
        raise ConfigError(f"{where}: max_range and fetch_concurrency must be positive")
    return Config(**values)


def load_config(path: str | None = None) -> Config:
    """The config at *path* (or $LAZYFS_CONFIG, or /etc/lazyfs/config.json if present), else defaults."""
    path = path or os.environ.get("LAZYFS_CONFIG") or (DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None)
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"config file {path} is not JSON: {exc}") from None
    return config_from_dict(doc, f"config file {path}")
