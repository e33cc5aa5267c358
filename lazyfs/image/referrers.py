"""OCI 1.1 referrers through the tag-schema fallback (``sha256-<hex>`` tags holding an index).

The Debian docker-registry has no referrers API, so artifacts that refer to an
image (its startup trace, its lazyfs twin) are listed in an image index stored
under the tag ``sha256-<hex of the subject digest>``, as the OCI distribution
spec prescribes for registries without the API. Local layouts use the same tag
in their index.json.
"""

from __future__ import annotations

from lazyfs.errors import FormatError, NotFoundError
from lazyfs.fetch.registry import RegistryClient
from lazyfs.format.digest import is_sha256, sha256_digest
from lazyfs.format.oci import (
    MEDIA_TYPE_EMPTY,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    canonical_json,
    parse_descriptor,
    parse_json,
)
from lazyfs.format.reference import Reference
from lazyfs.image.layout import OciLayout

EMPTY_CONFIG = b"{}"


def referrers_tag(subject_digest: str) -> str:
    """The fallback tag under which a registry without the referrers API lists *subject_digest*'s referrers."""
    alg, _, hexpart = subject_digest.partition(":")
    return f"{alg}-{hexpart}"


def referrers_subject(tag: str) -> str | None:
    """The subject digest a referrers fallback *tag* stands for (``sha256-<hex>``), or None for any other tag."""
    subject = tag.replace("-", ":", 1)
    return subject if is_sha256(subject) else None


def artifact_manifest(artifact_type: str, blob: Descriptor, subject: Descriptor, annotations: dict | None = None) -> bytes:
    """An OCI artifact manifest (empty config, one blob) that refers to *subject*."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": MEDIA_TYPE_EMPTY, "digest": sha256_digest(EMPTY_CONFIG), "size": 2},
        "layers": [blob.to_json()],
        "subject": subject.to_json(),
    }
    if annotations:
        doc["annotations"] = annotations
    return canonical_json(doc)


MAX_REFERRERS = 1024  # entries of one referrers index


def _entries(index: bytes | None) -> list[dict]:
    """The descriptors a referrers index lists (each checked: media type, digest, size, annotations)."""
    if index is None:
        return []
    doc = parse_json(index, "referrers index")
    entries = doc.get("manifests", [])
    if not isinstance(entries, list) or len(entries) > MAX_REFERRERS:
        raise FormatError(f"referrers index: manifests must be a list of at most {MAX_REFERRERS} descriptors")
    for i, entry in enumerate(entries):
        parse_descriptor(entry, f"referrers index manifests[{i}]")
        if not isinstance(entry.get("artifactType", ""), str):
            raise FormatError(f"referrers index manifests[{i}]: artifactType is not a string")
    return entries


def _add(index: bytes | None, referrer: dict) -> bytes:
    entries = [e for e in _entries(index) if e.get("digest") != referrer["digest"]]
    entries = entries[-(MAX_REFERRERS - 1):] + [referrer]  # the oldest go first: readers take the newest
    return canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": entries})


def _descriptor_for(manifest: bytes, artifact_type: str, annotations: dict | None) -> dict:
    d = {"mediaType": MEDIA_TYPE_MANIFEST, "digest": sha256_digest(manifest), "size": len(manifest),
         "artifactType": artifact_type}
    if annotations:
        d["annotations"] = annotations
    return d


def _matching(entries: list[dict], artifact_type: str) -> list[dict]:
    return [e for e in entries if e.get("artifactType") == artifact_type]


# ---------------------------------------------------------------- registries


async def add_referrer_remote(client: RegistryClient, repo: Reference, manifest: bytes, artifact_type: str,
                              subject_digest: str, annotations: dict | None = None) -> str:
    """Store a referrer manifest by digest and list it under the subject's fallback tag."""
    digest = await client.put_manifest(repo.with_digest(sha256_digest(manifest)), manifest, MEDIA_TYPE_MANIFEST)
    tag_ref = repo.with_tag(referrers_tag(subject_digest))
    try:
        index, _, _ = await client.get_manifest(tag_ref, accept=(MEDIA_TYPE_INDEX,))
    except NotFoundError:
        index = None
    await client.put_manifest(tag_ref, _add(index, _descriptor_for(manifest, artifact_type, annotations)), MEDIA_TYPE_INDEX)
    return digest


async def find_referrers_remote(client: RegistryClient, repo: Reference, subject_digest: str, artifact_type: str) -> list[dict]:
    try:
        index, _, _ = await client.get_manifest(repo.with_tag(referrers_tag(subject_digest)), accept=(MEDIA_TYPE_INDEX,))
    except NotFoundError:
        return []
    return _matching(_entries(index), artifact_type)


# ---------------------------------------------------------------- layouts


def add_referrer_local(layout: OciLayout, manifest: bytes, artifact_type: str, subject_digest: str,
                       annotations: dict | None = None) -> str:
    layout.put_bytes(manifest, MEDIA_TYPE_MANIFEST)
    tag = referrers_tag(subject_digest)
    try:
        index, _ = layout.read_manifest(tag)
    except NotFoundError:
        index = None
    layout.put_manifest(_add(index, _descriptor_for(manifest, artifact_type, annotations)), tag, MEDIA_TYPE_INDEX)
    return sha256_digest(manifest)


def find_referrers_local(layout: OciLayout, subject_digest: str, artifact_type: str) -> list[dict]:
    try:
        index, _ = layout.read_manifest(referrers_tag(subject_digest))
    except NotFoundError:
        return []
    return _matching(_entries(index), artifact_type)
