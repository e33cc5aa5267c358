"""A real registry for tests: Debian's ``docker-registry`` on 127.0.0.1, with optional auth and TLS.

``running_registry(tmpdir, auth=None | "htpasswd" | "token", tls=False)`` starts
``docker-registry serve CONFIG`` with storage under *tmpdir* on a free loopback
port, waits (bounded) until ``/v2/`` answers and yields a ``RegistryInfo``; on
exit it stops the process (terminate, then kill). With ``tls=True`` the fixture
makes its own CA and a server certificate for 127.0.0.1/localhost/::1
(``info.ca_file``). With ``auth="htpasswd"`` the registry wants Basic auth
(bcrypt entries made by ``htpasswd -Bbn``); with ``auth="token"`` it wants Bearer
tokens from a ``TokenServer`` started alongside: a stdlib HTTP server in a thread
that checks Basic credentials (or an OAuth2 refresh token) and signs ES256 JWTs
carrying the ``x5c`` certificate the registry trusts as its ``rootcertbundle``.

``registry_fixture(...)`` turns that into a pytest fixture for a test module.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import http.server
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lazyfs.durable import write_atomically
from lazyfs.fetch.registry import RegistryConfig

REGISTRY_BINARIES = ("/usr/bin/docker-registry", "docker-registry", "registry")
DEFAULT_USERNAME = "lazyfs"
SERVICE = "lazyfs-test-registry"
ISSUER = "lazyfs-test-token-issuer"


def registry_binary() -> str:
    """The path of the registry binary (RuntimeError if it is not installed)."""
    for name in REGISTRY_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalPKI:
    """A CA, and a server and a client certificate signed by it, as PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path


def make_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")) -> LocalPKI:
    """Write a fresh self-signed CA and a server certificate for *hosts* into *directory*."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazyfs test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazyfs test client")]))
        .issuer_name(ca_name)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = LocalPKI(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                   directory / "client.cert", directory / "client.key")
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.client_cert_file.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    for path, private in ((pki.key_file, key), (pki.client_key_file, client_key)):
        path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(path, 0o600)
    return pki


def htpasswd_line(username: str, password: str) -> str:
    """A bcrypt htpasswd entry made by ``htpasswd -Bbn`` (the registry accepts only bcrypt)."""
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise RuntimeError("htpasswd is not installed (apt-get install apache2-utils)")
    out = subprocess.run(
        [htpasswd, "-Bbn", username, password], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()
    if not out.startswith(f"{username}:$2"):
        raise RuntimeError(f"htpasswd did not make a bcrypt entry: {out!r}")
    return out


def write_auth_file(path: str | os.PathLike, entries: dict[str, tuple[str, str]], *, style: str = "auth") -> Path:
    """Write a docker ``config.json`` with ``{registry: (user, password)}``; *style* ``"auth"``
    (base64 ``auth`` field) or ``"plain"`` (``username``/``password``). Replaced atomically."""
    auths: dict[str, dict[str, str]] = {}
    for host, (user, password) in entries.items():
        if style == "auth":
            auths[host] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        else:
            auths[host] = {"username": user, "password": password}
    path = Path(path)
    write_atomically(path, json.dumps({"auths": auths}, indent=2).encode())
    return path


# --- the token server ---------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request the token server answered: who, for what, and whether it issued a token."""

    method: str
    username: str | None
    scopes: tuple[str, ...]
    service: str | None
    status: int


