"""Notary Project signatures (the format `notation sign` writes): parse and verify, sans-IO.

A signature of an OCI artifact is an OCI manifest that refers to the artifact
(``subject``), has the artifact type ``application/vnd.cncf.notary.signature``
and one layer: a JWS envelope (``application/jose+json``, JSON flattened
serialization). The envelope's payload names the signed artifact by descriptor
(``{"targetArtifact": {mediaType, digest, size}}``); its protected header
carries the signing scheme and time; its unprotected ``x5c`` header carries the
certificate chain, signing certificate first and root last. See docs/trust.md.

``verify_envelope`` follows the Notary Project verification steps for the
``notary.x509`` signing scheme at the ``strict`` level minus revocation (a host
that reaches only its registries cannot ask OCSP or CRL servers):

1. integrity: the JWS verifies (jwcrypto) with the signing certificate's key,
   under the one algorithm that key allows; the payload names the artifact;
2. authenticity: the chain meets the Notary Project certificate requirements
   and leads, certificate by certificate, to a root in the trust store
   (cryptography's path validation); the signer matches a trusted identity;
3. expiry: an ``io.cncf.notary.expiry`` in the past fails;
4. authentic time: without a timestamp authority, every certificate of the
   chain must be valid now.

Nothing here reads a file or a socket: callers pass bytes and certificates.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from lazyfs.errors import FormatError, TrustError
from lazyfs.format.digest import is_sha256

ARTIFACT_TYPE = "application/vnd.cncf.notary.signature"
MEDIA_TYPE_JWS = "application/jose+json"
MEDIA_TYPE_PAYLOAD = "application/vnd.cncf.notary.payload.v1+json"
ANN_THUMBPRINTS = "io.cncf.notary.x509chain.thumbprint#S256"
SIGNING_SCHEME = "notary.x509"
HEADER_SCHEME = "io.cncf.notary.signingScheme"
HEADER_SIGNING_TIME = "io.cncf.notary.signingTime"
HEADER_EXPIRY = "io.cncf.notary.expiry"
HEADER_AUTHENTIC_TIME = "io.cncf.notary.authenticSigningTime"
HEADER_AGENT = "io.cncf.notary.signingAgent"
HEADER_TIMESTAMP = "io.cncf.notary.timestampSignature"

MAX_ENVELOPE = 256 << 10  # a chain of a few RSA-4096 certificates is ~10 KiB
MAX_CHAIN = 8
MAX_TRUST_STORE_CERTS = 1024
_KNOWN_CRITICAL = {HEADER_SCHEME, HEADER_EXPIRY}
_ENVELOPE_KEYS = {"payload", "protected", "header", "signature"}


# ---------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Identity:
    """One ``x509.subject: C=.., ST=.., O=..`` entry of the trusted identities: RDNs the signer must carry."""

    text: str
    attributes: tuple[tuple[str, str], ...]

    def matches(self, subject: dict[str, set[str]]) -> bool:
        return all(value in subject.get(name, ()) for name, value in self.attributes)


@dataclass(frozen=True, slots=True)
class TrustStore:
    """Root certificates a signature chain may end in, and which signers under them are trusted.

    ``identities`` empty means ``*``: any signing certificate that chains to a root here.
    """

    roots: tuple  # cryptography x509.Certificate: self-signed (a CA, or a lone signing certificate)
    identities: tuple[Identity, ...] = ()
    names: tuple[str, ...] = ()  # where the roots came from, for messages


@dataclass(frozen=True, slots=True)
class Signer:
    """Who signed, as established by a verified signature."""

    subject: str  # RFC 4514 subject of the signing certificate
    root: str  # RFC 4514 subject of the trust store root the chain ends in
    signing_time: str
    thumbprints: tuple[str, ...]  # sha256 of each certificate of the chain, leaf first


# ---------------------------------------------------------------- trust store and identities


def parse_certificates(data: bytes, where: str) -> list:
    """Every certificate in a PEM file (FormatError if there is none or one does not parse)."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise FormatError(f"{where}: not PEM certificates ({exc})") from None
    return certs


