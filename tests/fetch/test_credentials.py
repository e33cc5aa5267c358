"""Docker-style credentials files: parsing, host keys, reload."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import trio

from lazyfs.errors import ConfigError
from lazyfs.fetch.credentials import Credential, Credentials, normalize_registry_key, parse_auths, parse_docker_config


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_parse_forms() -> None:
    doc = {
        "auths": {
            "127.0.0.1:5000": {"auth": _b64("alice:s3cr:et")},
            "https://index.docker.io/v1/": {"username": "bob", "password": "pw"},
            "http://reg.example.com:8443/v2/": {"auth": _b64("carol:x"), "identitytoken": "refresh-1"},
            "placeholder.example.com": {},
        },
        "credsStore": "desktop",
    }
    got = parse_auths(json.dumps(doc).encode(), "cfg.json")
    assert got == {
        "127.0.0.1:5000": Credential("alice", "s3cr:et"),
        "docker.io": Credential("bob", "pw"),
        "reg.example.com:8443": Credential("carol", "x", "refresh-1"),
    }
    assert "s3cr" not in repr(got["127.0.0.1:5000"])


@pytest.mark.parametrize(
    "key, host",
    [
        ("localhost:5000", "localhost:5000"),
        ("https://localhost:5000/v1/", "localhost:5000"),
        ("HTTPS://Registry.Example.com", "registry.example.com"),
        ("registry-1.docker.io", "docker.io"),
        ("index.docker.io", "docker.io"),
    ],
)
def test_keys(key: str, host: str) -> None:
    assert normalize_registry_key(key) == host


@pytest.mark.parametrize(
    "doc, needle",
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "top level"),
        (json.dumps({"auths": []}).encode(), "'auths'"),
        (json.dumps({"auths": {"h:1": "x"}}).encode(), "auths['h:1']"),
        (json.dumps({"auths": {"h:1": {"auth": "!!!"}}}).encode(), "auths['h:1']: 'auth' is not base64"),
        (json.dumps({"auths": {"h:1": {"auth": _b64("nocolon")}}}).encode(), "auths['h:1']"),
        (json.dumps({"auths": {"h:1": {"username": "u"}}}).encode(), "without 'password'"),
        (json.dumps({"auths": {"h:1": {"username": 5, "password": "p"}}}).encode(), "'username' must be a string"),
        (json.dumps({"auths": {"h:1": {"auth": _b64("a:b"), "username": "c"}}}).encode(), "different users"),
        (json.dumps({"auths": {"h:1": {"auth": _b64("a:b")}, "https://h:1/v1/": {"auth": _b64("a:b")}}}).encode(),
         "second entry"),
    ],
)
def test_malformed_names_file_and_key(doc: bytes, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_auths(doc, "/etc/lazyfs/auth.json")
    assert "/etc/lazyfs/auth.json" in str(e.value) and needle in str(e.value)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_file_reload_and_reread_on_change(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    clock = Clock()
    creds = Credentials(path, recheck_seconds=5, clock=clock)
    assert creds.lookup("127.0.0.1:5000") is None  # no file yet: anonymous
    path.write_text(json.dumps({"auths": {"127.0.0.1:5000": {"username": "u", "password": "one"}}}))
    assert creds.lookup("127.0.0.1:5000") is None  # not looked at again before recheck_seconds
    clock.now += 5
    assert creds.lookup("127.0.0.1:5000") == Credential("u", "one")  # the change is seen
    reloads = creds.reloads
    clock.now += 5
    assert creds.lookup("127.0.0.1:5000") == Credential("u", "one") and creds.reloads == reloads  # unchanged: no re-read
    path.write_text(json.dumps({"auths": {"127.0.0.1:5000": {"auth": _b64("u:two")}}}))
    creds.reload()
    assert creds.lookup("127.0.0.1:5000") == Credential("u", "two")
    path.write_text("{garbage")
    with pytest.raises(ConfigError, match=str(path)):
        creds.reload()
    assert creds.lookup("127.0.0.1:5000") == Credential("u", "two")  # a bad file keeps the last good one


HELPER = """#!/bin/sh
# a docker credential helper: `get` reads the server on stdin, answers JSON
[ "$1" = get ] || exit 2
read server
echo "$server" >> "{log}"
case "$server" in
  good.test) printf '{{"ServerURL":"good.test","Username":"helped","Secret":"{secret}"}}' ;;
  token.test) printf '{{"ServerURL":"token.test","Username":"<token>","Secret":"refresh-xyz"}}' ;;
  broken.test) echo "{{not json {secret}" ;;
  failing.test) echo "keychain locked" >&2; exit 3 ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
