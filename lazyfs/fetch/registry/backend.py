"""The blobs of one repository as a ``Backend``: what the fetch scheduler reads through."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import cachetools

from lazyfs.fetch.backend import Backend, SourcedBytes
from lazyfs.format.reference import Reference

if TYPE_CHECKING:
    from lazyfs.fetch.registry.client import RegistryClient

MAX_SIZES = 4096


class RegistryBackend(Backend):
    """The blobs of one repository, read through the client's sources (mirrors, then the origin).

    The client retries and fails over itself (``retries`` is True). ``read_range_from``
    with ``exclude`` lets a verifier retry a range that failed its digest check on the
    next source. The client is shared and not closed by ``aclose`` unless *close_client*.
    """

    retries = True

    def __init__(self, client: RegistryClient, repository: Reference | str, *, close_client: bool = False) -> None:
        self.client = client
        self.repository = client.repo(repository).repo()
        self.name = f"registry {self.repository.name}"
        self._close_client = close_client
        self._sizes: cachetools.LRUCache[str, int] = cachetools.LRUCache(MAX_SIZES)

    @property
    def sources(self) -> tuple[str, ...]:
        """The ``host[:port]`` of each source, in configured order."""
        return self.client.sources(self.repository.registry)

    async def read_range(self, blob: str, offset: int, length: int, *, exclude: Collection[str] = ()) -> bytes:
        return await self.client.read_range(self.repository, blob, offset, length, exclude=exclude)

    async def read_range_from(self, blob: str, offset: int, length: int, *,
                              exclude: Collection[str] = ()) -> SourcedBytes:
        """The bytes and the source that served them; pass that source in *exclude* to retry elsewhere."""
        return await self.client.read_range_from(self.repository, blob, offset, length, exclude=exclude)

    def source_failed_verification(self, source: str) -> None:
        self.client.source_failed_verification(source)

    async def blob_size(self, blob: str) -> int:
        size = self._sizes.get(blob)
        if size is None:
            size = self._sizes[blob] = await self.client.blob_size(self.repository, blob)
        return size

    async def aclose(self) -> None:
        if self._close_client:
            await self.client.aclose()
