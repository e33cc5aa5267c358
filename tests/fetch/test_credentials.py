"""Docker-style credentials files: parsing, host keys, reload."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from lazyfs.errors import ConfigError
from lazyfs.fetch.credentials import Credential, Credentials, normalize_registry_key, parse_auths


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


def test_file_reload(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    creds = Credentials(path)
    assert creds.lookup("127.0.0.1:5000") is None  # no file yet: anonymous
    path.write_text(json.dumps({"auths": {"127.0.0.1:5000": {"username": "u", "password": "one"}}}))
    assert creds.lookup("127.0.0.1:5000") is None  # not re-read until asked
    creds.reload()
    assert creds.lookup("127.0.0.1:5000") == Credential("u", "one")
    path.write_text(json.dumps({"auths": {"127.0.0.1:5000": {"auth": _b64("u:two")}}}))
    creds.reload()
    assert creds.lookup("127.0.0.1:5000") == Credential("u", "two")
    path.write_text("{garbage")
    with pytest.raises(ConfigError, match=str(path)):
        creds.reload()
    assert creds.lookup("127.0.0.1:5000") == Credential("u", "two")  # a bad file keeps the last good one


def test_fixed_entries_and_none() -> None:
    creds = Credentials(None, entries={"https://h:1/v1/": Credential("a", "b")})
    assert creds.lookup("h:1") == Credential("a", "b")
    creds.reload()
    assert creds.lookup("h:1") == Credential("a", "b")
    assert creds.lookup("other") is None