def parse_identity(text: str) -> Identity:
    """``x509.subject: C=US, ST=WA, O=acme, OU=build`` (``\\,`` ``\\;`` ``\\\\`` escape; C, ST or S, O required)."""
    prefix, sep, rest = text.partition(":")
    if not sep or prefix.strip() != "x509.subject":
        raise FormatError(f"trusted identity {text!r}: must be '*' or start with 'x509.subject:'")
    attrs: list[tuple[str, str]] = []
    for part in _split_unescaped(rest.strip(), ","):
        name, eq, value = part.partition("=")
        name = name.strip().upper()
        if not eq or not name or not value.strip():
            raise FormatError(f"trusted identity {text!r}: {part.strip()!r} is not NAME=VALUE")
        name = "ST" if name == "S" else name
        if any(n == name for n, _ in attrs):
            raise FormatError(f"trusted identity {text!r}: {name} appears twice")
        attrs.append((name, _unescape(value.strip())))
    names = {n for n, _ in attrs}
    if not {"C", "ST", "O"} <= names:
        raise FormatError(f"trusted identity {text!r}: must name at least C, ST (or S) and O")
    return Identity(text, tuple(attrs))


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def make_trust_store(roots: Iterable, identities: Iterable[str] = ("*",), names: Iterable[str] = ()) -> TrustStore:
    """A TrustStore from parsed root certificates and identity strings (``*`` or ``x509.subject: ...``)."""
    roots = tuple(roots)
    if len(roots) > MAX_TRUST_STORE_CERTS:
        raise FormatError(f"trust store: {len(roots)} certificates, more than {MAX_TRUST_STORE_CERTS}")
    identities = tuple(identities)
    if "*" in identities:
        if len(identities) > 1:
            raise FormatError("trusted identities: '*' must be the only entry")
        parsed: tuple[Identity, ...] = ()
    else:
        if not identities:
            raise FormatError("trusted identities: empty (use '*' to trust every signer under the roots)")
        parsed = tuple(parse_identity(t) for t in identities)
    return TrustStore(roots, parsed, tuple(names))


def subject_attributes(name) -> dict[str, set[str]]:
    """A certificate name as {short attribute name: values}."""
    out: dict[str, set[str]] = {}
    for attr in name:
        out.setdefault(attr.rfc4514_attribute_name.upper(), set()).add(str(attr.value))
    return out


# ---------------------------------------------------------------- signature manifests


def envelope_of(manifest: dict, subject_digest: str, where: str) -> tuple[str, int]:
    """(digest, size) of the JWS envelope a parsed signature manifest stores (FormatError if it is not one)."""
    artifact_type = manifest.get("artifactType")
    config = manifest.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    if ARTIFACT_TYPE not in (artifact_type, config_type):
        raise FormatError(f"{where}: not a Notary Project signature (artifactType {artifact_type!r})")
    subject = manifest.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != subject_digest:
        raise FormatError(f"{where}: signs {subject.get('digest') if isinstance(subject, dict) else None!r}, "
                          f"not {subject_digest}")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise FormatError(f"{where}: a signature manifest has exactly one layer")
    layer = layers[0]
    if layer.get("mediaType") != MEDIA_TYPE_JWS:
        raise FormatError(f"{where}: envelope type {layer.get('mediaType')!r} is not supported "
                          f"(this host verifies {MEDIA_TYPE_JWS} envelopes)")
    digest, size = layer.get("digest"), layer.get("size")
    if not is_sha256(digest):
        raise FormatError(f"{where}: bad envelope digest {digest!r}")
    if type(size) is not int or not 0 < size <= MAX_ENVELOPE:
        raise FormatError(f"{where}: envelope size {size!r} outside 1..{MAX_ENVELOPE}")
    return digest, size


# ---------------------------------------------------------------- verification


