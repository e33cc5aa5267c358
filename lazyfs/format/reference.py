"""Image references and HTTP auth challenges: strings <-> values, no I/O.

An image reference names a repository in a registry plus, optionally, a tag
and/or a content digest, docker style::

    localhost:5000/app:1
    127.0.0.1:5000/a/b@sha256:<64 hex>
    registry.example.com/team/tool:2.1@sha256:<64 hex>
    debian:12                      # -> docker.io/library/debian:12

``parse_www_authenticate`` reads the ``WWW-Authenticate`` header a registry
sends with a 401 (RFC 7235 challenges: ``Bearer realm="…",service="…"``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from lazyfs.errors import FormatError
from lazyfs.format.digest import check_digest

DEFAULT_REGISTRY = "docker.io"

# One DNS label (letters, digits, inner hyphens), dotted labels, or a bracketed
# IPv6 literal; then an optional port.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::([0-9]{{1,5}}))?$")
# A path component: lowercase alphanumerics joined by '.', '_', '__' or runs of '-'.
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_MAX_NAME = 255  # registry/repository, as the distribution spec limits it


def check_registry(registry: str) -> str:
    """Return *registry* (``host[:port]``) if well formed, else FormatError."""
    m = _HOST.match(registry) if isinstance(registry, str) else None
    if m is None:
        raise FormatError(f"registry {registry!r}: not a host[:port]")
    if m.group(1) is not None and not 0 < int(m.group(1)) <= 65535:
        raise FormatError(f"registry {registry!r}: port out of range")
    return registry


def check_repository(repository: str) -> str:
    """Return *repository* (``a/b/c``, lowercase components) if well formed, else FormatError."""
    if not isinstance(repository, str) or not repository:
        raise FormatError(f"repository {repository!r}: empty")
    for part in repository.split("/"):
        if not _COMPONENT.match(part):
            raise FormatError(
                f"repository {repository!r}: component {part!r} must be lowercase letters and digits "
                "joined by '.', '_', '__' or '-'"
            )
    return repository


def check_tag(tag: str) -> str:
    """Return *tag* if it is a valid tag (``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``), else FormatError."""
    if not isinstance(tag, str) or not _TAG.match(tag):
        raise FormatError(f"tag {tag!r}: must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed image reference. ``str(ref)`` gives the canonical text, which parses back to *ref*.

    ``tag`` and ``digest`` are both optional; when both are present the digest
    wins for fetching (the tag is informational, as in docker).
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        check_registry(self.registry)
        check_repository(self.repository)
        if len(self.registry) + 1 + len(self.repository) > _MAX_NAME:
            raise FormatError(f"reference {self.registry}/{self.repository}: name longer than {_MAX_NAME}")
        if self.tag is not None:
            check_tag(self.tag)
        if self.digest is not None:
            check_digest(self.digest, "reference digest")

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if any, else the tag, else ``latest``."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.registry, self.repository, tag, self.digest)

    def with_digest(self, digest: str | None) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def repo(self) -> Reference:
        """The same repository with no tag and no digest."""
        return Reference(self.registry, self.repository)

    @classmethod
    def parse(cls, text: str, default_registry: str = DEFAULT_REGISTRY) -> Reference:
        return parse_reference(text, default_registry)


def _looks_like_registry(first: str) -> bool:
    # Docker's rule: the first component is a registry if it has a dot or a
    # port, is "localhost", or has uppercase (repositories are lowercase).
    return "." in first or ":" in first or first == "localhost" or first.startswith("[") or first != first.lower()


def parse_reference(text: str, default_registry: str = DEFAULT_REGISTRY) -> Reference:
    """Parse ``[host[:port]/]repo/path[:tag][@digest]`` into a Reference (FormatError if malformed).

    Without a registry component the reference is on *default_registry*; on
    ``docker.io`` a one-component repository gets the ``library/`` prefix.
    """
    if not isinstance(text, str) or not text:
        raise FormatError(f"image reference {text!r}: empty")
    if any(c.isspace() for c in text) or len(text) > 4096:
        raise FormatError(f"image reference {text!r}: contains whitespace or is too long")
    name, at, digest = text.partition("@")
    if at:
        if "@" in digest:
            raise FormatError(f"image reference {text!r}: more than one '@'")
        check_digest(digest, f"image reference {text!r}: digest")
    else:
        digest = None
    tag = None
    colon, slash = name.rfind(":"), name.rfind("/")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not tag:
            raise FormatError(f"image reference {text!r}: empty tag after ':'")
    first, sep, rest = name.partition("/")
    if sep and _looks_like_registry(first):
        registry, repository = first, rest
    else:
        registry, repository = default_registry, name
        if registry == DEFAULT_REGISTRY and "/" not in repository:
            repository = f"library/{repository}"
    try:
        return Reference(registry, repository, tag, digest)
    except FormatError as e:
        raise FormatError(f"image reference {text!r}: {e}") from None


# --- WWW-Authenticate -------------------------------------------------------------------------

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = _TCHAR | frozenset("/=")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One auth challenge: ``scheme`` lowercased (``"bearer"``, ``"basic"``), ``params`` with
    lowercased names and unquoted values. A token68 credential, if any, is under ``"token68"``."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict, hash=False)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name.lower(), default)

    @property
    def scopes(self) -> tuple[str, ...]:
        """The space-separated ``scope`` parameter split into scopes."""
        return tuple(self.params.get("scope", "").split())


class _Scanner:
    """A cursor over a header value; every method raises FormatError with the position."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, what: str) -> FormatError:
        return FormatError(f"WWW-Authenticate {self.text!r}: {what} at offset {self.pos}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def token(self, chars: frozenset[str] = _TCHAR) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        assert self.peek() == '"'
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == '"':
                return "".join(out)
            if c == "\\":
                if self.pos >= len(self.text):
                    break
                c = self.text[self.pos]
                self.pos += 1
            elif ord(c) < 0x20 and c != "\t":
                raise self.fail("control character in quoted string")
            out.append(c)
        raise self.fail("unterminated quoted string")


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in a ``WWW-Authenticate`` value, in order (FormatError if malformed)."""
    if not isinstance(header, str):
        raise FormatError("WWW-Authenticate: not a string")
    s = _Scanner(header)
    challenges: list[Challenge] = []
    s.skip_ws()
    while not s.at_end():
        if s.peek() == ",":  # empty list elements are allowed by RFC 7230 #rule
            s.pos += 1
            s.skip_ws()
            continue
        scheme = s.token()
        if not scheme:
            raise s.fail("expected an auth scheme")
        params: dict[str, str] = {}
        s.skip_ws()
        # After the scheme: nothing, a token68, or a comma-separated list of name=value.
        # A parameter list ends where the next element is a bare token (the next scheme).
        if not s.at_end() and s.peek() != "," and not _param_follows(header, s.pos):
            token68 = s.token(_TOKEN68)
            if not token68 or "=" in token68.rstrip("="):
                raise s.fail("expected a parameter or a token68")
            s.skip_ws()
            if not s.at_end() and s.peek() != ",":
                raise s.fail("expected ',' after token68")
            params["token68"] = token68
            challenges.append(Challenge(scheme.lower(), params))
            continue
        while not s.at_end():
            save = s.pos
            name = s.token()
            s.skip_ws()
            if not name or s.peek() != "=":
                s.pos = save  # a new challenge begins here
                break
            s.pos += 1
            s.skip_ws()
            if s.peek() == '"':
                value = s.quoted()
            else:
                value = s.token()
                if not value:
                    raise s.fail(f"missing value for parameter {name!r}")
            key = name.lower()
            if key in params:
                raise s.fail(f"parameter {name!r} given twice")
            params[key] = value
            s.skip_ws()
            if s.at_end():
                break
            if s.peek() != ",":
                raise s.fail("expected ',' between parameters")
            s.pos += 1
            s.skip_ws()
            while s.peek() == ",":
                s.pos += 1
                s.skip_ws()
        challenges.append(Challenge(scheme.lower(), params))
    if not challenges:
        raise FormatError(f"WWW-Authenticate {header!r}: no challenge")
    return challenges


def _param_follows(text: str, pos: int) -> bool:
    """Whether an ``name = value`` parameter starts at *pos* (as opposed to a token68)."""
    s = _Scanner(text)
    s.pos = pos
    if not s.token():
        return False
    s.skip_ws()
    if s.peek() != "=":
        return False
    s.pos += 1
    s.skip_ws()
    # "abc==" is a token68 whose padding looks like '='; a parameter has a value after '='.
    return s.peek() == '"' or (s.peek() != "" and s.peek() in _TCHAR and s.peek() != "=")


def parse_www_authenticate(header: str) -> Challenge:
    """The challenge to answer from a ``WWW-Authenticate`` value: the first Bearer one if any,
    else the first challenge (FormatError if malformed or empty)."""
    challenges = parse_challenges(header)
    for c in challenges:
        if c.scheme == "bearer":
            return c
    return challenges[0]
