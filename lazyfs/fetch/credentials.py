"""Registry credentials from a docker-style ``config.json`` (its ``auths`` section).

::

    {"auths": {
        "127.0.0.1:5000": {"auth": "<base64 of user:pass>"},
        "https://index.docker.io/v1/": {"username": "u", "password": "p"},
        "registry.example.com": {"identitytoken": "<OAuth2 refresh token>"}}}

``parse_auths`` is the pure parser; ``Credentials`` holds the parsed file and
re-reads it on ``reload()`` (the registry client calls that on a 401, so a
rotated password is picked up without restarting anything).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import ConfigError

# Docker Hub's credentials live under its v1 index URL; its API host differs again.
_DOCKER_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_MAX_FILE = 4 << 20  # a credentials file is small; refuse to slurp anything huge


@dataclass(frozen=True, slots=True)
class Credential:
    """A username/password pair, and optionally an OAuth2 refresh token (``identitytoken``)."""

    username: str
    password: str
    identity_token: str | None = None

    def __repr__(self) -> str:  # never print secrets in logs or tracebacks
        token = "***" if self.identity_token else None
        return f"Credential(username={self.username!r}, password=***, identity_token={token})"


def normalize_registry_key(key: str) -> str:
    """The ``host[:port]`` an ``auths`` key stands for: ``https://host/v1/`` -> ``host``;
    Docker Hub's aliases -> ``docker.io``; lowercased."""
    text = key.strip()
    for prefix in ("https://", "http://"):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :]
            break
    host = text.split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB_ALIASES else host


def _string(entry: dict, field: str, where: str) -> str | None:
    value = entry.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {field!r} must be a string, got {type(value).__name__}")
    return value


def parse_auths(data: bytes, source: str = "credentials") -> dict[str, Credential]:
    """Parse a docker ``config.json`` into ``{host[:port]: Credential}``.

    Entries with nothing usable (e.g. only a ``credsStore`` elsewhere in the file) are skipped;
    malformed ones raise ConfigError naming *source* and the key.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: top level must be a JSON object")
    auths = doc.get("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"{source}: 'auths' must be an object")
    result: dict[str, Credential] = {}
    for key, entry in auths.items():
        where = f"{source}: auths[{key!r}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be an object")
        host = normalize_registry_key(key)
        if not host:
            raise ConfigError(f"{where}: key does not name a registry host")
        username = _string(entry, "username", where)
        password = _string(entry, "password", where)
        encoded = _string(entry, "auth", where)
        token = _string(entry, "identitytoken", where)
        if encoded is not None:
            try:
                decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise ConfigError(f"{where}: 'auth' is not base64 of 'user:password'") from None
            user, sep, secret = decoded.partition(":")
            if not sep or not user:
                raise ConfigError(f"{where}: 'auth' does not decode to 'user:password'")
            if username is not None and username != user:
                raise ConfigError(f"{where}: 'username' and 'auth' name different users")
            username, password = user, secret
        if username is None and token is None:
            continue  # e.g. {} placeholders docker writes for credential helpers
        if username is not None and password is None and token is None:
            raise ConfigError(f"{where}: 'username' without 'password'")
        if host in result:
            raise ConfigError(f"{where}: a second entry for registry {host!r}")
        result[host] = Credential(username or "", password or "", token)
    return result


def default_path() -> Path:
    """Where docker keeps its config: ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


class Credentials:
    """The credentials of a docker-style ``config.json``, re-read on ``reload()``.

    A missing file means "no credentials" (anonymous access), so a file that
    appears later is picked up by the next reload. *path* None gives an empty,
    never-changing store. ``entries`` seeds credentials in code (tests, CLI flags);
    they are overridden by the file's entry for the same host.
    """

    def __init__(
        self, path: str | os.PathLike | None = None, entries: dict[str, Credential] | None = None
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._fixed = {normalize_registry_key(k): v for k, v in (entries or {}).items()}
        self._entries: dict[str, Credential] = {}
        self._lock = threading.Lock()
        self.reloads = 0
        self.reload()

    def reload(self) -> None:
        """Re-read the file now (ConfigError if it exists but is malformed or unreadable)."""
        entries: dict[str, Credential] = {}
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    data = f.read(_MAX_FILE + 1)
            except FileNotFoundError:
                data = None
            except OSError as e:
                raise ConfigError(f"{self.path}: cannot read credentials: {e.strerror}") from None
            if data is not None:
                if len(data) > _MAX_FILE:
                    raise ConfigError(f"{self.path}: credentials file larger than {_MAX_FILE} bytes")
                entries = parse_auths(data, str(self.path))
        with self._lock:
            self._entries = entries
            self.reloads += 1

    def lookup(self, registry: str) -> Credential | None:
        """The credential for *registry* (``host[:port]``), or None for anonymous access."""
        key = normalize_registry_key(registry)
        with self._lock:
            found = self._entries.get(key)
        return found if found is not None else self._fixed.get(key)

    def source(self) -> str:
        """Where credentials come from, for error messages."""
        return str(self.path) if self.path is not None else "no credentials file"

    def __repr__(self) -> str:
        return f"Credentials({self.source()!r}, hosts={sorted(set(self._entries) | set(self._fixed))})"
