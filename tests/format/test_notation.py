"""Notary Project signature verification (lazyfs.format.notation), without I/O.

Certificates come from openssl, envelopes from jwcrypto in the JWS format
`notation sign` writes (tests/support/notation.py). Each refusal names the
check that failed; anything malformed is a LazyfsError, never another exception.
"""

import base64
import datetime
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.errors import FormatError, LazyfsError, TrustError
from lazyfs.format import notation
from tests.support.notation import TestSigner

TARGET = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "ab" * 32, "size": 1234}


def now() -> datetime.datetime:  # certificates are made by the fixture: valid from their creation on
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def signers(tmp_path_factory):
    base = tmp_path_factory.mktemp("signers")
    return {
        "rsa": TestSigner(str(base / "rsa"), "acme", key="rsa"),
        "ec": TestSigner(str(base / "ec"), "acme", key="ec"),
        "lone": TestSigner(str(base / "lone"), "solo", key="ec", self_signed=True),
        "other": TestSigner(str(base / "other"), "mallory", key="ec"),
        "server": TestSigner(str(base / "server"), "acme", key="ec", leaf_extensions=(
            "basicConstraints=CA:false\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")),
        "noncritical": TestSigner(str(base / "noncritical"), "acme", key="ec", leaf_extensions=(
            "basicConstraints=CA:false\nkeyUsage=digitalSignature\n")),
    }


def store_of(*signers, identities=("*",)):
    roots = []
    for s in signers:
        with open(s.root, "rb") as f:
            roots += notation.parse_certificates(f.read(), s.root)
    return notation.make_trust_store(roots, identities)


@pytest.mark.parametrize("kind", ["rsa", "ec", "lone"])
def test_a_signature_verifies_against_its_root(signers, kind):
    s = signers[kind]
    signer = notation.verify_envelope(s.envelope(TARGET), TARGET, store_of(s), now())
    assert "O=acme" in signer.subject or "O=solo" in signer.subject
    assert len(signer.thumbprints) == len(s.chain)
    assert s.alg == ("PS384" if kind == "rsa" else "ES256")


def test_a_signature_by_another_key_is_refused(signers):
    with pytest.raises(TrustError, match="does not lead to a trusted root"):
        notation.verify_envelope(signers["other"].envelope(TARGET), TARGET, store_of(signers["ec"]), now())


def test_the_signature_names_exactly_the_artifact(signers):
    s = signers["ec"]
    for key, value in (("digest", "sha256:" + "cd" * 32), ("size", 1235), ("mediaType", "application/x")):
        with pytest.raises(TrustError, match=f"signs {key}"):
            notation.verify_envelope(s.envelope(TARGET), {**TARGET, key: value}, store_of(s), now())


def test_a_swapped_payload_breaks_the_signature(signers):
    s = signers["rsa"]
    doc = json.loads(s.envelope(TARGET))
    other = {"targetArtifact": {**TARGET, "digest": "sha256:" + "ee" * 32}}
    doc["payload"] = base64.urlsafe_b64encode(json.dumps(other).encode()).decode().rstrip("=")
    with pytest.raises(TrustError, match="does not verify"):
        notation.verify_envelope(json.dumps(doc).encode(), other["targetArtifact"], store_of(s), now())


def test_the_algorithm_is_the_one_the_key_allows(signers):
    s = signers["rsa"]  # RSA-3072: PS384 only
    with pytest.raises(TrustError, match="does not match the signing key"):
        notation.verify_envelope(s.envelope(TARGET, alg="PS256"), TARGET, store_of(s), now())


