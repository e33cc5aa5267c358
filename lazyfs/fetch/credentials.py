"""Registry credentials as docker keeps them: ``config.json`` auths and credential helpers.

::

    {"auths": {
        "127.0.0.1:5000": {"auth": "<base64 of user:pass>"},
        "https://index.docker.io/v1/": {"username": "u", "password": "p"},
        "registry.example.com": {"identitytoken": "<OAuth2 refresh token>"}},
     "credsStore": "pass",                               # docker-credential-pass for every registry
     "credHelpers": {"123.dkr.ecr.example.com": "ecr-login"}}   # or one helper per registry

For a registry, ``credHelpers`` names the helper if it lists the registry, else
``credsStore`` does; the helper is asked with docker's protocol (``docker-credential-NAME
get``, the server on stdin, ``{"Username", "Secret"}`` on stdout; a ``<token>`` username
means the secret is an identity token). A helper that has nothing for the registry, or no
helper, leaves the ``auths`` entry (if any).

``parse_docker_config`` is the pure parser. ``Credentials`` holds the parsed file: it is
re-read when it changes on disk (checked at most every ``recheck_seconds``) and on
``reload()`` (the registry client calls that on a 401, so a rotated password is picked up
without restarting anything). Helper answers are cached per registry for ``helper_ttl``
seconds, in a bounded map. Secrets never appear in reprs or messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cachetools
import trio

from lazyfs.errors import ConfigError

# Docker Hub's credentials live under its v1 index URL; its API host differs again.
_DOCKER_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_MAX_FILE = 4 << 20  # a credentials file is small; refuse to slurp anything huge
_MAX_HELPER_OUTPUT = 1 << 20
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NOT_FOUND = "credentials not found"
TOKEN_USERNAME = "<token>"
MAX_HELPER_CACHE = 256


@dataclass(frozen=True, slots=True)
class Credential:
    """A username/password pair, and optionally an OAuth2 refresh token (``identitytoken``)."""

    username: str
    password: str
    identity_token: str | None = None

    def __repr__(self) -> str:  # never print secrets in logs or tracebacks
        token = "***" if self.identity_token else None
        return f"Credential(username={self.username!r}, password=***, identity_token={token})"


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """The credential parts of a docker ``config.json``."""

    auths: dict[str, Credential] = field(default_factory=dict)
    creds_store: str | None = None
    cred_helpers: dict[str, str] = field(default_factory=dict)

    def helper_for(self, registry: str) -> str | None:
        return self.cred_helpers.get(registry, self.creds_store)


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


def _string(entry: dict, field_: str, where: str) -> str | None:
    value = entry.get(field_)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {field_!r} must be a string, got {type(value).__name__}")
    return value


def _helper_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _HELPER_NAME.match(value):
        raise ConfigError(f"{where}: must name a helper (docker-credential-NAME), got {value!r}")
    return value


def parse_docker_config(data: bytes, source: str = "credentials") -> DockerConfig:
    """Parse a docker ``config.json``: ``auths``, ``credsStore`` and ``credHelpers``.

    Entries with nothing usable (the ``{}`` placeholders docker writes for helpers) are
    skipped; malformed ones raise ConfigError naming *source* and the key.
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
            continue
        if username is not None and password is None and token is None:
            raise ConfigError(f"{where}: 'username' without 'password'")
        if host in result:
            raise ConfigError(f"{where}: a second entry for registry {host!r}")
        result[host] = Credential(username or "", password or "", token)
    store = doc.get("credsStore")
    store = _helper_name(store, f"{source}: credsStore") if store not in (None, "") else None
    helpers_doc = doc.get("credHelpers", {})
    if not isinstance(helpers_doc, dict):
        raise ConfigError(f"{source}: 'credHelpers' must be an object")
    helpers = {normalize_registry_key(k): _helper_name(v, f"{source}: credHelpers[{k!r}]")
               for k, v in helpers_doc.items()}
    return DockerConfig(result, store, helpers)


def parse_auths(data: bytes, source: str = "credentials") -> dict[str, Credential]:
    """The ``auths`` of a docker ``config.json`` as ``{host[:port]: Credential}``."""
    return parse_docker_config(data, source).auths


def parse_helper_answer(stdout: bytes, helper: str) -> Credential:
    """A credential helper's ``get`` answer (ConfigError without echoing it: it holds a secret)."""
    try:
        doc = json.loads(stdout)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"credential helper {helper}: answer is not JSON") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"credential helper {helper}: answer is not a JSON object")
    username, secret = doc.get("Username", ""), doc.get("Secret", "")
    if not isinstance(username, str) or not isinstance(secret, str) or not secret:
        raise ConfigError(f"credential helper {helper}: answer lacks a string 'Username' and 'Secret'")
    if username == TOKEN_USERNAME:
        return Credential("", "", identity_token=secret)
    return Credential(username, secret)


def helper_server(registry: str) -> str:
    """The server name docker hands a helper for *registry*."""
    return DOCKER_HUB_SERVER if registry == "docker.io" else registry


