"""Image references and WWW-Authenticate challenges (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.errors import FormatError
from lazyfs.format.reference import (
    Challenge,
    Reference,
    parse_challenges,
    parse_reference,
    parse_www_authenticate,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, expected",
    [
        ("localhost:5000/app:1", Reference("localhost:5000", "app", "1", None)),
        ("localhost/app", Reference("localhost", "app", None, None)),
        (f"127.0.0.1:5000/a/b@{D}", Reference("127.0.0.1:5000", "a/b", None, D)),
        (f"127.0.0.1:5000/a/b:v2.1-rc_3@{D}", Reference("127.0.0.1:5000", "a/b", "v2.1-rc_3", D)),
        ("registry.example.com/team/tool", Reference("registry.example.com", "team/tool")),
        ("[::1]:5000/x/y:z", Reference("[::1]:5000", "x/y", "z")),
        ("Registry.Local/app", Reference("Registry.Local", "app")),
        ("debian:12", Reference("docker.io", "library/debian", "12")),
        ("debian", Reference("docker.io", "library/debian")),
        ("team/tool:1", Reference("docker.io", "team/tool", "1")),
        ("a/b__c/d-e--f/g.h:latest", Reference("docker.io", "a/b__c/d-e--f/g.h", "latest")),
        ("host:5000/app:5000", Reference("host:5000", "app", "5000")),
    ],
)
def test_parse(text: str, expected: Reference) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert parse_reference(str(ref)) == ref


def test_properties() -> None:
    ref = parse_reference(f"localhost:5000/a/b:1@{D}")
    assert ref.name == "localhost:5000/a/b"
    assert ref.reference == D  # the digest wins over the tag
    assert ref.with_digest(None).reference == "1"
    assert ref.repo() == Reference("localhost:5000", "a/b")
    assert ref.repo().reference == "latest"
    assert str(ref.with_tag("2")) == f"localhost:5000/a/b:2@{D}"
    assert parse_reference("app", default_registry="127.0.0.1:5000") == Reference("127.0.0.1:5000", "app")
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        "",
        " localhost:5000/app",
        "localhost:5000/app :1",
        "localhost:5000/App",
        "localhost:5000/app:",
        "localhost:5000/app:-bad",
        "localhost:5000/app:" + "x" * 129,
        "localhost:5000//app",
        "localhost:5000/app/",
        "localhost:5000/a..b",
        "localhost:5000/a_-b",
        "localhost:5000/app@sha256:abc",
        f"localhost:5000/app@md5:{'ab' * 16}",
        f"localhost:5000/app@sha256:{'AB' * 32}",
        f"localhost:5000/app@{D}@{D}",
        "localhost:99999/app",
        "localhost:0/app",
        "-host.com/app",
        "host_name.com/app",
        "localhost:5000/" + "a" * 260,
        "/app",
        "@" + D,
    ],
)
def test_garbage(text: str) -> None:
    with pytest.raises(FormatError):
        parse_reference(text)


def test_constructor_validates() -> None:
    with pytest.raises(FormatError):
        Reference("localhost:5000", "UPPER")
    with pytest.raises(FormatError):
        Reference("bad host", "app")
    with pytest.raises(FormatError):
        Reference("localhost", "app", digest="sha256:00")


_component = st.from_regex(r"\A[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+){0,2}\Z")
_host = st.sampled_from(["localhost:5000", "127.0.0.1:5000", "registry.example.com", "a-b.c:1", "[::1]:443"])
_tag = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}\Z")
_digest = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


@given(
    host=_host,
    parts=st.lists(_component, min_size=1, max_size=4),
    tag=st.none() | _tag,
    digest=st.none() | _digest,
)
def test_round_trip(host: str, parts: list[str], tag: str | None, digest: str | None) -> None:
    ref = Reference(host, "/".join(parts), tag, digest)
    assert parse_reference(str(ref)) == ref


@given(st.text(max_size=80))
def test_never_crashes(text: str) -> None:
    try:
        ref = parse_reference(text)
    except FormatError:
        return
    assert parse_reference(str(ref)) == ref


# --- WWW-Authenticate ---------------------------------------------------------------------------


def test_bearer() -> None:
    c = parse_www_authenticate(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push repository:c:pull"'
    )
    assert c.scheme == "bearer"
    assert c.get("realm") == "https://auth.example.com/token"
    assert c.get("Service") == "registry.example.com"
    assert c.scopes == ("repository:a/b:pull,push", "repository:c:pull")


def test_basic_and_spacing() -> None:
    c = parse_www_authenticate('basic  Realm = "Registry Realm" , charset="UTF-8"')
    assert c == Challenge("basic", {"realm": "Registry Realm", "charset": "UTF-8"})


def test_quoted_escapes_and_commas() -> None:
    c = parse_www_authenticate(r'Bearer realm="a,b \"c\" \\ d", error=insufficient_scope')
    assert c.params == {"realm": 'a,b "c" \\ d', "error": "insufficient_scope"}


def test_several_challenges_prefers_bearer() -> None:
    header = 'Basic realm="x", Newauth realm="y", title=Login, Bearer realm="z",service=s'
    all_ = parse_challenges(header)
    assert [c.scheme for c in all_] == ["basic", "newauth", "bearer"]
    assert all_[1].params == {"realm": "y", "title": "Login"}
    assert parse_www_authenticate(header) == Challenge("bearer", {"realm": "z", "service": "s"})
    assert parse_www_authenticate('Basic realm="x"').scheme == "basic"


def test_token68_and_bare_scheme() -> None:
    # "realm=" with no value is, by RFC 7235's grammar, a token68.
    assert parse_challenges("Bearer realm=") == [Challenge("bearer", {"token68": "realm="})]
    assert parse_challenges("Negotiate abc/+def==") == [Challenge("negotiate", {"token68": "abc/+def=="})]
    assert parse_challenges("Negotiate, Basic realm=r") == [
        Challenge("negotiate", {}),
        Challenge("basic", {"realm": "r"}),
    ]


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        '"Bearer"',
        'Bearer realm="unterminated',
        "Bearer realm=, service=x",
        'Bearer realm="a" service="b"',
        'Bearer realm="a", realm="b"',
        "Bearer realm=a b=c d",
        'Bearer realm="a\x01"',
        "Bearer =x",
    ],
)
def test_challenge_garbage(header: str) -> None:
    with pytest.raises(FormatError):
        parse_www_authenticate(header)


@given(st.text(max_size=60))
def test_challenge_never_crashes(header: str) -> None:
    try:
        challenges = parse_challenges(header)
    except FormatError:
        return
    assert challenges and all(c.scheme for c in challenges)
