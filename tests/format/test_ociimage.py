"""Source image JSON (OCI and Docker v2, indexes, platforms) and converted manifests."""

import hashlib
import json

import pytest

from lazyfs.errors import FormatError, NotFoundError
from lazyfs.format.digest import sha256_digest
from lazyfs.format.layer import MEDIA_TYPE_LAYER
from lazyfs.format.oci import MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST, Descriptor, LayerDescriptor, parse_manifest
from lazyfs.format.ociimage import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    ConvertedLayer,
    build_converted_config,
    build_converted_manifest,
    media_type_of,
    parse_converted_layers,
    parse_platforms,
    parse_source_config,
    parse_source_manifest,
    select_platform,
)


def d(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def manifest(media_type=MEDIA_TYPE_MANIFEST, config_type=MEDIA_TYPE_CONFIG, layer_types=(GZIP,)):
    layers = [{"mediaType": t, "digest": d(i + 1), "size": 100 + i} for i, t in enumerate(layer_types)]
    return json.dumps({"schemaVersion": 2, "mediaType": media_type,
                       "config": {"mediaType": config_type, "digest": d(0), "size": 10}, "layers": layers}).encode()


def test_oci_and_docker_manifests():
    oci = parse_source_manifest(manifest(layer_types=(
        "application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar")), d(9), MEDIA_TYPE_MANIFEST)
    assert [l.compression for l in oci.layers] == ["gzip", "zstd", "none"]
    assert oci.descriptor == Descriptor(MEDIA_TYPE_MANIFEST, d(9), oci.size)
    docker = parse_source_manifest(manifest(DOCKER_MANIFEST, DOCKER_CONFIG, (
        "application/vnd.docker.image.rootfs.diff.tar.gzip",)), d(9), DOCKER_MANIFEST)
    assert docker.layers[0].compression == "gzip" and docker.config.digest == d(0)


@pytest.mark.parametrize("data, media_type, match", [
    (manifest(layer_types=(MEDIA_TYPE_LAYER,)), MEDIA_TYPE_MANIFEST, "already a lazyfs image"),
    (manifest(layer_types=("application/x-foo",)), MEDIA_TYPE_MANIFEST, "not a tar layer"),
    (manifest(config_type="application/x-foo"), MEDIA_TYPE_MANIFEST, "not an image config"),
    (manifest(), DOCKER_MANIFEST_LIST, "not an image manifest"),
    (b"[]", MEDIA_TYPE_MANIFEST, "not a JSON object"),
])
def test_bad_source_manifests(data, media_type, match):
    with pytest.raises(FormatError, match=match):
        parse_source_manifest(data, d(9), media_type)


def test_media_type_detection():
    assert media_type_of(manifest()) == MEDIA_TYPE_MANIFEST
    bare = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert media_type_of(bare) == "application/vnd.oci.image.index.v1+json"
    assert media_type_of(bare, DOCKER_MANIFEST_LIST) == DOCKER_MANIFEST_LIST


def test_platform_selection():
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": MEDIA_TYPE_MANIFEST, "digest": d(1), "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": MEDIA_TYPE_MANIFEST, "digest": d(2), "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": MEDIA_TYPE_MANIFEST, "digest": d(3), "size": 1,
         "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
        {"mediaType": MEDIA_TYPE_MANIFEST, "digest": d(4), "size": 1,
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"mediaType": MEDIA_TYPE_MANIFEST, "digest": d(5), "size": 1,
         "platform": {"os": "unknown", "architecture": "unknown"}},
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d(6), "size": 1},
    ]}).encode()
    entries = parse_platforms(index)
    assert len(entries) == 5
    assert select_platform(entries, "linux/amd64").descriptor.digest == d(1)
    assert select_platform(entries, "linux/arm64").descriptor.digest == d(2)
    assert select_platform(entries, "linux/arm").descriptor.digest == d(4)
    assert select_platform(entries, "linux/arm/v6").descriptor.digest == d(3)
    with pytest.raises(NotFoundError, match="linux/s390x.*linux/amd64"):
        select_platform(entries, "linux/s390x")
    with pytest.raises(FormatError, match="OS/ARCH"):
        select_platform(entries, "amd64")


def test_config_and_converted_manifest_round_trip():
    source_config = {"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/app"], "Env": ["A=1"],
                     "User": "1000", "WorkingDir": "/srv"}, "rootfs": {"type": "layers", "diff_ids": [d(1)]},
                     "history": [{"created_by": "x"}]}
    doc, diff_ids = parse_source_config(json.dumps(source_config).encode())
    assert diff_ids == [d(1)]
    layers = [ConvertedLayer(LayerDescriptor(d(10), 1000, 900, 100, d(40)), 1 << 30, 262144, d(1), d(20), d(1), ""),
              ConvertedLayer(LayerDescriptor(d(11), 500, 400, 100, d(41)), 2 << 30, 262144, d(2), d(21), d(3), d(10))]
    config = build_converted_config(doc, layers)
    out = json.loads(config)
    assert out["config"] == source_config["config"] and out["history"] == source_config["history"]
    assert out["rootfs"] == {"type": "layers", "diff_ids": [d(10), d(11)]}
    subject = Descriptor(MEDIA_TYPE_MANIFEST, d(30), 123)
    data = build_converted_manifest(Descriptor(MEDIA_TYPE_CONFIG, sha256_digest(config), len(config)), layers, subject)
    parsed = parse_manifest(data)  # what mount reads
    assert parsed.virtual_size == 2 << 30 and parsed.subject == subject
    assert [(l.digest, l.meta_offset, l.meta_digest) for l in parsed.layers] == [(d(10), 900, d(40)), (d(11), 400, d(41))]
    assert parse_converted_layers(data) == layers


@pytest.mark.parametrize("rootfs", [None, {"type": "layers"}, {"type": "layers", "diff_ids": ["md5:x"]}])
def test_bad_configs(rootfs):
    with pytest.raises(FormatError):
        parse_source_config(json.dumps({"rootfs": rootfs}).encode())