def verify_envelope(envelope: bytes, target: dict, store: TrustStore, now: datetime.datetime) -> Signer:
    """Check a JWS envelope signs *target* (``mediaType``, ``digest``, ``size``) under *store* at *now*.

    Returns the signer; raises TrustError naming the first check that fails
    (FormatError for an envelope that does not parse).
    """
    from jwcrypto.common import JWException
    from jwcrypto.jwk import JWK
    from jwcrypto.jws import JWS, JWSEHeaderParameter

    if len(envelope) > MAX_ENVELOPE:
        raise FormatError(f"signature envelope: {len(envelope)} bytes, more than {MAX_ENVELOPE}")
    doc = _strict_json(envelope, "signature envelope")
    if not isinstance(doc, dict) or set(doc) != _ENVELOPE_KEYS:
        raise FormatError("signature envelope: not a flattened JWS JSON serialization "
                          "(exactly payload, protected, header and signature)")
    if not all(isinstance(doc[k], str) for k in ("payload", "protected", "signature")) \
            or not isinstance(doc["header"], dict):
        raise FormatError("signature envelope: payload, protected and signature must be strings, header an object")
    protected = _strict_json(_b64url(doc["protected"], "protected header"), "protected header")
    if not isinstance(protected, dict):
        raise FormatError("signature envelope: the protected header is not an object")
    times = _check_protected(protected, now)
    chain = _chain(doc["header"])
    leaf = chain[0]
    alg = _algorithm(leaf.public_key())
    if protected.get("alg") != alg:
        raise TrustError(f"signature: alg {protected.get('alg')!r} does not match the signing key ({alg})")

    registry = {
        HEADER_SCHEME: JWSEHeaderParameter("Notary signing scheme", True, True, None),
        HEADER_SIGNING_TIME: JWSEHeaderParameter("Notary signing time", False, True, None),
        HEADER_EXPIRY: JWSEHeaderParameter("Notary expiry", True, True, None),
    }
    jws = JWS(header_registry=registry)
    jws.allowed_algs = [alg]
    try:
        jws.deserialize(envelope.decode("utf-8"))
        jws.verify(JWK.from_pyca(leaf.public_key()), alg=alg)
        payload = jws.payload
    except (JWException, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise TrustError(f"signature: the JWS does not verify with its signing certificate ({exc})") from None
    _check_payload(payload, target)
    root = _check_chain(chain, store, now)
    signer_attrs = subject_attributes(leaf.subject)
    if store.identities and not any(i.matches(signer_attrs) for i in store.identities):
        raise TrustError(f"signature: signer {leaf.subject.rfc4514_string()!r} is none of the trusted identities")
    return Signer(leaf.subject.rfc4514_string(), root.subject.rfc4514_string(), times,
                  tuple(thumbprint(c) for c in chain))


def thumbprint(cert) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _strict_json(data: bytes, what: str):
    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        return json.loads(data, object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"{what}: not JSON ({str(exc)[:200]})") from None


def _b64url(text: str, what: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise FormatError(f"signature envelope: {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise FormatError(f"signature envelope: {what} is not base64url") from None


def _rfc3339(value: object, what: str) -> datetime.datetime:
    if not isinstance(value, str) or not re.fullmatch(
            r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", value):
        raise FormatError(f"signature: {what} {value!r} is not an RFC 3339 time")
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FormatError(f"signature: {what} {value!r} is not an RFC 3339 time") from None


def _check_protected(protected: dict, now: datetime.datetime) -> str:
    """The signed attributes: content type, scheme, critical list, times. Returns the signing time."""
    if protected.get("cty") != MEDIA_TYPE_PAYLOAD:
        raise TrustError(f"signature: content type {protected.get('cty')!r} is not {MEDIA_TYPE_PAYLOAD}")
    scheme = protected.get(HEADER_SCHEME)
    if scheme != SIGNING_SCHEME:
        raise TrustError(f"signature: signing scheme {scheme!r} is not supported (this host verifies "
                         f"{SIGNING_SCHEME!r})")
    crit = protected.get("crit")
    if not isinstance(crit, list) or HEADER_SCHEME not in crit or not all(isinstance(c, str) for c in crit):
        raise TrustError(f"signature: crit must list {HEADER_SCHEME}")
    unknown = [c for c in crit if c not in _KNOWN_CRITICAL]
    if unknown:
        raise TrustError(f"signature: critical header(s) {', '.join(unknown)} not understood by this host "
                         f"(verification plugins are not supported)")
    for name in protected:
        if name.startswith("io.cncf.notary.") and name not in (HEADER_SCHEME, HEADER_SIGNING_TIME, HEADER_EXPIRY):
            raise TrustError(f"signature: protected header {name} is not understood by this host")
    if HEADER_EXPIRY in protected and HEADER_EXPIRY not in crit:
        raise TrustError(f"signature: {HEADER_EXPIRY} must be critical")
    signed_at = protected.get(HEADER_SIGNING_TIME)
    _rfc3339(signed_at, "signing time")
    if HEADER_EXPIRY in protected and _rfc3339(protected[HEADER_EXPIRY], "expiry") <= now:
        raise TrustError(f"signature: expired at {protected[HEADER_EXPIRY]}")
    return str(signed_at)


def _chain(header: dict) -> list:
    from cryptography import x509

    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not 1 <= len(x5c) <= MAX_CHAIN or not all(isinstance(c, str) for c in x5c):
        raise FormatError(f"signature: x5c must list 1 to {MAX_CHAIN} certificates")
    from cryptography.exceptions import UnsupportedAlgorithm

    chain = []
    for i, text in enumerate(x5c):
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(text, validate=True))
            # cryptography parses lazily: touch every part the checks read, so damage shows here
            cert.version, cert.public_key(), cert.extensions, cert.subject, cert.issuer, cert.signature_hash_algorithm
            for attr in (*cert.subject, *cert.issuer):
                attr.rfc4514_attribute_name
        except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
            raise FormatError(f"signature: x5c[{i}] is not a base64 DER certificate ({exc})") from None
        chain.append(cert)
    return chain


_ALGS = {2048: "PS256", 3072: "PS384", 4096: "PS512"}
_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def _algorithm(key) -> str:
    """The one JWS algorithm the Notary Project allows for *key*."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey) and key.key_size in _ALGS:
        return _ALGS[key.key_size]
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        return _CURVES[key.curve.name]
    raise TrustError(f"signature: signing key {type(key).__name__} "
                     f"({getattr(key, 'key_size', '?')} bits) is not one the Notary Project allows")


def _check_payload(payload: bytes, target: dict) -> None:
    doc = _strict_json(payload, "signature payload")
    artifact = doc.get("targetArtifact") if isinstance(doc, dict) else None
    if not isinstance(artifact, dict):
        raise TrustError("signature: the payload has no targetArtifact")
    for key in ("mediaType", "digest", "size"):
        if artifact.get(key) != target[key] or type(artifact.get(key)) is not type(target[key]):
            raise TrustError(f"signature: signs {key} {artifact.get(key)!r}, the artifact has {target[key]!r}")


def _check_chain(chain: list, store: TrustStore, now: datetime.datetime):
    """The Notary Project certificate requirements, then path validation to a root of *store*; the root."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509 import verification

    if not store.roots:
        raise TrustError("signature: the trust store holds no certificate")
    root = chain[-1]
    if root.subject != root.issuer:
        raise TrustError(f"signature: the chain ends in {root.subject.rfc4514_string()!r}, not in a root certificate")
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TrustError(f"signature: the root {root.subject.rfc4514_string()!r} does not sign itself ({exc})") from None
    _check_leaf(chain[0])
    for depth, cert in enumerate(chain[1:], start=1):
        _check_ca(cert, f"x5c[{depth}]", below=depth - 1)
    for i, cert in enumerate(chain):
        _check_key_and_hash(cert, f"x5c[{i}]")
    permissive = verification.ExtensionPolicy.permit_all()  # the Notary Project rules were checked above
    ca_policy = permissive.require_present(x509.BasicConstraints, verification.Criticality.CRITICAL, None)
    try:
        verifier = (verification.PolicyBuilder().store(verification.Store(list(store.roots))).time(now)
                    .max_chain_depth(MAX_CHAIN).extension_policies(ca_policy=ca_policy, ee_policy=permissive)
                    .build_client_verifier())
        built = verifier.verify(chain[0], chain[1:]).chain
    except verification.VerificationError as exc:
        raise TrustError(f"signature: the chain of {chain[0].subject.rfc4514_string()!r} does not lead to a "
                         f"trusted root valid now ({exc})") from None
    if list(built) != chain:
        raise TrustError("signature: x5c is not exactly the chain from the signing certificate to a trusted root")
    return root


def _check_key_and_hash(cert, where: str) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise TrustError(f"signature: {where} has a {key.key_size}-bit RSA key (at least 2048)")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < 256:
        raise TrustError(f"signature: {where} has a {key.curve.key_size}-bit EC key (at least 256)")
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise TrustError(f"signature: {where} has a {type(key).__name__} key (RSA or EC only)")
    if isinstance(cert.signature_hash_algorithm, hashes.SHA1):
        raise TrustError(f"signature: {where} is signed with SHA-1")


def _extension(cert, kind):
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _check_ca(cert, where: str, below: int) -> None:
    from cryptography import x509

    what = f"{where} {cert.subject.rfc4514_string()!r}"
    bc = _extension(cert, x509.BasicConstraints)
    if bc is None or not bc.critical or not bc.value.ca:
        raise TrustError(f"{what}: a CA certificate needs a critical basicConstraints with cA true")
    if bc.value.path_length is not None and bc.value.path_length < below:
        raise TrustError(f"{what}: pathLenConstraint {bc.value.path_length} but {below} CA(s) below it")
    ku = _extension(cert, x509.KeyUsage)
    if ku is None or not ku.critical or not ku.value.key_cert_sign:
        raise TrustError(f"{what}: a CA certificate needs a critical keyUsage with keyCertSign")


def _check_leaf(cert) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    what = f"signing certificate {cert.subject.rfc4514_string()!r}"
    bc = _extension(cert, x509.BasicConstraints)
    if bc is not None and bc.value.ca:
        raise TrustError(f"{what}: is a CA certificate")
    ku = _extension(cert, x509.KeyUsage)
    if ku is None or not ku.critical or not ku.value.digital_signature:
        raise TrustError(f"{what}: needs a critical keyUsage with digitalSignature")
    u = ku.value
    forbidden = [name for name, on in (("keyEncipherment", u.key_encipherment), ("dataEncipherment", u.data_encipherment),
                                       ("keyAgreement", u.key_agreement), ("keyCertSign", u.key_cert_sign),
                                       ("cRLSign", u.crl_sign)) if on]
    if u.key_agreement and (u.encipher_only or u.decipher_only):
        forbidden.append("encipherOnly/decipherOnly")
    if forbidden:
        raise TrustError(f"{what}: keyUsage must not include {', '.join(forbidden)}")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is not None:
        bad = {ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
               ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
               ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection", ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping"}
        found = [bad[oid] for oid in eku.value if oid in bad]
        if found:
            raise TrustError(f"{what}: extendedKeyUsage must not include {', '.join(found)}")
