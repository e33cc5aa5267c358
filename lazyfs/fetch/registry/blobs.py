"""Blob reads: sizes, ranged reads, whole blobs (verified), blobs streamed to files.

Every read goes to the registry's ``pull`` endpoints in the source picker's order (healthy
mirrors first, the origin last, down sources after all others) and fails over on any
error but a final one; rounds repeat in the retry layer while a failure was transient.

Exclusion, for callers that verify what they read: ``read_range_from`` returns the bytes
together with the source (``host[:port]``) that served them; if they fail verification,
call ``source_failed_verification(source)`` and again with ``exclude={source, ...}``:
the next source is used. FetchError when every source is excluded.
"""

from __future__ import annotations

import os
import random
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import trio

from lazyfs.errors import FetchError, IntegrityError, RangeError, describe
from lazyfs.fetch.backend import SourcedBytes
from lazyfs.fetch.registry.answers import check_content_range, fail, read_body
from lazyfs.fetch.registry.auth import pull_scope
from lazyfs.fetch.registry.hosts import PULL, Endpoint
from lazyfs.fetch.registry.retry import Transient
from lazyfs.fetch.registry.threaded import THREADED
from lazyfs.format.digest import check_digest, digest_of, hasher_for
from lazyfs.format.reference import Reference

if TYPE_CHECKING:
    from lazyfs.fetch.registry.client import RegistryClient

MAX_BLOB_IN_MEMORY = 1 << 30
COPY_CHUNK = 1 << 20
# A whole-blob answer to a ranged read (a cold pull-through mirror) is read and cut to the
# range when the blob is at most this big: cheaper than a second request elsewhere.
SMALL_WHOLE_BLOB = 1 << 20


class RangeIgnored(FetchError):
    """A source answered a ranged GET with the whole blob (HTTP 200), as a cold pull-through
    mirror does while it fills its cache: this read goes elsewhere, the source is not unhealthy."""


async def blob_size(client: RegistryClient, repo: Reference | str, digest: str, *,
                    exclude: Collection[str] = ()) -> int:
    """The size of blob *digest* in *repo* (HEAD), NotFoundError if no source has it."""
    ref = client.repo(repo)
    check_digest(digest)
    what = f"blob {digest} in {ref.name}"

    async def attempt(ep: Endpoint) -> int:
        url = ep.url(f"{ref.repository}/blobs/{digest}")
        response = await client.request("HEAD", ep, url, scopes=(pull_scope(ref.repository),), follow_redirects=True)
        try:
            if response.status_code != 200:
                await fail(response, f"{what} at {ep.host}")
            size = response.headers.get("content-length", "")
            if not size.isdigit():
                raise FetchError(f"{what} at {ep.host}: HEAD without a usable Content-Length ({size!r})")
            answered = response.headers.get("docker-content-digest")
            if answered and answered != digest:
                raise IntegrityError(what, digest, answered, ep.host)
            return int(size)
        finally:
            await response.aclose()

    return await client.from_sources(what, ref.registry, PULL, exclude, attempt)


async def read_range(client: RegistryClient, repo: Reference | str, digest: str, offset: int, length: int, *,
                     exclude: Collection[str] = ()) -> bytes:
    """Exactly *length* bytes of blob *digest* from *offset* (one ``Range`` GET).

    FetchError if a source returns fewer or more bytes. A source that ignores the range
    (HTTP 200, as a cold pull-through mirror does) is accepted when the whole blob is at most
    ``SMALL_WHOLE_BLOB`` bytes (the range is cut out of it) or is exactly the range; otherwise
    the read goes to the next source and that source is asked last for this blob for a while
    (``HealthPolicy.cold_seconds``). *exclude* skips sources by ``host[:port]``. The bytes are
    not verified here: callers verify chunks (the scheduler) or the metadata they parse.
    """
    return (await read_range_from(client, repo, digest, offset, length, exclude=exclude)).data


