"""Ordinary OCI / Docker v2 images (the input of convert) and converted manifests, sans-IO.

* ``parse_source_manifest``: an OCI image manifest or a Docker v2 schema 2
  manifest -> config and tar layers (with their compression);
* ``parse_platforms`` / ``select_platform``: a multi-arch index (OCI index or
  Docker manifest list) -> the manifest for one ``os/arch[/variant]``;
* ``parse_source_config``: the image config and its ``rootfs.diff_ids``;
* ``build_converted_config`` / ``build_converted_manifest``: the output -- the
  source's config with ``rootfs.diff_ids`` naming the lazyfs layers, lazyfs
  layers annotated with where they came from, and ``subject`` pointing at the
  source manifest (OCI 1.1 referrers);
* ``parse_converted_layers``: those annotations read back, to reuse layers.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lazyfs.errors import FormatError, NotFoundError
from lazyfs.format.digest import check_sha256
from lazyfs.format.layer import MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_V1
from lazyfs.format.numbers import decimal
from lazyfs.format.oci import (
    ANN_VIRTUAL_SIZE,
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    LayerDescriptor,
    canonical_json,
    parse_descriptor,
    parse_json,
    parse_layer_descriptor,
)

INDEX_TYPES = (MEDIA_TYPE_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (MEDIA_TYPE_MANIFEST, DOCKER_MANIFEST)

LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
CONFIG_TYPES = (MEDIA_TYPE_CONFIG, DOCKER_CONFIG)

ANN_CHAIN_ID = "dev.lazyfs.convert.chain-id"
ANN_SOURCE_DIGEST = "dev.lazyfs.convert.source-digest"
ANN_SOURCE_DIFF_ID = "dev.lazyfs.convert.source-diff-id"
ANN_PARENT = "dev.lazyfs.convert.parent"  # the lazyfs layer this one is a block diff over ("" for the first)
ANN_LAYER_SIZE = "dev.lazyfs.layer.virtual-size"
ANN_CHUNK_SIZE = "dev.lazyfs.layer.chunk-size"
ANN_SOURCE_MANIFEST = "dev.lazyfs.convert.source-manifest"
ANN_CONVERTER = "dev.lazyfs.convert.version"
CONVERTER_VERSION = "2"


@dataclass(frozen=True, slots=True)
class SourceLayer:
    digest: str
    size: int
    media_type: str
    compression: str  # gzip | zstd | none


@dataclass(frozen=True, slots=True)
class SourceManifest:
    digest: str
    media_type: str
    size: int
    config: Descriptor
    layers: tuple[SourceLayer, ...]

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)


@dataclass(frozen=True, slots=True)
class PlatformEntry:
    descriptor: Descriptor
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def media_type_of(data: bytes, hint: str = "") -> str:
    """The media type a manifest declares, else the transport's *hint*, else a guess from its shape."""
    doc = parse_json(data, "manifest")
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if hint and hint not in ("application/json", "application/octet-stream", "text/plain"):
        return hint
    return MEDIA_TYPE_INDEX if "manifests" in doc else MEDIA_TYPE_MANIFEST


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def parse_source_manifest(data: bytes, digest: str, media_type: str) -> SourceManifest:
    """An image manifest with tar layers (FormatError if it is not one, or is already lazyfs)."""
    where = f"manifest {digest[:19]}"
    if media_type not in MANIFEST_TYPES:
        raise FormatError(f"{where}: media type {media_type!r} is not an image manifest")
    doc = parse_json(data, where)
    if doc.get("schemaVersion") != 2:
        raise FormatError(f"{where}: schemaVersion {doc.get('schemaVersion')!r}, expected 2")
    config = parse_descriptor(doc.get("config"), f"{where} config")
    if config.media_type not in CONFIG_TYPES:
        raise FormatError(f"{where}: config media type {config.media_type!r} is not an image config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list) or len(raw_layers) > 255:
        raise FormatError(f"{where}: needs a list of at most 255 layers")
    layers = []
    for i, raw in enumerate(raw_layers):
        d = parse_descriptor(raw, f"{where} layers[{i}]")
        if d.media_type in (MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_V1):
            raise FormatError(f"{where}: this is already a lazyfs image")
        compression = LAYER_COMPRESSION.get(d.media_type)
        if compression is None:
            raise FormatError(f"{where} layers[{i}]: media type {d.media_type!r} is not a tar layer")
        layers.append(SourceLayer(d.digest, d.size, d.media_type, compression))
    return SourceManifest(digest, media_type, len(data), config, tuple(layers))


def parse_platforms(data: bytes, what: str = "index") -> list[PlatformEntry]:
    """The image manifests an index lists, with their platforms (entries without one are skipped)."""
    doc = parse_json(data, what)
    entries = doc.get("manifests")
    if doc.get("schemaVersion") != 2 or not isinstance(entries, list):
        raise FormatError(f"{what}: not an image index")
    out = []
    for i, raw in enumerate(entries):
        d = parse_descriptor(raw, f"{what} manifests[{i}]")
        plat = raw.get("platform")
        if not isinstance(plat, dict) or d.media_type not in MANIFEST_TYPES:
            continue  # attestations, nested indexes, artifacts
        os_, arch = plat.get("os"), plat.get("architecture")
        if not isinstance(os_, str) or not isinstance(arch, str):
            raise FormatError(f"{what} manifests[{i}]: platform needs os and architecture strings")
        variant = plat.get("variant") or ""
        out.append(PlatformEntry(d, os_, arch, variant if isinstance(variant, str) else ""))
    return out


_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
             "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_platform() -> str:
    machine = _platform.machine().lower()
    return f"linux/{_MACHINES.get(machine, machine)}"


def parse_platform(text: str) -> tuple[str, str, str]:
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise FormatError(f"platform {text!r}: expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/amd64")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def select_platform(entries: list[PlatformEntry], wanted: str) -> PlatformEntry:
    """The entry for *wanted* (a missing variant matches any; arm64 prefers v8)."""
    os_, arch, variant = parse_platform(wanted)
    matches = [e for e in entries if e.os == os_ and e.architecture == arch and (not variant or e.variant == variant)]
    if not matches:
        have = ", ".join(str(e) for e in entries) or "none"
        raise NotFoundError(f"no image for platform {wanted} in the index (it has: {have})")
    if not variant and len(matches) > 1:
        preferred = {"arm64": "v8", "arm": "v7", "amd64": ""}.get(arch)
        matches.sort(key=lambda e: e.variant != preferred)
    return matches[0]


MAX_SOURCE_CONFIG = 16 << 20  # image configs with long histories are larger than manifests


def parse_source_config(data: bytes, what: str = "image config") -> tuple[dict, list[str]]:
    """The config document and its ``rootfs.diff_ids``."""
    doc = parse_json(data, what, MAX_SOURCE_CONFIG)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise FormatError(f"{what}: rootfs must be {{'type': 'layers', 'diff_ids': [...]}}")
    diff_ids = rootfs["diff_ids"]
    for i, d in enumerate(diff_ids):
        check_sha256(d, f"{what}: rootfs.diff_ids[{i}]")
    return doc, list(diff_ids)


@dataclass(frozen=True, slots=True)
class ConvertedLayer:
    """A lazyfs layer made from one source layer, with what reuse needs to know about it."""

    descriptor: LayerDescriptor  # the lazyfs layer, with its anchored tail
    virtual_size: int
    chunk_size: int
    chain_id: str
    source_digest: str
    source_diff_id: str
    parent: str  # the lazyfs layer below ("" for the first)

    @property
    def digest(self) -> str:
        return self.descriptor.digest

    @property
    def size(self) -> int:
        return self.descriptor.size

    def to_json(self) -> dict:
        return Descriptor(MEDIA_TYPE_LAYER, self.digest, self.size, {
            **self.descriptor.annotations(),
            ANN_LAYER_SIZE: str(self.virtual_size), ANN_CHUNK_SIZE: str(self.chunk_size),
            ANN_CHAIN_ID: self.chain_id, ANN_SOURCE_DIGEST: self.source_digest,
            ANN_SOURCE_DIFF_ID: self.source_diff_id, ANN_PARENT: self.parent,
            ANN_CONVERTER: CONVERTER_VERSION,
        }).to_json()

    @classmethod
    def from_json(cls, doc: dict, where: str) -> "ConvertedLayer":
        d = parse_descriptor(doc, where)
        descriptor = parse_layer_descriptor(d, where)
        ann = d.annotations
        strings = [ann.get(k) for k in (ANN_CHAIN_ID, ANN_SOURCE_DIGEST, ANN_SOURCE_DIFF_ID, ANN_PARENT)]
        if not all(isinstance(s, str) for s in strings):
            raise FormatError(f"{where}: not a converted layer (no source annotations)")
        return cls(descriptor, decimal(ann.get(ANN_LAYER_SIZE), f"{where}: annotation {ANN_LAYER_SIZE}", 1),
                   decimal(ann.get(ANN_CHUNK_SIZE), f"{where}: annotation {ANN_CHUNK_SIZE}", 1), *strings)


def build_converted_config(source_config: dict, layers: list[ConvertedLayer]) -> bytes:
    """The source's config (entrypoint, env, user, workdir, history...) with the lazyfs layers as diff IDs."""
    doc = dict(source_config)
    doc["rootfs"] = {"type": "layers", "diff_ids": [layer.digest for layer in layers]}
    return canonical_json(doc)


def build_converted_manifest(config: Descriptor, layers: list[ConvertedLayer], subject: Descriptor) -> bytes:
    """The lazyfs twin of *subject*: readable by ``format.oci.parse_manifest``, listed as its referrer."""
    if not layers:
        raise FormatError("a converted image needs at least one layer")
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
        "subject": subject.to_json(),
        "annotations": {ANN_VIRTUAL_SIZE: str(layers[-1].virtual_size), ANN_SOURCE_MANIFEST: subject.digest,
                        ANN_CONVERTER: CONVERTER_VERSION},
    }
    return canonical_json(doc)


def parse_converted_layers(data: bytes, what: str = "converted manifest") -> list[ConvertedLayer]:
    """The converted layers of a lazyfs manifest written by convert (FormatError otherwise)."""
    doc = parse_json(data, what)
    raw = doc.get("layers")
    if not isinstance(raw, list):
        raise FormatError(f"{what}: no layers")
    return [ConvertedLayer.from_json(layer, f"{what} layers[{i}]") for i, layer in enumerate(raw)]


async def follow_index(data: bytes, media_type: str, digest: str, platform: str, what: str,
                       load: Callable[[Descriptor], Awaitable[bytes]]) -> tuple[bytes, str, str]:
    """``(data, media type, digest)`` of the manifest for *platform*: the manifest *data* itself, or the one
    its index lists for *platform*, read with ``load(descriptor)`` (the caller's I/O)."""
    media_type = media_type_of(data, media_type)
    if not is_index(media_type):
        return data, media_type, digest
    entry = select_platform(parse_platforms(data, f"index of {what}"), platform)
    data = await load(entry.descriptor)
    return data, media_type_of(data, entry.descriptor.media_type), entry.descriptor.digest
