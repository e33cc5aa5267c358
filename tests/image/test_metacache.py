"""The metadata cache against a real registry: what it keeps, and that nothing it holds is trusted."""

from __future__ import annotations

import os
import random

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.errors import LazyfsError
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image
from lazyfs.image.metacache import MetadataCache
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from tests.support.registry import registry_fixture

pytestmark = [pytest.mark.registry]
registry = registry_fixture()


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metacache")
    raw = tmp / "raw"
    raw.write_bytes(random.Random(3).randbytes(2 << 20))
    local = LocalRef(str(tmp / "layout"), "v1")
    ref = f"{registry.registry}/meta/random:v1"
    config = Config(registries=(RegistrySettings(registry.registry, plain_http=True),), fetch_deadline=2.0)

    async def build():
        await create_image(local, from_file=str(raw))
        async with ImageOpener(config) as opener:
            await push_image(opener, local, parse_reference(ref))

    trio.run(build)
    return ref, config


def _open(config, cache, ref, pinned=None):
    async def main():
        async with ImageOpener(config) as opener:
            opened, from_cache = await cache.open(opener, ref, pinned)
            await cache.keep_config(opener, opened)
            return opened, from_cache

    return trio.run(main)


def test_kept_metadata_opens_the_pinned_image_with_the_registry_stalled(image, registry, tmp_path):
    ref, config = image
    cache = MetadataCache(str(tmp_path / "meta"))
    first, from_cache = _open(config, cache, ref)
    digest = first.image.manifest.digest
    assert not from_cache and cache.stats["manifests_stored"] == 1 and cache.stats["tails_stored"] >= 1
    assert os.path.exists(os.path.join(cache.image_dir(digest), "config"))
    with registry.stopped():
        again, from_cache = _open(config, cache, ref, pinned=digest)
    assert from_cache and again.image == first.image


def test_damaged_files_are_never_used_and_are_repaired(image, registry, tmp_path):
    """A flipped byte in the kept manifest or a kept tail: with the registry stalled the open fails
    (it never parses the bad bytes); with the registry back it fetches them again and repairs the copy."""
    ref, config = image
    cache = MetadataCache(str(tmp_path / "meta"))
    first, _ = _open(config, cache, ref)
    digest = first.image.manifest.digest
    tails = os.path.join(cache.image_dir(digest), "tails")
    tail = os.path.join(tails, sorted(os.listdir(tails))[0])
    good = open(tail, "rb").read()
    with open(tail, "r+b") as f:
        f.seek(len(good) // 2)
        f.write(bytes([good[len(good) // 2] ^ 0xFF]))
    with registry.stopped():
        with pytest.raises(LazyfsError):
            _open(config, cache, ref, pinned=digest)
    again, from_cache = _open(config, cache, ref, pinned=digest)
    assert from_cache and again.image == first.image  # the manifest came from disk, the tail from the registry
    assert open(tail, "rb").read() == good  # repaired
    manifest = os.path.join(cache.image_dir(digest), "manifest")
    with open(manifest, "ab") as f:
        f.write(b" ")
    with registry.stopped():
        with pytest.raises(LazyfsError):
            _open(config, cache, ref, pinned=digest)
    assert cache.stats["manifests_rejected"] == 1 and not os.path.exists(manifest)
    again, from_cache = _open(config, cache, ref, pinned=digest)
    assert not from_cache and again.image == first.image and os.path.exists(manifest)


def test_a_pin_the_registry_does_not_serve_is_refused(image, tmp_path):
    ref, config = image
    cache = MetadataCache(str(tmp_path / "meta"))
    with pytest.raises(LazyfsError):
        _open(config, cache, ref, pinned="sha256:" + "0" * 64)


def test_pruning_keeps_attached_images(tmp_path):
    cache = MetadataCache(str(tmp_path / "meta"), max_images=2)
    digests = [f"sha256:{i:064x}" for i in range(4)]
    for i, digest in enumerate(digests):
        os.makedirs(cache.image_dir(digest))
        os.utime(cache.image_dir(digest), (i, i))
    assert cache.prune(keep=[digests[0]]) == 2
    assert sorted(os.listdir(cache.root)) == sorted(d.split(":")[1] for d in (digests[0], digests[3]))


def test_a_rejected_file_that_cannot_be_removed_is_reported(tmp_path, monkeypatch, caplog):
    """A manifest that does not match its digest is rejected and removed; when the removal fails
    (here: unlink raises EACCES) the failure is logged, not swallowed, and the file is still never
    used. Broken on purpose once: with the old ``except OSError: pass`` the warning was missing
    and this test went red."""
    import errno
    import logging

    from lazyfs.image import metacache

    cache = MetadataCache(str(tmp_path / "meta"))
    digest = "sha256:" + "ab" * 32
    os.makedirs(cache.image_dir(digest))
    manifest = os.path.join(cache.image_dir(digest), "manifest")
    with open(manifest, "wb") as f:
        f.write(b'{"not": "the manifest of that digest"}')

    def unlink(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(metacache.os, "unlink", unlink)
    with caplog.at_level(logging.WARNING, logger="lazyfs.image.metacache"):
        assert cache.read_manifest(digest) is None
    monkeypatch.undo()
    assert cache.stats["manifests_rejected"] == 1 and os.path.exists(manifest)
    assert any("cannot remove" in r.getMessage() and manifest in r.getMessage() for r in caplog.records)
    assert cache.read_manifest(digest) is None and not os.path.exists(manifest)  # removable again: gone
