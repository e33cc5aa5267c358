"""OCI image JSON for lazyfs images: build and parse manifests, configs and indexes. Sans-IO.

Every JSON document from the wire goes through ``parse_json``: at most
``MAX_JSON_SIZE`` bytes and ``MAX_JSON_CONTAINERS`` arrays and objects
(checked on the bytes, before ``json.loads`` builds anything), at most
``MAX_JSON_DEPTH`` levels deep, no NaN or Infinity, no duplicate keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lazyfs.errors import FormatError
from lazyfs.format.digest import check_sha256, is_sha256, sha256_digest
from lazyfs.format.layer import (
    DEFAULT_MAX_VIRTUAL_SIZE,
    FOOTER_SIZE,
    MAX_METADATA_SIZE,
    MAX_VIRTUAL_SIZE,
    MEDIA_TYPE_LAYER,
    MEDIA_TYPE_LAYER_V1,
)
from lazyfs.format.numbers import decimal

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
# What a registry client accepts when it asks for a manifest by tag: images and indexes, OCI and docker.
MANIFEST_MEDIA_TYPES = (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
MEDIA_TYPE_TRACE = "application/vnd.lazyfs.trace.v1"
ANN_META_OFFSET = "dev.lazyfs.layer.meta-offset"
ANN_META_LENGTH = "dev.lazyfs.layer.meta-length"
ANN_META_DIGEST = "dev.lazyfs.layer.meta-digest"
ANN_VIRTUAL_SIZE = "dev.lazyfs.image.virtual-size"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
MAX_MANIFEST_SIZE = 4 << 20  # what containerd accepts; a larger "manifest" is an attack or a bug
MAX_JSON_SIZE = MAX_MANIFEST_SIZE
MAX_JSON_DEPTH = 32
MAX_JSON_CONTAINERS = 1 << 16
MAX_LAYERS = 255
UPGRADE_HINT = ("lazyfs format 1 layers are not anchored by their manifest and are refused: "
                "rebuild the image with this lazyfs (lazyfs convert SOURCE TARGET from its source image, "
                "or lazyfs create / commit)")


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
    """A lazyfs layer blob as the manifest lists it.

    Its tail (metadata and footer) is ``[meta_offset, meta_offset + meta_length)``,
    which ends the blob, and ``meta_digest`` is the sha256 of exactly those bytes.
    """

    digest: str
    size: int
    meta_offset: int
    meta_length: int  # of the tail: metadata and footer
    meta_digest: str

    def annotations(self) -> dict[str, str]:
        return {ANN_META_OFFSET: str(self.meta_offset), ANN_META_LENGTH: str(self.meta_length),
                ANN_META_DIGEST: self.meta_digest}

    def to_json(self) -> dict:
        return Descriptor(MEDIA_TYPE_LAYER, self.digest, self.size, self.annotations()).to_json()


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
    if not isinstance(media_type, str) or not is_sha256(digest):
        raise FormatError(f"{where}: bad mediaType or digest {digest!r}")
    if type(size) is not int or not 0 <= size < 1 << 62:
        raise FormatError(f"{where}: bad size {size!r}")
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise FormatError(f"{where}: annotations must map strings to strings")
    return Descriptor(media_type, digest, size, ann)


def _ann_int(ann: dict, key: str, where: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if key not in ann:
        raise FormatError(f"{where}: annotation {key} missing")
    return decimal(ann[key], f"{where}: annotation {key}", lo, hi)


def json_depth(doc: object, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply *doc* nests arrays and objects (counting stops past *limit*)."""
    deepest = 0
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > limit:
                break
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice")
    return doc


