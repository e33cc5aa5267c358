"""Manifests and tags: get (verified), head, put, and the paginated tag list.

A manifest named by digest may come from any ``pull`` endpoint (it is verified); one
named by tag only from ``resolve`` endpoints (the origin, unless a ``hosts.toml`` lets a
mirror resolve). Puts and tag lists go to the registry itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import httpx
import trio

from lazyfs.errors import ConfigError, FetchError, FormatError, IntegrityError
from lazyfs.fetch.registry.answers import fail, media_type, next_page, parse_tags, read_body
from lazyfs.fetch.registry.auth import pull_scope, push_scope
from lazyfs.fetch.registry.hosts import PULL, PUSH, RESOLVE, Endpoint
from lazyfs.format.digest import check_digest, digest_of
from lazyfs.format.oci import MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE
from lazyfs.format.reference import Reference

if TYPE_CHECKING:
    from lazyfs.fetch.registry.client import RegistryClient

MAX_TAG_PAGES = 10_000


def _capability(ref: Reference) -> str:
    return PULL if ref.digest is not None else RESOLVE


async def get_manifest(client: RegistryClient, ref: Reference | str,
                       accept: Iterable[str] = MANIFEST_MEDIA_TYPES) -> tuple[bytes, str, str]:
    """``(bytes, media_type, digest)`` of the manifest *ref* names (by digest if it has one,
    else by tag, else ``latest``). Fetched by digest, the bytes are verified (IntegrityError)."""
    ref = client.repo(ref)
    what = f"manifest {ref}"
    headers = {"Accept": ", ".join(accept)}

    async def attempt(ep: Endpoint) -> tuple[bytes, str, str, str]:
        url = ep.url(f"{ref.repository}/manifests/{ref.reference}")
        response = await client.request("GET", ep, url, scopes=(pull_scope(ref.repository),), headers=headers,
                                        follow_redirects=True)
        try:
            if response.status_code != 200:
                await fail(response, what)
            data = await read_body(response, MAX_MANIFEST_SIZE, what, lambda n: client.received(ep.host, n))
            h = response.headers
        finally:
            await response.aclose()
        # Hash with the algorithm the caller (or else the registry) named; sha256 by default.
        header_digest = h.get("docker-content-digest", "")
        algorithm = (ref.digest or header_digest or "sha256:").partition(":")[0]
        if algorithm not in ("sha256", "sha512"):
            algorithm = "sha256"
        digest = await trio.to_thread.run_sync(digest_of, data, algorithm)
        if ref.digest is not None and digest != ref.digest:
            raise IntegrityError(what, ref.digest, digest, ep.host)
        if header_digest and header_digest.partition(":")[0] == algorithm and header_digest != digest:
            raise IntegrityError(f"{what} (Docker-Content-Digest)", header_digest, digest, ep.host)
        return data, h.get("content-type", ""), digest, ep.host

    data, content_type, digest, _ = await client.from_sources(what, ref.registry, _capability(ref), (), attempt)
    return data, media_type(content_type, data, what), digest


async def head_manifest(client: RegistryClient, ref: Reference | str,
                        accept: Iterable[str] = MANIFEST_MEDIA_TYPES) -> tuple[str, str, int]:
    """``(media_type, digest, size)`` of the manifest *ref* names, without its body (falls
    back to a GET when the registry does not send ``Docker-Content-Digest``)."""
    ref = client.repo(ref)
    what = f"manifest {ref}"
    headers = {"Accept": ", ".join(accept)}

    async def attempt(ep: Endpoint) -> tuple[str, str, int] | None:
        url = ep.url(f"{ref.repository}/manifests/{ref.reference}")
        response = await client.request("HEAD", ep, url, scopes=(pull_scope(ref.repository),), headers=headers,
                                        follow_redirects=True)
        try:
            if response.status_code != 200:
                await fail(response, what)
            digest = response.headers.get("docker-content-digest")
            size = response.headers.get("content-length", "")
            media = response.headers.get("content-type", "").split(";")[0].strip()
            if not digest or not size.isdigit() or not media:
                return None
            found = media, check_digest(digest, f"{what}: Docker-Content-Digest"), int(size)
        except FormatError as e:
            raise FetchError(str(e)) from None
        finally:
            await response.aclose()
        if ref.digest is not None and found[1] != ref.digest:
            raise IntegrityError(what, ref.digest, found[1], ep.host)
        return found

    found = await client.from_sources(what, ref.registry, _capability(ref), (), attempt)
    if found is not None:
        return found
    data, media, digest = await get_manifest(client, ref, accept)
    return media, digest, len(data)


async def put_manifest(client: RegistryClient, ref: Reference | str, data: bytes, media_type_: str) -> str:
    """Store *data* as a manifest under *ref*'s tag (or its digest if it has no tag); the digest.

    If *ref* carries a digest it must be the digest of *data* (IntegrityError).
    """
    ref = client.repo(ref)
    if len(data) > MAX_MANIFEST_SIZE:
        raise FormatError(f"manifest for {ref}: {len(data)} bytes, more than {MAX_MANIFEST_SIZE}")
    algorithm = ref.digest.partition(":")[0] if ref.digest else "sha256"
    digest = digest_of(data, algorithm)
    if ref.digest is not None and ref.digest != digest:
        raise IntegrityError(f"manifest for {ref}", ref.digest, digest)
    target = ref.tag or digest
    ep = client.endpoints(ref.registry, PUSH)[0]
    url = ep.url(f"{ref.repository}/manifests/{target}")
    what = f"put manifest {ref.name}:{target}" if ref.tag else f"put manifest {ref.name}@{digest}"

    async def attempt() -> str:
        response = await client.request("PUT", ep, url, scopes=(push_scope(ref.repository),),
                                        headers={"Content-Type": media_type_}, body=data)
        try:
            if response.status_code not in (200, 201, 202):
                await fail(response, what)
            return response.headers.get("docker-content-digest", "")
        finally:
            await response.aclose()

    stored = await client.call(what, attempt)
    if stored and stored.partition(":")[0] == algorithm and stored != digest:
        raise IntegrityError(what, digest, stored, ep.host)
    return digest


async def list_tags(client: RegistryClient, repo: Reference | str, *, page_size: int | None = None) -> list[str]:
    """Every tag of *repo*, following ``Link: <…>; rel="next"`` pages (of *page_size* tags if
    given, else the registry's default)."""
    ref = client.repo(repo)
    ep = client.endpoints(ref.registry, RESOLVE)[-1]
    what = f"tags of {ref.name}"
    url: httpx.URL | None = httpx.URL(ep.url(f"{ref.repository}/tags/list"))
    if page_size is not None:
        if page_size <= 0:
            raise ConfigError(f"list_tags: page_size must be positive, got {page_size}")
        url = url.copy_merge_params({"n": str(page_size)})
    tags: list[str] = []
    for _ in range(MAX_TAG_PAGES):
        if url is None:
            return tags
        page_url = url

        async def attempt() -> tuple[list[str], httpx.URL | None]:
            response = await client.request("GET", ep, page_url, scopes=(pull_scope(ref.repository),))
            try:
                if response.status_code != 200:
                    await fail(response, what)
                body = await read_body(response, MAX_MANIFEST_SIZE, what, lambda n: client.received(ep.host, n))
                return parse_tags(body, what), next_page(response, what)
            finally:
                await response.aclose()

        page, url = await client.call(what, attempt)
        tags.extend(page)
    raise FetchError(f"{what}: more than {MAX_TAG_PAGES} pages")