def test_signed_attributes(signers):
    s = signers["ec"]
    store = store_of(s)
    with pytest.raises(TrustError, match="not understood"):
        notation.verify_envelope(s.envelope(TARGET, protected={
            "io.cncf.notary.verificationPlugin": "com.example.plugin",
            "crit": [notation.HEADER_SCHEME, "io.cncf.notary.verificationPlugin"]}), TARGET, store, now())
    with pytest.raises(TrustError, match="expired"):
        notation.verify_envelope(s.envelope(TARGET, protected={
            notation.HEADER_EXPIRY: "2020-01-01T00:00:00Z",
            "crit": [notation.HEADER_SCHEME, notation.HEADER_EXPIRY]}), TARGET, store, now())
    later = (now() + datetime.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    notation.verify_envelope(s.envelope(TARGET, protected={
        notation.HEADER_EXPIRY: later, "crit": [notation.HEADER_SCHEME, notation.HEADER_EXPIRY]}), TARGET, store, now())
    with pytest.raises(TrustError, match="signing scheme"):
        notation.verify_envelope(s.envelope(TARGET, protected={
            notation.HEADER_SCHEME: "notary.x509.signingAuthority"}), TARGET, store, now())
    with pytest.raises(TrustError, match="content type"):
        notation.verify_envelope(s.envelope(TARGET, protected={"cty": "application/json"}), TARGET, store, now())
    with pytest.raises(TrustError, match="crit must list"):
        notation.verify_envelope(s.envelope(TARGET, drop=("crit",)), TARGET, store, now())
    with pytest.raises(FormatError, match="signing time"):
        notation.verify_envelope(s.envelope(TARGET, drop=(notation.HEADER_SIGNING_TIME,)), TARGET, store, now())


def test_certificate_requirements(signers):
    with pytest.raises(TrustError, match="serverAuth"):
        s = signers["server"]
        notation.verify_envelope(s.envelope(TARGET), TARGET, store_of(s), now())
    with pytest.raises(TrustError, match="critical keyUsage"):
        s = signers["noncritical"]
        notation.verify_envelope(s.envelope(TARGET), TARGET, store_of(s), now())


def test_the_chain_is_exactly_leaf_to_root(signers):
    s, other = signers["ec"], signers["other"]
    x5c = json.loads(s.envelope(TARGET))["header"]["x5c"]
    other_root = json.loads(other.envelope(TARGET))["header"]["x5c"][-1]
    for bad, match in (([x5c[0]], "not in a root"), ([x5c[0], other_root], "not exactly"),
                       ([x5c[0], x5c[1], x5c[1]], "CA certificate|not exactly|does not lead"),
                       ([x5c[1], x5c[0]], "does not verify|is a CA certificate|not in a root")):
        with pytest.raises(TrustError, match=match):
            notation.verify_envelope(s.envelope(TARGET, x5c=bad), TARGET, store_of(s, other), now())


def test_certificates_must_be_valid_now(signers):
    s = signers["ec"]
    with pytest.raises(TrustError, match="not valid at validation time"):
        notation.verify_envelope(s.envelope(TARGET), TARGET, store_of(s), now() + datetime.timedelta(days=400))


def test_trusted_identities(signers):
    s = signers["ec"]
    env = s.envelope(TARGET)
    ok = store_of(s, identities=["x509.subject: C=US, ST=WA, O=acme"])
    assert notation.verify_envelope(env, TARGET, ok, now()).subject.startswith("CN=acme signer")
    wrong = store_of(s, identities=["x509.subject: C=US, S=WA, O=acme, CN=someone else"])
    with pytest.raises(TrustError, match="none of the trusted identities"):
        notation.verify_envelope(env, TARGET, wrong, now())
    with pytest.raises(FormatError, match="at least C, ST"):
        notation.parse_identity("x509.subject: O=acme")
    assert notation.parse_identity(r"x509.subject: C=US, ST=WA, O=a\, b").attributes[2] == ("O", "a, b")


def test_only_the_flattened_json_serialization(signers):
    s = signers["ec"]
    doc = json.loads(s.envelope(TARGET))
    general = {"payload": doc["payload"], "signatures": [{k: doc[k] for k in ("protected", "header", "signature")}]}
    with pytest.raises(FormatError, match="flattened"):
        notation.verify_envelope(json.dumps(general).encode(), TARGET, store_of(s), now())
    with pytest.raises(FormatError, match="flattened"):
        notation.verify_envelope(json.dumps({**doc, "extra": 1}).encode(), TARGET, store_of(s), now())


def test_signature_manifests(signers):
    s = signers["ec"]
    env = s.envelope(TARGET)
    manifest = json.loads(s.manifest(env, TARGET))
    digest, size = notation.envelope_of(manifest, TARGET["digest"], "sig")
    assert size == len(env) and digest.startswith("sha256:")
    with pytest.raises(FormatError, match="signs"):
        notation.envelope_of(manifest, "sha256:" + "00" * 32, "sig")
    legacy = {**manifest, "config": {**manifest["config"], "mediaType": notation.ARTIFACT_TYPE}}
    del legacy["artifactType"]  # the OCI 1.0 form: the type in config.mediaType
    assert notation.envelope_of(legacy, TARGET["digest"], "sig") == (digest, size)
    with pytest.raises(FormatError, match="not supported"):
        notation.envelope_of({**manifest, "layers": [{**manifest["layers"][0], "mediaType": "application/cose"}]},
                             TARGET["digest"], "sig")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_envelopes_fail_cleanly(signers, data):
    """Any byte damage to a good envelope: refused with a LazyfsError (or, rarely, still valid), never a crash."""
    s = signers["ec"]
    env = bytearray(s.envelope(TARGET))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(env) - 1))
        env[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        env = env[: data.draw(st.integers(0, len(env)))]
    try:
        notation.verify_envelope(bytes(env), TARGET, store_of(s), now())
    except LazyfsError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_arbitrary_json_fails_cleanly(doc):
    store = notation.TrustStore(())
    for envelope in (json.dumps(doc).encode(), json.dumps({"payload": "e30", "protected": "e30", "signature": "",
                                                           "header": doc}).encode()):
        with pytest.raises(LazyfsError):
            notation.verify_envelope(envelope, TARGET, store, now())
