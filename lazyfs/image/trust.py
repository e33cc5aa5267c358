"""The trust policy for artifacts found through referrers: may this host use it for that subject?

Anything listed under an image's referrers (a lazyfs twin of an ordinary image,
an index, a layer another host converted) is self-asserted: whoever can push
to the repository can list anything there. ``TrustPolicy.check`` answers one
question for every such artifact: *is this referrer artifact trusted for this
subject?* It is, when

1. this host made it: its manifest digest is in a ``HostLedger`` (``convert``
   records every manifest it writes; other builders of referrers keep their
   own ledger of the same shape and pass it in), or
2. it carries a Notary Project signature (``lazyfs.format.notation``) that
   verifies against the trust store in the config (``[trust]``).

And in both cases the artifact's manifest must name the subject (its
``subject`` descriptor), so a trusted artifact of one image is never used for
another. Everything else is refused with a reason, and counted. docs/trust.md
has the policy and the configuration.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from lazyfs.config import Config, TrustSettings
from lazyfs.durable import write_atomically
from lazyfs.errors import ConfigError, FormatError, LazyfsError, TrustError
from lazyfs.fetch.registry import RegistryClient
from lazyfs.format import notation
from lazyfs.format.digest import check_sha256, is_sha256, sha256_digest
from lazyfs.format.oci import MAX_MANIFEST_SIZE, MEDIA_TYPE_MANIFEST, parse_json
from lazyfs.format.reference import Reference
from lazyfs.image.layout import OciLayout
from lazyfs.image.referrers import find_referrers_local, find_referrers_remote

log = logging.getLogger(__name__)

MAX_SIGNATURES = 16  # signatures tried per artifact, newest first
MAX_SIGNATURE_MANIFEST = 64 << 10
MAX_PEM_FILE = 1 << 20
MAX_PEM_FILES = 256

HOST = "host"  # TrustDecision.basis: made on this host
SIGNATURE = "signature"  # verified Notary Project signature


@dataclass(frozen=True, slots=True)
class TrustDecision:
    """The answer for one artifact: trusted or not, on what basis, and why (one line)."""

    artifact: str
    trusted: bool
    basis: str  # HOST, SIGNATURE, or "" when refused
    reason: str
    signer: notation.Signer | None = None

    def to_json(self) -> dict:
        doc = {"artifact": self.artifact, "trusted": self.trusted, "reason": self.reason}
        if self.basis:
            doc["basis"] = self.basis
        return doc


# ---------------------------------------------------------------- where artifacts live


class ArtifactSource(Protocol):
    """A repository (registry or layout) holding an artifact and its referrers."""

    name: str

    async def manifest(self, digest: str, max_size: int = MAX_MANIFEST_SIZE) -> bytes: ...

    async def blob(self, digest: str, max_size: int) -> bytes: ...

    async def referrers(self, subject_digest: str, artifact_type: str) -> list[dict]: ...


@dataclass(slots=True)
class RegistrySource:
    client: RegistryClient
    repo: Reference

    @property
    def name(self) -> str:
        return str(self.repo)

    async def manifest(self, digest: str, max_size: int = MAX_MANIFEST_SIZE) -> bytes:
        data, _, _ = await self.client.get_manifest(self.repo.with_digest(digest),
                                                    accept=(MEDIA_TYPE_MANIFEST, "application/vnd.oci.artifact.manifest.v1+json"))
        if len(data) > max_size:
            raise FormatError(f"manifest {digest} in {self.name}: {len(data)} bytes, more than {max_size}")
        return data

    async def blob(self, digest: str, max_size: int) -> bytes:
        return await self.client.get_blob(self.repo, digest, max_size=max_size)

    async def referrers(self, subject_digest: str, artifact_type: str) -> list[dict]:
        return await find_referrers_remote(self.client, self.repo, subject_digest, artifact_type)


@dataclass(slots=True)
class LayoutSource:
    layout: OciLayout

    @property
    def name(self) -> str:
        return self.layout.path

    async def manifest(self, digest: str, max_size: int = MAX_MANIFEST_SIZE) -> bytes:
        return await trio.to_thread.run_sync(self.layout.read_blob, digest, max_size)

    async def blob(self, digest: str, max_size: int) -> bytes:
        return await trio.to_thread.run_sync(self.layout.read_blob, digest, max_size)

    async def referrers(self, subject_digest: str, artifact_type: str) -> list[dict]:
        return await trio.to_thread.run_sync(find_referrers_local, self.layout, subject_digest, artifact_type)


# ---------------------------------------------------------------- what this host made


class HostLedger:
    """Manifest digests of artifacts this host made: ``ROOT/<hex>.json`` each (0600 in a 0700 directory).

    A file's presence is the record; its content (what was made from what) is for people.
    """

    def __init__(self, root: str) -> None:
        self.root = root

    def _path(self, digest: str) -> str | None:
        return os.path.join(self.root, digest.split(":", 1)[1] + ".json") if is_sha256(digest) else None

    def __contains__(self, digest: object) -> bool:
        path = self._path(digest) if isinstance(digest, str) else None
        return path is not None and os.path.isfile(path)

    def record(self, digest: str, about: dict) -> None:
        path = self._path(digest)
        if path is None:
            raise FormatError(f"host ledger: bad digest {digest!r}")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        write_atomically(path, json.dumps({"manifest": digest, **about}, sort_keys=True).encode())


def conversion_ledger(config: Config) -> HostLedger:
    """The ledger of images ``lazyfs convert`` wrote on this host (in its conversion cache)."""
    return HostLedger(os.path.join(config.cache_root, "convert", "converted"))


# ---------------------------------------------------------------- the trust store


def load_trust_store(settings: TrustSettings, where: str = "config: trust") -> notation.TrustStore | None:
    """The certificates of ``trust.trust_store`` (None when none is configured); ConfigError naming the file."""
    if not settings.trust_store:
        return None
    files: list[str] = []
    for path in settings.trust_store:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, n) for n in os.listdir(path)
                            if n.endswith((".pem", ".crt")) and os.path.isfile(os.path.join(path, n)))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ConfigError(f"{where}.trust_store: {path} is neither a file nor a directory")
    if len(files) > MAX_PEM_FILES:
        raise ConfigError(f"{where}.trust_store: {len(files)} certificate files, more than {MAX_PEM_FILES}")
    roots = []
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PEM_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"{where}.trust_store: {path}: cannot read: {exc.strerror or exc}") from None
        if len(data) > MAX_PEM_FILE:
            raise ConfigError(f"{where}.trust_store: {path}: larger than {MAX_PEM_FILE} bytes")
        try:
            roots += notation.parse_certificates(data, path)
        except FormatError as exc:
            raise ConfigError(f"{where}.trust_store: {exc}") from None
    try:
        return notation.make_trust_store(roots, settings.trusted_identities, files)
    except FormatError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ---------------------------------------------------------------- the policy


@dataclass(slots=True)
class TrustCounts:
    trusted_host: int = 0
    trusted_signature: int = 0
    refused: int = 0
    signatures_checked: int = 0
    signatures_failed: int = 0


@dataclass(slots=True)
class TrustPolicy:
    """Decides whether referrer artifacts may be used (see the module doc). Counts its answers."""

    ledgers: tuple[HostLedger, ...] = ()
    store: notation.TrustStore | None = None
    clock: object = None  # () -> aware datetime; default: now, UTC
    counts: TrustCounts = field(default_factory=TrustCounts)

    @classmethod
    def from_config(cls, config: Config, ledgers: Iterable[HostLedger] = ()) -> TrustPolicy:
        """The host's policy: its conversion ledger (plus *ledgers*) and the configured trust store."""
        return cls((conversion_ledger(config), *ledgers), load_trust_store(config.trust))

    def now(self) -> datetime.datetime:
        return self.clock() if callable(self.clock) else datetime.datetime.now(datetime.timezone.utc)

    def made_here(self, digest: str) -> bool:
        return any(digest in ledger for ledger in self.ledgers)

    async def check(self, source: ArtifactSource, artifact: str, subject: str | None,
                    manifest: bytes | None = None) -> TrustDecision:
        """Is the artifact with manifest digest *artifact* in *source* trusted for *subject*?

        *subject* is the digest the artifact must refer to (None: any, for artifacts
        used on their own, like the layers ``convert`` reuses). *manifest*: its bytes,
        if the caller has them (checked against *artifact*). Never raises for a bad
        artifact or signature: the decision says why it is refused.
        """
        try:
            decision = await self._check(source, artifact, subject, manifest)
        except LazyfsError as exc:
            decision = TrustDecision(artifact, False, "", f"cannot check {artifact} in {source.name}: {exc}")
        if decision.trusted:
            if decision.basis == HOST:
                self.counts.trusted_host += 1
            else:
                self.counts.trusted_signature += 1
        else:
            self.counts.refused += 1
            log.info("trust: refused %s: %s", artifact, decision.reason)
        return decision

    async def require(self, source: ArtifactSource, artifact: str, subject: str | None,
                      manifest: bytes | None = None) -> TrustDecision:
        """``check``, raising TrustError when the artifact is refused."""
        decision = await self.check(source, artifact, subject, manifest)
        if not decision.trusted:
            raise TrustError(decision.reason)
        return decision

    async def _check(self, source: ArtifactSource, artifact: str, subject: str | None,
                     data: bytes | None) -> TrustDecision:
        if not is_sha256(artifact):
            return TrustDecision(artifact, False, "", f"{artifact!r} is not a sha256 digest")
        if data is None:
            data = await source.manifest(artifact)  # fetched by digest: verified against it
        elif sha256_digest(data) != artifact:
            return TrustDecision(artifact, False, "", f"the manifest given for {artifact} is {sha256_digest(data)}")
        doc = parse_json(data, f"manifest {artifact}")
        if subject is not None:
            named = doc.get("subject")
            named = named.get("digest") if isinstance(named, dict) else None
            if named != subject:
                return TrustDecision(artifact, False, "", f"{artifact} refers to {named or 'nothing'}, not to {subject}")
        if self.made_here(artifact):
            return TrustDecision(artifact, True, HOST, f"{artifact} was made on this host")
        if self.store is None:
            return TrustDecision(artifact, False, "", f"{artifact} was not made on this host, and no trust store is "
                                                      f"configured to check signatures (trust.trust_store)")
        media_type = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else MEDIA_TYPE_MANIFEST
        target = {"mediaType": media_type, "digest": artifact, "size": len(data)}
        signatures = (await source.referrers(artifact, notation.ARTIFACT_TYPE))[::-1][:MAX_SIGNATURES]
        if not signatures:
            return TrustDecision(artifact, False, "", f"{artifact} was not made on this host and is not signed")
        failures = []
        for entry in signatures:
            try:
                signer = await self._verify_one(source, entry, target)
            except LazyfsError as exc:
                self.counts.signatures_failed += 1
                failures.append(f"{str(entry.get('digest'))[:19]}: {exc}")
                continue
            return TrustDecision(artifact, True, SIGNATURE,
                                 f"{artifact} is signed by {signer.subject} (root {signer.root})", signer)
        return TrustDecision(artifact, False, "", f"{artifact} was not made on this host and no signature of it "
                                                  f"verifies: {'; '.join(failures)}")

    async def _verify_one(self, source: ArtifactSource, entry: dict, target: dict) -> notation.Signer:
        self.counts.signatures_checked += 1
        digest = entry.get("digest")
        check_sha256(digest, "signature entry with digest")
        manifest = parse_json(await source.manifest(digest, MAX_SIGNATURE_MANIFEST), f"signature manifest {digest}")
        envelope_digest, size = notation.envelope_of(manifest, target["digest"], f"signature manifest {digest[:19]}")
        envelope = await source.blob(envelope_digest, notation.MAX_ENVELOPE)
        if len(envelope) != size:
            raise FormatError(f"signature envelope {envelope_digest[:19]}: {len(envelope)} bytes, descriptor says {size}")
        store, now = self.store, self.now()
        assert store is not None
        return await trio.to_thread.run_sync(notation.verify_envelope, envelope, target, store, now)

    def statistics(self) -> dict:
        return {"trusted_host": self.counts.trusted_host, "trusted_signature": self.counts.trusted_signature,
                "refused": self.counts.refused, "signatures_checked": self.counts.signatures_checked,
                "signatures_failed": self.counts.signatures_failed}


def describe(decisions: Sequence[TrustDecision]) -> str:
    """One line listing why each refused artifact was refused."""
    return "; ".join(d.reason for d in decisions if not d.trusted)
