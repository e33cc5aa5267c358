"""Blob uploads: existence check, cross-repository mount, monolithic and chunked uploads.

Uploads go to the registry's first ``push`` endpoint (the origin unless a ``hosts.toml``
says otherwise), never fail over (an upload session lives on one server), and are retried
whole by the retry layer; the deadline bounds when a retry may start, not how long a
large upload may take (the idle timeout bounds a stalled one).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import trio

from lazyfs.errors import ConfigError, FetchError, FormatError, IntegrityError
from lazyfs.fetch.registry.answers import fail, location
from lazyfs.fetch.registry.auth import pull_scope, push_scope
from lazyfs.fetch.registry.hosts import PUSH
from lazyfs.format.digest import check_digest, digest_of
from lazyfs.format.reference import Reference, check_repository

if TYPE_CHECKING:
    from lazyfs.fetch.registry.client import RegistryClient

COPY_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class BlobPush:
    """What ``push_blob`` did: ``outcome`` is ``"exists"``, ``"mounted"`` or ``"uploaded"``."""

    digest: str
    size: int
    outcome: str


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(COPY_CHUNK):
            h.update(piece)
    return f"sha256:{h.hexdigest()}"


class _Source:
    """The bytes to upload: in memory, or a file read in pieces (never whole)."""

    def __init__(self, client: RegistryClient, data: bytes | None, path: Path | None, size: int) -> None:
        self.client, self.data, self.path, self.size = client, data, path, size

    def stream(self) -> Callable[[], AsyncIterator[bytes]]:
        """A fresh iterator over the whole file per call (a retried upload starts over)."""
        async def gen() -> AsyncIterator[bytes]:
            assert self.path is not None
            f = await trio.open_file(self.path, "rb")
            async with f:
                sent = 0
                while sent < self.size:
                    piece = await f.read(min(COPY_CHUNK, self.size - sent))
                    if not piece:
                        raise FetchError(f"push_blob: {self.path} shrank while uploading")
                    sent += len(piece)
                    self.client.sent(len(piece))
                    yield piece

        return gen

    async def part(self, start: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[start : start + n]

        def read() -> bytes:
            with open(self.path, "rb") as f:  # type: ignore[arg-type]
                f.seek(start)
                return f.read(n)

        part = await trio.to_thread.run_sync(read)
        if len(part) != n:
            raise FetchError(f"push_blob: {self.path} shrank while uploading")
        return part


async def push_blob(
    client: RegistryClient,
    repo: Reference | str,
    data_or_path: bytes | str | os.PathLike,
    digest: str | None = None,
    *,
    chunk_size: int | None = None,
    mount_from: str | None = None,
) -> BlobPush:
    """Make blob *digest* (computed if not given) exist in *repo*.

    Skipped if the registry already has it (``"exists"``). With *mount_from* (another
    repository of the same registry) a cross-repository mount is tried first
    (``"mounted"``). Otherwise it is uploaded (``"uploaded"``): monolithically (POST, then
    one PUT) when *chunk_size* is None, else in PATCH chunks of *chunk_size* bytes. The
    registry verifies the digest.
    """
    ref = client.repo(repo)
    if chunk_size is not None and chunk_size <= 0:
        raise ConfigError(f"push_blob: chunk_size must be positive, got {chunk_size}")
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        data: bytes | None = bytes(data_or_path)
        path, size = None, len(data)
        if digest is None:
            digest = await trio.to_thread.run_sync(digest_of, data)
    else:
        data, path = None, Path(data_or_path)
        try:
            size = (await trio.Path(path).stat()).st_size
        except OSError as e:
            raise FetchError(f"push_blob: cannot read {path}: {e.strerror or e}") from None
        if digest is None:
            digest = await trio.to_thread.run_sync(hash_file, path)
    check_digest(digest)
    if mount_from is not None:
        try:
            check_repository(mount_from)
        except FormatError as e:
            raise ConfigError(f"push_blob: mount_from: {e}") from None
    source = _Source(client, data, path, size)
    ep = client.endpoints(ref.registry, PUSH)[0]
    scopes = (push_scope(ref.repository),) + ((pull_scope(mount_from),) if mount_from else ())
    what = f"push blob {digest} to {ref.name}"
    blob_url = ep.url(f"{ref.repository}/blobs/{digest}")

    async def exists() -> bool:
        response = await client.request("HEAD", ep, blob_url, scopes=scopes, follow_redirects=True)
        try:
            if response.status_code in (200, 404):
                return response.status_code == 200
            await fail(response, what)
            return False
        finally:
            await response.aclose()

    if await client.call(what, exists):
        return BlobPush(digest, size, "exists")

    async def upload() -> str:
        start_url = ep.url(f"{ref.repository}/blobs/uploads/")
        if mount_from:
            start_url += "?" + urlencode({"mount": digest, "from": mount_from})
        response = await client.request("POST", ep, start_url, scopes=scopes, body=b"")
        try:
            if mount_from and response.status_code == 201:
                return "mounted"
            if response.status_code != 202:
                await fail(response, f"{what}: start upload")
            session = location(response, what)
        finally:
            await response.aclose()
        final_body: bytes | Callable[[], AsyncIterator[bytes]]
        if chunk_size is not None and size > 0:
            sent = 0
            while sent < size:
                n = min(chunk_size, size - sent)
                headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{sent}-{sent + n - 1}",
                           "Content-Length": str(n)}
                response = await client.request("PATCH", ep, session, scopes=scopes, headers=headers,
                                                body=await source.part(sent, n))
                try:
                    if response.status_code != 202:
                        await fail(response, f"{what}: chunk at {sent}")
                    session = location(response, what)
                finally:
                    await response.aclose()
                sent += n
            final_body = b""
        else:
            final_body = data if data is not None else source.stream()
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Length": str(0 if final_body == b"" else size)}
        response = await client.request("PUT", ep, session.copy_merge_params({"digest": digest}), scopes=scopes,
                                        headers=headers, body=final_body)
        try:
            if response.status_code not in (201, 204):
                await fail(response, f"{what}: finish upload")
            stored = response.headers.get("docker-content-digest")
            if stored and stored != digest:
                raise IntegrityError(what, digest, stored, ep.host)
        finally:
            await response.aclose()
        return "uploaded"

    return BlobPush(digest, size, await client.call(what, upload, hard=False))
