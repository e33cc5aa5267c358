"""OCI image JSON for lazyfs images: build and parse manifests, configs and indexes. Sans-IO."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from lazyfs.errors import FormatError
from lazyfs.format.layer import MEDIA_TYPE_LAYER

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_TRACE = "application/vnd.lazyfs.trace.v1"
ANN_META_OFFSET = "dev.lazyfs.layer.meta-offset"
ANN_META_LENGTH = "dev.lazyfs.layer.meta-length"
ANN_VIRTUAL_SIZE = "dev.lazyfs.image.virtual-size"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
MAX_MANIFEST_SIZE = 4 << 20
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict:
        doc = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc


@dataclass(frozen=True, slots=True)
class LayerDescriptor:
    """A lazyfs layer blob as the manifest lists it."""

    digest: str
    size: int
    meta_offset: int
    meta_length: int

    def to_json(self) -> dict:
        return Descriptor(MEDIA_TYPE_LAYER, self.digest, self.size, {
            ANN_META_OFFSET: str(self.meta_offset), ANN_META_LENGTH: str(self.meta_length)}).to_json()


@dataclass(frozen=True, slots=True)
class ImageManifest:
    digest: str
    config: Descriptor
    layers: tuple[LayerDescriptor, ...]
    virtual_size: int
    annotations: dict = field(default_factory=dict, compare=False, hash=False)
    subject: Descriptor | None = None


def parse_descriptor(doc: object, where: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: descriptor is not an object")
    media_type, digest, size = doc.get("mediaType"), doc.get("digest"), doc.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str) or not _DIGEST.match(digest):
        raise FormatError(f"{where}: bad mediaType or digest {digest!r}")
    if type(size) is not int or size < 0:
        raise FormatError(f"{where}: bad size {size!r}")
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise FormatError(f"{where}: annotations must map strings to strings")
    return Descriptor(media_type, digest, size, ann)


def _ann_int(ann: dict, key: str, where: str) -> int:
    value = ann.get(key)
    if not isinstance(value, str) or not value.isdigit():
        raise FormatError(f"{where}: annotation {key} missing or not a number ({value!r})")
    return int(value)


def parse_json(data: bytes, what: str) -> dict:
    if len(data) > MAX_MANIFEST_SIZE:
        raise FormatError(f"{what}: {len(data)} bytes is too large")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: not a JSON object")
    return doc


def parse_manifest(data: bytes) -> ImageManifest:
    """Parse a lazyfs image manifest (FormatError if it is not one)."""
    digest = sha256_digest(data)
    doc = parse_json(data, f"manifest {digest}")
    where = f"manifest {digest[:19]}"
    if doc.get("schemaVersion") != 2:
        raise FormatError(f"{where}: schemaVersion {doc.get('schemaVersion')!r}, expected 2")
    if doc.get("mediaType", MEDIA_TYPE_MANIFEST) != MEDIA_TYPE_MANIFEST:
        raise FormatError(f"{where}: media type {doc.get('mediaType')!r} is not an OCI image manifest")
    config = parse_descriptor(doc.get("config"), f"{where} config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers or len(raw_layers) > 255:
        raise FormatError(f"{where}: needs 1 to 255 layers")
    layers = []
    for i, raw in enumerate(raw_layers):
        d = parse_descriptor(raw, f"{where} layers[{i}]")
        if d.media_type != MEDIA_TYPE_LAYER:
            raise FormatError(f"{where} layers[{i}]: media type {d.media_type!r} is not a lazyfs layer "
                              f"(this is not a lazyfs image; convert it first)")
        off = _ann_int(d.annotations, ANN_META_OFFSET, f"{where} layers[{i}]")
        length = _ann_int(d.annotations, ANN_META_LENGTH, f"{where} layers[{i}]")
        if off + length > d.size:
            raise FormatError(f"{where} layers[{i}]: metadata {off}+{length} past the blob of {d.size} bytes")
        layers.append(LayerDescriptor(d.digest, d.size, off, length))
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict):
        raise FormatError(f"{where}: annotations must be an object")
    size = _ann_int(ann, ANN_VIRTUAL_SIZE, where)
    subject = parse_descriptor(doc["subject"], f"{where} subject") if "subject" in doc else None
    return ImageManifest(digest, config, tuple(layers), size, ann, subject)


def build_config(diff_ids: list[str], base: dict | None = None) -> bytes:
    """An OCI image config; *base* (a source image's config) keeps entrypoint, env, user..."""
    doc = dict(base) if base else {"architecture": "amd64", "os": "linux", "config": {}}
    doc["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    return canonical_json(doc)


def build_manifest(config: Descriptor, layers: list[LayerDescriptor], virtual_size: int,
                   annotations: dict | None = None, subject: Descriptor | None = None) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
        "annotations": {**(annotations or {}), ANN_VIRTUAL_SIZE: str(virtual_size)},
    }
    if subject is not None:
        doc["subject"] = subject.to_json()
    return canonical_json(doc)


def parse_index(data: bytes, what: str = "index") -> list[Descriptor]:
    doc = parse_json(data, what)
    if doc.get("schemaVersion") != 2 or not isinstance(doc.get("manifests", []), list):
        raise FormatError(f"{what}: not an OCI image index")
    return [parse_descriptor(m, f"{what} manifests[{i}]") for i, m in enumerate(doc.get("manifests", []))]


def build_index(manifests: list[Descriptor]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX,
                       "manifests": [m.to_json() for m in manifests]}, indent=2).encode()