class TokenServer:
    """A Docker token-auth server on 127.0.0.1 (a thread running ``http.server``).

    ``GET /token?service=…&scope=…`` with Basic credentials, or ``POST /token`` with an
    OAuth2 ``password`` or ``refresh_token`` grant, answers ``{"token", "access_token",
    "expires_in", "issued_at"}``. Authenticated users get every action they ask for;
    anonymous callers get pull access only if ``anonymous_pull``. Bad credentials: 401.
    ``requests`` records every request; ``expires_in`` may be changed while running.
    """

    def __init__(
        self,
        directory: Path,
        users: dict[str, str],
        *,
        refresh_tokens: dict[str, str] | None = None,
        expires_in: int = 300,
        anonymous_pull: bool = False,
        service: str = SERVICE,
        issuer: str = ISSUER,
    ) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users = dict(users)
        self.refresh_tokens = dict(refresh_tokens or {})
        self.expires_in = expires_in
        self.anonymous_pull = anonymous_pull
        self.service, self.issuer = service, issuer
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazyfs test token signer")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_file = directory / "token-signer.crt"
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the realm's host as a registry client sees it."""
        return f"127.0.0.1:{self.port}"

    def count(self) -> int:
        """How many tokens were issued so far."""
        with self._lock:
            return sum(1 for r in self.requests if r.status == 200)

    # -- lifecycle --

    def start(self) -> TokenServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                owner._handle(self, "GET")

            def do_POST(self) -> None:
                owner._handle(self, "POST")

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="lazyfs-token-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(30)
            self._server = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving --

    def _handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        form: dict[str, list[str]] = {}
        if method == "POST":
            length = int(h.headers.get("Content-Length") or 0)
            if length > 1 << 20:
                return self._reply(h, 413, {"error": "too large"}, method, None, (), None)
            form = urllib.parse.parse_qs(h.rfile.read(length).decode("utf-8", "replace"))
        params = form if method == "POST" else query
        service = (params.get("service") or [None])[0]
        scopes = tuple(s for value in params.get("scope", []) for s in value.split())
        if url.path != "/token":
            return self._reply(h, 404, {"error": "not found"}, method, None, scopes, service)
        user, ok = self._authenticate(h, method, form)
        if not ok:
            return self._reply(h, 401, {"error": "invalid credentials"}, method, user, scopes, service)
        now = int(time.time())
        expires_in = self.expires_in
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = wanted if user is not None else [a for a in wanted if a == "pull" and self.anonymous_pull]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service or self.service,
            "exp": now + expires_in,
            "nbf": now - 60,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = self._sign(claims)
        issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        body = {"token": token, "access_token": token, "expires_in": expires_in, "issued_at": issued}
        return self._reply(h, 200, body, method, user, scopes, service)

    def _authenticate(
        self, h: http.server.BaseHTTPRequestHandler, method: str, form: dict[str, list[str]]
    ) -> tuple[str | None, bool]:
        """(username or None for anonymous, whether the credentials were good)."""
        if method == "POST":
            grant = (form.get("grant_type") or [""])[0]
            if grant == "refresh_token":
                user = self.refresh_tokens.get((form.get("refresh_token") or [""])[0])
                return user, user is not None
            if grant == "password":
                user = (form.get("username") or [""])[0]
                return user, self.users.get(user) == (form.get("password") or [None])[0]
            return None, False
        header = h.headers.get("Authorization")
        if not header:
            return None, True
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except Exception:
            return None, False
        return user, self.users.get(user) == password

    def _sign(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def _reply(
        self,
        h: http.server.BaseHTTPRequestHandler,
        status: int,
        body: dict,
        method: str,
        user: str | None,
        scopes: tuple[str, ...],
        service: str | None,
    ) -> None:
        with self._lock:
            self.requests.append(TokenRequest(method, user, scopes, service, status))
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


# --- the registry -------------------------------------------------------------------------------


@dataclass(slots=True)
class RegistryInfo:
    """A running registry. ``registry`` is ``127.0.0.1:PORT`` as written in image references."""

    url: str
    host: str
    port: int
    registry: str
    root: Path
    config_file: Path
    log_file: Path
    auth: str | None
    tls: bool
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None
    pki: LocalPKI | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """The registry stops answering until the block ends: its process is stopped (SIGSTOP),
        so connections hang as over a dead link instead of being refused."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def config(self, **overrides: object) -> RegistryConfig:
        """The client configuration for this registry (plain HTTP unless TLS, our CA)."""
        values: dict[str, object] = {
            "plain_http": not self.tls,
            "ca_file": str(self.ca_file) if self.ca_file else None,
        }
        values.update(overrides)
        return RegistryConfig(self.registry, **values)  # type: ignore[arg-type]

    def configs(self, **overrides: object) -> list[RegistryConfig]:
        """``config()`` plus, with token auth, the token server's host marked plain HTTP."""
        result = [self.config(**overrides)]
        if self.token_server is not None:
            result.append(RegistryConfig(self.token_server.host, plain_http=True))
        return result

    def write_auth_file(self, path: str | os.PathLike, username: str | None = None, password: str | None = None,
                        *, style: str = "auth") -> Path:
        """A docker ``config.json`` holding credentials for this registry (ours by default)."""
        user = username if username is not None else self.username
        secret = password if password is not None else self.password
        if user is None or secret is None:
            raise ValueError("this registry has no credentials; give username and password")
        return write_auth_file(path, {self.registry: (user, secret)}, style=style)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _probe(url: str, ca_file: Path | None, timeout: float, pki: LocalPKI | None = None) -> int | None:
    """The status ``GET /v2/`` answers with, or None if nothing answers yet."""
    parts = urllib.parse.urlsplit(url)
    try:
        if parts.scheme == "https":
            ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if pki is not None:
                ctx.load_cert_chain(pki.client_cert_file, pki.client_key_file)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=ctx
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None


def registry_environment() -> dict[str, str]:
    """This process's environment minus AWS_CA_BUNDLE: docker-registry 2.8's S3 driver panics at
    start ("unable to load custom CA bundle, HTTPClient's transport unsupported type") when it is
    set, as it is on some machines for other tools."""
    return {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate *process*, kill it if it lingers, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@contextlib.contextmanager
def running_registry(
    tmpdir: str | os.PathLike,
    auth: str | None = None,
    tls: bool = False,
    *,
    username: str = DEFAULT_USERNAME,
    password: str | None = None,
    token_expires_in: int = 300,
    anonymous_pull: bool = False,
    refresh_tokens: dict[str, str] | None = None,
    client_certs: bool = False,
    tls_hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost"),
    proxy_remote: str | None = None,
    storage_driver: dict | None = None,
    start_timeout: float = 30.0,
) -> Iterator[RegistryInfo]:
    """Run ``docker-registry`` on a free 127.0.0.1 port with storage under *tmpdir*.

    *auth*: None (anonymous), ``"htpasswd"`` (Basic) or ``"token"`` (Bearer via a
    ``TokenServer``); *password* defaults to a random one. The registry is
    stopped, and the token server shut down, when the block exits. With *client_certs* (and
    *tls*) the registry demands a client certificate signed by its CA (``http.tls.clientcas``;
    ``info.pki`` has one). *tls_hosts* are the names its certificate is for. *proxy_remote*
    (a URL) makes it a pull-through mirror of that registry. *storage_driver* replaces the
    filesystem storage driver's section (e.g. ``{"s3": {...}}``, see tests.support.s3).
    """
    if auth not in (None, "htpasswd", "token"):
        raise ValueError(f"auth must be None, 'htpasswd' or 'token', not {auth!r}")
    binary = registry_binary()
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    storage = base / "storage"
    storage.mkdir(exist_ok=True)
    secret = password if password is not None else secrets.token_urlsafe(12)
    config: dict = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"secret": secrets.token_hex(16), "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    pki = make_pki(base / "pki", tls_hosts) if tls else None
    if pki is not None:
        config["http"]["tls"] = {"certificate": str(pki.cert_file), "key": str(pki.key_file)}
        if client_certs:
            config["http"]["tls"]["clientcas"] = [str(pki.ca_file)]
    if proxy_remote is not None:
        config["proxy"] = {"remoteurl": proxy_remote}
    if storage_driver is not None:
        config["storage"] = {**storage_driver, "delete": {"enabled": True},
                             "maintenance": {"uploadpurging": {"enabled": False}}}
    token_server: TokenServer | None = None
    with contextlib.ExitStack() as stack:
        if auth == "htpasswd":
            htpasswd = base / "htpasswd"
            htpasswd.write_text(htpasswd_line(username, secret) + "\n")
            config["auth"] = {"htpasswd": {"realm": "lazyfs-test", "path": str(htpasswd)}}
        elif auth == "token":
            token_server = TokenServer(
                base / "token", {username: secret}, expires_in=token_expires_in,
                anonymous_pull=anonymous_pull, refresh_tokens=refresh_tokens,
            )
            stack.enter_context(token_server)
            config["auth"] = {
                "token": {
                    "realm": token_server.realm,
                    "service": token_server.service,
                    "issuer": token_server.issuer,
                    "rootcertbundle": str(token_server.cert_file),
                }
            }
        log_file = base / "registry.log"
        config_file = base / "config.yml"  # JSON is YAML, and needs no escaping care
        attempts = 3  # another process may grab the free port before the registry binds it
        for attempt in range(1, attempts + 1):
            port = free_port()
            config["http"]["addr"] = f"127.0.0.1:{port}"
            config_file.write_text(json.dumps(config, indent=2))
            scheme = "https" if tls else "http"
            info = RegistryInfo(
                url=f"{scheme}://127.0.0.1:{port}", host="127.0.0.1", port=port, registry=f"127.0.0.1:{port}",
                root=storage, config_file=config_file, log_file=log_file, auth=auth, tls=tls,
                ca_file=pki.ca_file if pki else None,
                username=username if auth else None, password=secret if auth else None,
                token_server=token_server, pki=pki,
            )
            with open(log_file, "ab") as log:
                process = subprocess.Popen(
                    [binary, "serve", str(config_file)], stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, cwd=base, env=registry_environment(),
                )
            info.process = process
            try:
                deadline = time.monotonic() + start_timeout
                status = None
                while time.monotonic() < deadline and process.poll() is None:
                    status = _probe(info.url, info.ca_file, timeout=2.0, pki=pki if client_certs else None)
                    if status in (200, 401):
                        break
                    time.sleep(0.05)
                if status not in (200, 401):
                    exited = process.poll()
                    stop_process(process)
                    tail = info.log_tail()
                    if exited is not None and "address already in use" in tail and attempt < attempts:
                        continue
                    why = (
                        f"exited with {exited}" if exited is not None else f"did not answer within {start_timeout}s"
                    )
                    raise RuntimeError(f"docker-registry {why}; log {log_file}:\n{tail}")
                yield info
                return
            finally:
                stop_process(process)


def registry_fixture(
    auth: str | None = None, tls: bool = False, *, scope: str = "module", name: str | None = None, **options
) -> Callable:
    """A pytest fixture yielding a ``RegistryInfo``; assign it in a test module::

        registry = registry_fixture()
        basic_registry = registry_fixture(auth="htpasswd")
    """
    import pytest

    @pytest.fixture(scope=scope, name=name)
    def _registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryInfo]:
        with running_registry(tmp_path_factory.mktemp("registry"), auth=auth, tls=tls, **options) as info:
            yield info

    return _registry