async def read_range_from(client: RegistryClient, repo: Reference | str, digest: str, offset: int, length: int, *,
                          exclude: Collection[str] = ()) -> SourcedBytes:
    """``read_range`` that also says which source served the bytes (see the module docstring)."""
    ref = client.repo(repo)
    check_digest(digest)
    if offset < 0 or length < 0:
        raise RangeError(f"read_range: negative offset {offset} or length {length}")
    if length == 0:
        return SourcedBytes(b"", client.sources(ref.registry)[0])
    last = offset + length - 1
    what = f"blob {digest} bytes {offset}-{last} in {ref.name}"

    async def attempt(ep: Endpoint) -> SourcedBytes:
        url = ep.url(f"{ref.repository}/blobs/{digest}")
        headers = {"Range": f"bytes={offset}-{last}", "Accept-Encoding": "identity"}
        # The body is read in a worker thread (registry/threaded.py), at most this much of it.
        response = await client.request("GET", ep, url, scopes=(pull_scope(ref.repository),), headers=headers,
                                        follow_redirects=True, extensions={THREADED: max(length, SMALL_WHOLE_BLOB)})
        where = f"{what} at {ep.host}"
        try:
            status = response.status_code
            whole = None
            if status == 206:
                check_content_range(response.headers.get("content-range"), offset, last, where)
            elif status == 200:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and last < int(declared) <= SMALL_WHOLE_BLOB:
                    whole = int(declared)
                elif offset != 0:
                    raise RangeIgnored(f"{where}: server ignored the Range header (HTTP 200)", 200)
            elif status == 416:
                raise FetchError(f"{where}: range not satisfiable (beyond the end of the blob)", 416)
            else:
                await fail(response, where)
            try:
                if whole is not None:
                    data = await read_body(response, whole, where, lambda n: client.received(ep.host, n))
                    if len(data) != whole:
                        raise Transient(f"{where}: whole blob cut short, {len(data)} of {whole} bytes", 200)
                    data = data[offset:offset + length]
                else:
                    data = await read_body(response, length, where, lambda n: client.received(ep.host, n))
            except FetchError as e:
                if status == 200:  # a whole blob larger than the range
                    raise RangeIgnored(f"{where}: server ignored the Range header (HTTP 200): {e}", 200) from None
                raise
        finally:
            await response.aclose()
        if len(data) != length:
            if status == 200:
                raise RangeIgnored(f"{where}: server ignored the Range header and the blob is {len(data)} bytes", 200)
            raise Transient(f"{where}: short read, {len(data)} of {length} bytes", status)
        return SourcedBytes(data, ep.host)

    return await client.from_sources(what, ref.registry, PULL, exclude, attempt, key=digest)


async def get_blob(client: RegistryClient, repo: Reference | str, digest: str, *, max_size: int = MAX_BLOB_IN_MEMORY,
                   exclude: Collection[str] = ()) -> bytes:
    """The whole blob, verified against *digest* (IntegrityError); at most *max_size* bytes."""
    ref = client.repo(repo)
    check_digest(digest)
    what = f"blob {digest} in {ref.name}"

    async def attempt(ep: Endpoint) -> bytes:
        url = ep.url(f"{ref.repository}/blobs/{digest}")
        response = await client.request("GET", ep, url, scopes=(pull_scope(ref.repository),),
                                        headers={"Accept-Encoding": "identity"}, follow_redirects=True)
        try:
            if response.status_code != 200:
                await fail(response, f"{what} at {ep.host}")
            data = await read_body(response, max_size, f"{what} at {ep.host}", lambda n: client.received(ep.host, n))
        finally:
            await response.aclose()
        got = await trio.to_thread.run_sync(digest_of, data, digest.partition(":")[0])
        if got != digest:
            raise IntegrityError(f"blob {digest}", digest, got, ep.host)
        return data

    return await client.from_sources(what, ref.registry, PULL, exclude, attempt, bounded=max_size <= (64 << 20),
                                     key=digest, avoid_cold=False)


async def get_blob_to_file(client: RegistryClient, repo: Reference | str, digest: str, dest: str | os.PathLike, *,
                           exclude: Collection[str] = ()) -> int:
    """Stream the blob into *dest* (written to a temporary file beside it, verified, then
    renamed into place; nothing is left behind on failure). Returns its size."""
    ref = client.repo(repo)
    check_digest(digest)
    dest = Path(dest)
    what = f"blob {digest} in {ref.name}"

    async def attempt(ep: Endpoint) -> int:
        url = ep.url(f"{ref.repository}/blobs/{digest}")
        tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}-{random.getrandbits(32):08x}")
        hasher = hasher_for(digest)
        size = 0
        response = await client.request("GET", ep, url, scopes=(pull_scope(ref.repository),),
                                        headers={"Accept-Encoding": "identity"}, follow_redirects=True)
        try:
            if response.status_code != 200:
                await fail(response, f"{what} at {ep.host}")
            f = await trio.open_file(tmp, "wb")
            try:
                async with f:
                    try:
                        async for piece in response.aiter_bytes(COPY_CHUNK):
                            size += len(piece)
                            client.received(ep.host, len(piece))
                            hasher.update(piece)
                            await f.write(piece)
                    except httpx.TimeoutException:
                        raise Transient(f"{what} at {ep.host}: timed out reading the body") from None
                    except (httpx.TransportError, httpx.DecodingError) as e:
                        raise Transient(f"{what} at {ep.host}: body cut short: {describe(e)}") from None
                got = f"{digest.partition(':')[0]}:{hasher.hexdigest()}"
                if got != digest:
                    raise IntegrityError(f"blob {digest}", digest, got, ep.host)
                await trio.Path(tmp).replace(dest)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise FetchError(f"{what}: cannot write {dest}: {e.strerror or e}") from None
        finally:
            await response.aclose()
        return size

    return await client.from_sources(what, ref.registry, PULL, exclude, attempt, bounded=False, key=digest,
                                     avoid_cold=False)
