"""Registry images' metadata kept on local disk, so an image opens again with the registry gone.

What an attachment needs before its first chunk is its manifest and every layer's metadata tail
(docs/format.md §7). This cache keeps both, plus the image config, under one directory per
manifest digest::

    ROOT/<manifest sha256 hex>/manifest          the manifest bytes
    ROOT/<manifest sha256 hex>/config            the image config blob (best effort)
    ROOT/<manifest sha256 hex>/tails/<hex>       a layer's metadata tail, named by its meta-digest

Contracts:

* Nothing read from here is trusted. The caller pins the manifest digest (the daemon keeps it in
  its state file); the manifest is used only if its sha256 is that digest, and each tail only if
  it hashes to the meta-digest the manifest gives for its layer (``load_image`` checks before it
  parses). A file that fails is ignored and fetched again, so the trust chain of §7 holds with
  the registry swapped for this directory.
* Writes are atomic and durable (fsynced), done in worker threads.
* At most ``max_images`` image directories are kept: the least recently used ones go first, but
  never one named in ``keep`` (the images attached now).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable

import trio

from lazyfs.durable import write_atomically
from lazyfs.errors import IntegrityError, LazyfsError
from lazyfs.fetch.registry import RegistryBackend
from lazyfs.format.oci import MANIFEST_MEDIA_TYPES, LayerDescriptor, parse_json, parse_manifest, sha256_digest
from lazyfs.format.reference import Reference, parse_reference
from lazyfs.image.image import load_image
from lazyfs.image.ref import parse_local_ref
from lazyfs.image.remote import MAX_CONFIG_SIZE, ImageOpener, OpenedImage, ordinary_manifest

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES = 256
MAX_MANIFEST_BYTES = 4 << 20
_SHA256 = re.compile(r"^sha256:([0-9a-f]{64})$")


def _hex(digest: str) -> str | None:
    match = _SHA256.match(digest)
    return match.group(1) if match else None


class MetadataCache:
    """Manifests, configs and metadata tails of registry images, by manifest digest, under *root*."""

    def __init__(self, root: str, max_images: int = DEFAULT_MAX_IMAGES) -> None:
        self.root = root
        self.max_images = max_images
        self.stats = {"opened_from_cache": 0, "manifests_stored": 0, "tails_stored": 0,
                      "manifests_rejected": 0, "pruned": 0}

    # ------------------------------------------------------------ paths (pure)

    def image_dir(self, manifest_digest: str) -> str | None:
        hexed = _hex(manifest_digest)
        return None if hexed is None else os.path.join(self.root, hexed)

    def tail_path(self, manifest_digest: str, layer: LayerDescriptor) -> str | None:
        image_dir, tail = self.image_dir(manifest_digest), _hex(layer.meta_digest)
        return None if image_dir is None or tail is None else os.path.join(image_dir, "tails", tail)

    # ------------------------------------------------------------ blocking helpers (worker threads)

    def read_manifest(self, manifest_digest: str) -> bytes | None:
        """The cached manifest if its sha256 is *manifest_digest*; a bad one is deleted."""
        image_dir = self.image_dir(manifest_digest)
        if image_dir is None:
            return None
        path = os.path.join(image_dir, "manifest")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError:
            return None
        if sha256_digest(data) != manifest_digest:
            log.warning("metadata cache: %s does not match its digest %s; ignored", path, manifest_digest)
            self.stats["manifests_rejected"] += 1
            _remove(path)
            return None
        try:
            os.utime(image_dir)  # recently used: pruned last
        except OSError:  # best effort: at worst this image is pruned a little early
            pass
        return data

    def read_tail(self, manifest_digest: str, layer: LayerDescriptor) -> bytes | None:
        """A layer's cached tail, unverified (``load_image`` checks it against the meta-digest)."""
        path = self.tail_path(manifest_digest, layer)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read(layer.meta_length + 1)
        except OSError:
            return None

    def store_manifest(self, manifest_digest: str, data: bytes) -> None:
        image_dir = self.image_dir(manifest_digest)
        if image_dir is None or sha256_digest(data) != manifest_digest:
            return  # only sha256 manifests that match are kept
        os.makedirs(os.path.join(image_dir, "tails"), mode=0o700, exist_ok=True)
        path = os.path.join(image_dir, "manifest")
        if not os.path.exists(path):
            write_atomically(path, data)
            self.stats["manifests_stored"] += 1

    def store_tail(self, manifest_digest: str, layer: LayerDescriptor, tail: bytes) -> None:
        """Keep a tail that passed its meta-digest (called by ``load_image``'s *on_tail*)."""
        path = self.tail_path(manifest_digest, layer)
        if path is None or self.read_tail(manifest_digest, layer) == tail:
            return  # kept already (a damaged copy is replaced: its name says what it must hold)
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            write_atomically(path, tail)
            self.stats["tails_stored"] += 1
        except (OSError, LazyfsError) as exc:  # the attach goes on; only offline restore loses out
            log.warning("metadata cache: cannot keep %s: %s", path, exc)

    def has_config(self, manifest_digest: str, config_digest: str) -> bool:
        image_dir = self.image_dir(manifest_digest)
        if image_dir is None:
            return True  # nothing to keep for a digest this cache cannot name
        path = os.path.join(image_dir, "config")
        try:
            with open(path, "rb") as f:
                if sha256_digest(f.read(MAX_CONFIG_SIZE + 1)) == config_digest:
                    return True
        except OSError:
            return False
        _remove(path)
        return False

    def store_config(self, manifest_digest: str, data: bytes) -> None:
        image_dir = self.image_dir(manifest_digest)
        if image_dir is not None and os.path.isdir(image_dir):
            write_atomically(os.path.join(image_dir, "config"), data)

    def prune(self, keep: Iterable[str]) -> int:
        """Remove the least recently used image directories beyond ``max_images``, never *keep*'s.
        Best effort: a directory that cannot be listed or removed is left (and logged)."""
        kept = {_hex(d) for d in keep}
        try:
            entries = [(e.stat(follow_symlinks=False).st_mtime, e) for e in os.scandir(self.root)
                       if e.is_dir(follow_symlinks=False) and _SHA256.match("sha256:" + e.name)]
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("metadata cache: cannot prune %s: %s", self.root, exc)
            return 0
        excess = len(entries) - self.max_images
        if excess <= 0:
            return 0
        removed = 0
        for _, entry in sorted(entries, key=lambda pair: pair[0]):
            if removed >= excess:
                break
            if entry.name in kept:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
        self.stats["pruned"] += removed
        return removed

    # ------------------------------------------------------------ opening images

    async def open(self, opener: ImageOpener, text: str, pinned: str | None = None, *,
                   on_manifest: Callable[[Reference, str], None] | None = None) -> tuple[OpenedImage, bool]:
        """Open *text* through *opener*, keeping its metadata here; return (image, opened from cache).

        With *pinned* (a manifest digest), the image opened is exactly that manifest: from this
        cache when it holds it (no network at all when every tail is here too), else fetched by
        digest. Local references are opened by *opener* alone (their metadata is local already).
        *on_manifest(repo, digest)* is called once a lazyfs manifest came from the registry, before
        its chunk tables are fetched (what needs only the digest can start then).
        """
        if parse_local_ref(text) is not None:
            return await opener.open(text), False
        ref = parse_reference(text)
        await opener.ensure_client()  # made in a worker thread the first time (it reads files)
        data = None
        if pinned is not None:
            data = await trio.to_thread.run_sync(self.read_manifest, pinned)
        from_cache = data is not None
        if data is None:
            data, media_type, digest = await opener.client.get_manifest(ref.with_digest(pinned) if pinned else ref,
                                                                         accept=MANIFEST_MEDIA_TYPES)
            if pinned is not None and digest != pinned:
                raise IntegrityError(f"manifest of {text}", pinned, digest, "registry")
            if ordinary_manifest(data):  # an ordinary image: through its lazyfs index (docs/index.md), not kept here
                from lazyfs.image.indexed import open_indexed

                return await open_indexed(opener, text, data, media_type, digest), False
        manifest = parse_manifest(data, opener.limits.max_virtual_size)
        digest = manifest.digest
        if not from_cache:
            if on_manifest is not None:
                on_manifest(ref.repo(), digest)
            try:
                await trio.to_thread.run_sync(self.store_manifest, digest, data)
            except (OSError, LazyfsError) as exc:
                log.warning("metadata cache: cannot keep the manifest of %s: %s", text, exc)
        backend = RegistryBackend(opener.client, ref.repo())

        def saved(layer: LayerDescriptor) -> bytes | None:
            return self.read_tail(digest, layer)

        def keep(layer: LayerDescriptor, tail: bytes) -> None:
            self.store_tail(digest, layer, tail)

        image = await load_image(manifest, [backend], name=text, limits=opener.limits, saved_tail=saved, on_tail=keep)
        if from_cache:
            self.stats["opened_from_cache"] += 1
        return OpenedImage(text, image, backend, remote=ref.with_digest(digest)), from_cache

    async def keep_config(self, opener: ImageOpener, opened: OpenedImage) -> None:
        """Fetch and keep the image config if it is not here yet (best effort: failures are logged)."""
        if opened.remote is None or opened.local is not None:
            return
        manifest = opened.image.manifest
        if await trio.to_thread.run_sync(self.has_config, manifest.digest, manifest.config.digest):
            return
        try:
            data = await opener.client.get_blob(opened.remote.repo(), manifest.config.digest, max_size=MAX_CONFIG_SIZE)
            parse_json(data, f"config of {opened.name}", MAX_CONFIG_SIZE)
            await trio.to_thread.run_sync(self.store_config, manifest.digest, data)
        except (OSError, LazyfsError) as exc:
            log.warning("metadata cache: cannot keep the config of %s: %s", opened.name, exc)

    def statistics(self) -> dict:
        return dict(self.stats)


def _remove(path: str) -> None:
    """Remove a rejected cache file; one that cannot be removed is rejected again next time."""
    try:
        os.unlink(path)
    except FileNotFoundError:  # removed meanwhile (another prune)
        pass
    except OSError as exc:
        log.warning("metadata cache: cannot remove %s: %s", path, exc)