def parse_json(data: bytes, what: str, max_size: int = MAX_JSON_SIZE) -> dict:
    """A JSON object from the wire, within the limits of this module (FormatError otherwise).

    The size and the number of containers are checked on the bytes, before
    anything is built (every ``[`` and ``{`` counts, even inside strings: an
    upper bound that allocates nothing); the depth on what ``json.loads``
    built, whose own recursion guard stops it long before it costs memory.
    """
    if len(data) > max_size:
        raise FormatError(f"{what}: {len(data)} bytes is more than the {max_size}-byte limit")
    containers = data.count(b"[") + data.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise FormatError(f"{what}: {containers} arrays and objects, more than {MAX_JSON_CONTAINERS}")
    try:
        doc = json.loads(data, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise FormatError(f"{what}: nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{what}: not JSON ({exc})") from None
    if json_depth(doc) > MAX_JSON_DEPTH:
        raise FormatError(f"{what}: nested more than {MAX_JSON_DEPTH} levels deep")
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: not a JSON object")
    return doc


def parse_layer_descriptor(d: Descriptor, where: str) -> LayerDescriptor:
    """A lazyfs layer descriptor with its anchor: meta-offset, meta-length and meta-digest."""
    if d.media_type == MEDIA_TYPE_LAYER_V1 or (d.media_type == MEDIA_TYPE_LAYER and ANN_META_DIGEST not in d.annotations):
        raise FormatError(f"{where}: layer {d.digest[:19]} has no {ANN_META_DIGEST}; {UPGRADE_HINT}")
    if d.media_type != MEDIA_TYPE_LAYER:
        raise FormatError(f"{where}: media type {d.media_type!r} is not a lazyfs layer "
                          f"(this is not a lazyfs image; convert it first)")
    off = _ann_int(d.annotations, ANN_META_OFFSET, where, 0, MAX_VIRTUAL_SIZE)
    length = _ann_int(d.annotations, ANN_META_LENGTH, where, FOOTER_SIZE + 1, MAX_METADATA_SIZE + FOOTER_SIZE)
    if off + length != d.size:
        raise FormatError(f"{where}: the tail {off}+{length} does not end the blob of {d.size} bytes")
    meta_digest = d.annotations[ANN_META_DIGEST]
    check_sha256(meta_digest, f"{where}: annotation {ANN_META_DIGEST}")
    return LayerDescriptor(d.digest, d.size, off, length, meta_digest)


def parse_manifest(data: bytes, max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE) -> ImageManifest:
    """Parse a lazyfs image manifest (FormatError if it is not one, or is larger than *max_virtual_size*)."""
    digest = sha256_digest(data)
    doc = parse_json(data, f"manifest {digest}")
    where = f"manifest {digest[:19]}"
    if doc.get("schemaVersion") != 2:
        raise FormatError(f"{where}: schemaVersion {doc.get('schemaVersion')!r}, expected 2")
    if doc.get("mediaType", MEDIA_TYPE_MANIFEST) != MEDIA_TYPE_MANIFEST:
        raise FormatError(f"{where}: media type {doc.get('mediaType')!r} is not an OCI image manifest")
    config = parse_descriptor(doc.get("config"), f"{where} config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers or len(raw_layers) > MAX_LAYERS:
        raise FormatError(f"{where}: needs 1 to {MAX_LAYERS} layers")
    layers = tuple(parse_layer_descriptor(parse_descriptor(raw, f"{where} layers[{i}]"), f"{where} layers[{i}]")
                   for i, raw in enumerate(raw_layers))
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
        raise FormatError(f"{where}: annotations must map strings to strings")
    cap = min(max_virtual_size, MAX_VIRTUAL_SIZE)
    if ANN_VIRTUAL_SIZE not in ann:
        raise FormatError(f"{where}: annotation {ANN_VIRTUAL_SIZE} missing")
    size = decimal(ann[ANN_VIRTUAL_SIZE], f"{where}: virtual size", 1)
    if size > cap:
        raise FormatError(f"{where}: virtual size {size} bytes is larger than the {cap}-byte limit "
                          f"(the config's max_virtual_size)")
    if size % 512:
        raise FormatError(f"{where}: virtual size {size} is not a multiple of 512")
    subject = parse_descriptor(doc["subject"], f"{where} subject") if "subject" in doc else None
    return ImageManifest(digest, config, layers, size, ann, subject)


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
