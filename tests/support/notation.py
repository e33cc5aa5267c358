"""Notary Project signatures for tests, in the exact format `notation sign` writes.

Neither Debian 12 nor PyPI ships the `notation` CLI, so the envelope is made with
the library lazyfs verifies with (jwcrypto) and the certificates with the tool
people use for them (openssl): a root CA and a code-signing leaf (or a lone
self-signed code-signing certificate, what `notation cert generate-test` makes).
The signature manifest (artifactType ``application/vnd.cncf.notary.signature``,
one ``application/jose+json`` layer, a ``subject``, the thumbprint annotation)
is listed under the subject's referrers fallback tag, as notation does on a
registry without the referrers API.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import subprocess

from lazyfs.format import notation
from lazyfs.format.oci import MEDIA_TYPE_EMPTY
from lazyfs.image.layout import OciLayout
from lazyfs.image.referrers import EMPTY_CONFIG, add_referrer_local, add_referrer_remote

_MIN_CONFIG = "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n"
KEYS = {"rsa": ["-newkey", "rsa:3072"], "ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]}


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"openssl {' '.join(args)}: {proc.stderr}")


def _pem_to_der_b64(path: str) -> str:
    with open(path) as f:
        body = "".join(line for line in f.read().splitlines() if not line.startswith("-----"))
    return base64.b64encode(base64.b64decode(body)).decode()


class TestSigner:
    """A signing identity under DIR: ``root.crt`` (what verifiers put in their trust store) and a signing key."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: str, name: str = "acme", key: str = "rsa", self_signed: bool = False,
                 days: int = 30, leaf_extensions: str | None = None) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        j = lambda n: os.path.join(directory, n)  # noqa: E731
        with open(j("min.cnf"), "w") as f:
            f.write(_MIN_CONFIG)
        subject = f"/C=US/ST=WA/O={name}"
        leaf_ext = leaf_extensions or "basicConstraints=CA:false\nkeyUsage=critical,digitalSignature\n" \
                                      "extendedKeyUsage=codeSigning\n"
        with open(j("leaf.ext"), "w") as f:
            f.write(leaf_ext)
        if self_signed:
            _openssl("req", "-x509", "-config", j("min.cnf"), *KEYS[key], "-nodes", "-keyout", j("leaf.key"),
                     "-out", j("leaf.crt"), "-days", str(days), "-subj", f"{subject}/CN={name} signer", "-sha256",
                     *sum((["-addext", line] for line in leaf_ext.splitlines()), []))
            self.chain = [j("leaf.crt")]
            self.root = j("leaf.crt")
        else:
            with open(j("ca.ext"), "w") as f:
                f.write("basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign\n")
            _openssl("req", "-x509", "-config", j("min.cnf"), *KEYS[key], "-nodes", "-keyout", j("root.key"),
                     "-out", j("root.crt"), "-days", str(days + 1), "-subj", f"{subject}/CN={name} root", "-sha256",
                     "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign")
            _openssl("req", "-new", "-config", j("min.cnf"), *KEYS[key], "-nodes", "-keyout", j("leaf.key"),
                     "-out", j("leaf.csr"), "-subj", f"{subject}/CN={name} signer")
            _openssl("x509", "-req", "-in", j("leaf.csr"), "-CA", j("root.crt"), "-CAkey", j("root.key"),
                     "-CAcreateserial", "-out", j("leaf.crt"), "-days", str(days), "-sha256",
                     "-extfile", j("leaf.ext"))
            self.chain = [j("leaf.crt"), j("root.crt")]
            self.root = j("root.crt")
        self.key_path = j("leaf.key")
        self.alg = "PS384" if key == "rsa" else "ES256"

    # ------------------------------------------------------------ envelopes

    def envelope(self, target: dict, *, protected: dict | None = None, drop: tuple[str, ...] = (),
                 alg: str | None = None, x5c: list[str] | None = None) -> bytes:
        """A JWS envelope (flattened JSON) signing *target*; *protected* adds or replaces signed headers."""
        from jwcrypto.jwk import JWK
        from jwcrypto.jws import JWS, JWSEHeaderParameter

        with open(self.key_path, "rb") as f:
            key = JWK.from_pem(f.read())
        alg = alg or self.alg
        header = {
            "alg": alg,
            "cty": notation.MEDIA_TYPE_PAYLOAD,
            notation.HEADER_SCHEME: notation.SIGNING_SCHEME,
            notation.HEADER_SIGNING_TIME: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "crit": [notation.HEADER_SCHEME],
        }
        header.update(protected or {})
        for name in drop:
            header.pop(name, None)
        registry = {name: JWSEHeaderParameter(name, False, True, None)
                    for name in header if name.startswith("io.cncf.notary.") or name.startswith("x-")}
        payload = json.dumps({"targetArtifact": target}, separators=(",", ":")).encode()
        jws = JWS(payload, header_registry=registry)
        jws.allowed_algs = [alg]
        unprotected = {"x5c": x5c if x5c is not None else [_pem_to_der_b64(p) for p in self.chain],
                       notation.HEADER_AGENT: "lazyfs-tests/1.0"}
        jws.add_signature(key, alg, protected=json.dumps(header, separators=(",", ":")),
                          header=json.dumps(unprotected))
        return jws.serialize().encode()

    def thumbprints(self) -> list[str]:
        out = []
        for path in self.chain:
            out.append(hashlib.sha256(base64.b64decode(_pem_to_der_b64(path))).hexdigest())
        return out

    # ------------------------------------------------------------ storing signatures

    def manifest(self, envelope: bytes, subject: dict) -> bytes:
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": notation.ARTIFACT_TYPE,
            "config": {"mediaType": MEDIA_TYPE_EMPTY, "digest": _sha256(EMPTY_CONFIG),
                       "size": len(EMPTY_CONFIG)},
            "layers": [{"mediaType": notation.MEDIA_TYPE_JWS, "digest": _sha256(envelope), "size": len(envelope)}],
            "subject": subject,
            "annotations": {notation.ANN_THUMBPRINTS: json.dumps([t.upper() for t in self.thumbprints()],
                                                                 separators=(",", ":"))},
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    async def sign_remote(self, client, repo, manifest_digest: str, **envelope_args) -> str:
        """Sign the manifest *manifest_digest* in registry repository *repo*; the signature manifest's digest."""
        data, media_type, _ = await client.get_manifest(repo.with_digest(manifest_digest))
        subject = {"mediaType": media_type, "digest": manifest_digest, "size": len(data)}
        envelope = self.envelope(subject, **envelope_args)
        await client.push_blob(repo, EMPTY_CONFIG)
        await client.push_blob(repo, envelope, _sha256(envelope))
        manifest = self.manifest(envelope, subject)
        return await add_referrer_remote(client, repo, manifest, notation.ARTIFACT_TYPE, manifest_digest,
                                         {notation.ANN_THUMBPRINTS: json.loads(manifest)["annotations"][
                                             notation.ANN_THUMBPRINTS]})

    def sign_local(self, layout_path: str, manifest_digest: str, **envelope_args) -> str:
        layout = OciLayout(layout_path)
        data = layout.read_blob(manifest_digest)
        media_type = json.loads(data).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
        subject = {"mediaType": media_type, "digest": manifest_digest, "size": len(data)}
        envelope = self.envelope(subject, **envelope_args)
        layout.put_bytes(EMPTY_CONFIG)
        layout.put_bytes(envelope, notation.MEDIA_TYPE_JWS)
        return add_referrer_local(layout, self.manifest(envelope, subject), notation.ARTIFACT_TYPE, manifest_digest)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