def run_helper(helper: str, registry: str, timeout: float = 30.0) -> Credential | None:
    """Ask ``docker-credential-<helper>`` for *registry*'s credential (None: it has none).

    Blocking: call it from a worker thread inside trio."""
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        raise ConfigError(f"credential helper docker-credential-{helper} is not on PATH")
    try:
        done = subprocess.run([program, "get"], input=helper_server(registry).encode(), capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"credential helper {helper}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise ConfigError(f"credential helper {helper}: cannot run: {e.strerror or e}") from None
    if done.returncode != 0:
        said = (done.stdout + done.stderr)[:4096].decode("utf-8", "replace")
        if _NOT_FOUND in said.lower():
            return None
        first = (done.stderr.decode("utf-8", "replace").strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"credential helper {helper} failed for {registry}: exit {done.returncode}"
                          + (f": {first}" if first else ""))
    if len(done.stdout) > _MAX_HELPER_OUTPUT:
        raise ConfigError(f"credential helper {helper}: answer larger than {_MAX_HELPER_OUTPUT} bytes")
    return parse_helper_answer(done.stdout, helper)


def default_path() -> Path:
    """Where docker keeps its config: ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _signature(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read credentials: {e.strerror}") from None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Credentials:
    """The credentials of a docker-style ``config.json``; re-read when it changes.

    A missing file means "no credentials" (anonymous access), so a file that appears later
    is picked up. *path* None gives an empty store. ``entries`` seeds credentials in code
    (tests, CLI flags); the file's entry for the same host wins over them.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        entries: dict[str, Credential] | None = None,
        *,
        recheck_seconds: float = 1.0,
        helper_ttl: float = 300.0,
        helper_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._fixed = {normalize_registry_key(k): v for k, v in (entries or {}).items()}
        self._config = DockerConfig()
        self._signature: tuple[int, ...] | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()
        self._helped: cachetools.LRUCache[str, tuple[float, Credential | None]] = cachetools.LRUCache(MAX_HELPER_CACHE)
        self._flights: dict[str, trio.Event] = {}
        self.recheck_seconds, self.helper_ttl, self.helper_timeout = recheck_seconds, helper_ttl, helper_timeout
        self._clock = clock
        self.reloads = 0
        self.helper_calls = 0
        self.reload()

    # --- the file ------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the file now and forget helper answers (ConfigError if the file exists but
        is malformed or unreadable; the last good content stays in force)."""
        config, signature = DockerConfig(), None
        if self.path is not None:
            signature = _signature(self.path)
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
                config = parse_docker_config(data, str(self.path))
        with self._lock:
            self._config, self._signature = config, signature
            self._checked = self._clock()
            self._helped.clear()
            self.reloads += 1

    def refresh(self) -> bool:
        """Re-read the file if it changed on disk since it was read; whether it did."""
        if self.path is None:
            return False
        signature = _signature(self.path)
        with self._lock:
            self._checked = self._clock()
            if signature == self._signature:
                return False
        self.reload()
        return True

    def _due(self) -> bool:
        return self.path is not None and self._clock() - self._checked >= self.recheck_seconds

    async def reload_async(self) -> None:
        await trio.to_thread.run_sync(self.reload)

    # --- lookups -------------------------------------------------------------------------------

    def _cached(self, key: str) -> tuple[bool, Credential | None]:
        with self._lock:
            config = self._config
            helper = config.helper_for(key)
            hit = self._helped.get(key) if helper else None
        if helper is None:
            return True, self._from_file(config, key)
        if hit is not None and self._clock() - hit[0] < self.helper_ttl:
            return True, hit[1] if hit[1] is not None else self._from_file(config, key)
        return False, None

    def _from_file(self, config: DockerConfig, key: str) -> Credential | None:
        found = config.auths.get(key)
        return found if found is not None else self._fixed.get(key)

    def _ask_helper(self, key: str) -> Credential | None:
        with self._lock:
            config = self._config
        helper = config.helper_for(key)
        if helper is None:
            return self._from_file(config, key)
        self.helper_calls += 1
        cred = run_helper(helper, key, self.helper_timeout)
        with self._lock:
            if self._config is config:
                self._helped[key] = (self._clock(), cred)
        return cred if cred is not None else self._from_file(config, key)

    def lookup(self, registry: str) -> Credential | None:
        """The credential for *registry* (``host[:port]``), or None for anonymous access.

        Blocking (it may stat the file and run a helper): from trio use ``get_async``."""
        if self._due():
            self.refresh()
        key = normalize_registry_key(registry)
        known, cred = self._cached(key)
        return cred if known else self._ask_helper(key)

    async def get_async(self, registry: str) -> Credential | None:
        """``lookup`` without blocking trio: file checks and helpers run in worker threads,
        and concurrent lookups of one registry share one helper run."""
        if self._due():
            await trio.to_thread.run_sync(self.refresh)
        key = normalize_registry_key(registry)
        for _ in range(3):
            known, cred = self._cached(key)
            if known:
                return cred
            flight = self._flights.get(key)
            if flight is not None:
                await flight.wait()
                continue
            flight = self._flights[key] = trio.Event()
            try:
                return await trio.to_thread.run_sync(self._ask_helper, key)
            finally:
                del self._flights[key]
                flight.set()
        return await trio.to_thread.run_sync(self._ask_helper, key)

    def source(self) -> str:
        """Where credentials come from, for error messages."""
        return str(self.path) if self.path is not None else "no credentials file"

    def __repr__(self) -> str:
        with self._lock:
            hosts = set(self._config.auths) | set(self._fixed)
        return f"Credentials({self.source()!r}, hosts={sorted(hosts)})"