"""


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """docker-credential-lazyfstest on PATH; returns (its call log, its secret)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    secret = "s3cret-from-the-helper"
    script = bindir / "docker-credential-lazyfstest"
    log = tmp_path / "helper.log"
    script.write_text(HELPER.format(log=log, secret=secret))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return log, secret


def test_credential_helpers(tmp_path: Path, helper: tuple[Path, str]) -> None:
    log, secret = helper
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "auths": {"fallback.test": {"auth": _b64("file-user:file-pw")}, "good.test": {}},
        "credsStore": "lazyfstest",
        "credHelpers": {"https://other.test/v1/": "missing-helper"},
    }))
    clock = Clock()
    creds = Credentials(path, clock=clock, helper_ttl=60)
    assert creds.lookup("good.test") == Credential("helped", secret)
    assert creds.lookup("token.test") == Credential("", "", identity_token="refresh-xyz")
    assert creds.lookup("fallback.test") == Credential("file-user", "file-pw")  # helper has none: the file's
    assert creds.lookup("nowhere.test") is None
    assert creds.lookup("docker.io") is None
    calls = log.read_text().split()
    assert calls == ["good.test", "token.test", "fallback.test", "nowhere.test", "https://index.docker.io/v1/"]
    assert creds.lookup("good.test") == Credential("helped", secret) and creds.helper_calls == 5  # cached
    clock.now += 61
    creds.lookup("good.test")
    assert creds.helper_calls == 6  # after helper_ttl: asked again
    with pytest.raises(ConfigError, match="docker-credential-missing-helper is not on PATH"):
        creds.lookup("other.test")
    with pytest.raises(ConfigError) as e:
        creds.lookup("broken.test")
    assert "not JSON" in str(e.value) and secret not in str(e.value)  # never echo what may be a secret
    with pytest.raises(ConfigError, match="exit 3: keychain locked"):
        creds.lookup("failing.test")
    assert secret not in repr(creds) and secret not in repr(creds.lookup("good.test"))


def test_helper_lookups_from_trio_share_one_run(tmp_path: Path, helper: tuple[Path, str]) -> None:
    log, secret = helper
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"credHelpers": {"good.test": "lazyfstest"}}))
    creds = Credentials(path)

    async def concurrent() -> None:
        out: list = []

        async def one() -> None:
            out.append(await creds.get_async("good.test"))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
        assert out == [Credential("helped", secret)] * 8

    trio.run(concurrent)
    assert log.read_text().split() == ["good.test"]


def test_bad_helper_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="credsStore"):
        parse_docker_config(json.dumps({"credsStore": "../../bin/sh"}).encode(), "cfg.json")
    with pytest.raises(ConfigError, match="credHelpers"):
        parse_docker_config(json.dumps({"credHelpers": {"h": 5}}).encode(), "cfg.json")
    got = parse_docker_config(json.dumps({"credHelpers": {"https://H.test/v1/": "x"}, "credsStore": "y"}).encode())
    assert got.helper_for("h.test") == "x" and got.helper_for("else.test") == "y"


def test_fixed_entries_and_none() -> None:
    creds = Credentials(None, entries={"https://h:1/v1/": Credential("a", "b")})
    assert creds.lookup("h:1") == Credential("a", "b")
    creds.reload()
    assert creds.lookup("h:1") == Credential("a", "b")
    assert creds.lookup("other") is None
