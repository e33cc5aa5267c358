"""Where blobs live: the backend interface every store (registry, OCI layout) implements."""

from __future__ import annotations

import abc
from collections.abc import Collection
from dataclasses import dataclass

from lazyfs.errors import FetchError


@dataclass(frozen=True, slots=True)
class SourcedBytes:
    """Bytes read from a blob, and the source (``host[:port]``, or a backend's name) that served them."""

    data: bytes
    source: str


class Backend(abc.ABC):
    """Read-only access to content-addressed blobs by byte range.

    Blob names are OCI digests ("sha256:<hex>"). Implementations raise
    NotFoundError for a missing blob and FetchError for transport failures;
    they do not verify chunk digests (the scheduler does).

    A backend may serve a blob from several *sources* (a registry's mirrors and the
    registry itself). ``read_range_from`` says which source served the bytes, so that a
    verifier can report bad bytes (``source_failed_verification``) and read again with
    that source excluded. ``retries`` is True when the backend already retries transient
    failures and fails over between its sources within its own deadline: its callers must
    not retry it again (one retry layer).
    """

    name: str = "backend"
    retries: bool = False

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source, in the order they are tried; one (the backend itself) by default."""
        return (self.name,)

    @abc.abstractmethod
    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        """Exactly *length* bytes of *blob* from *offset* (FetchError if short)."""

    async def read_range_from(self, blob: str, offset: int, length: int, *,
                              exclude: Collection[str] = ()) -> SourcedBytes:
        """``read_range`` from a source not in *exclude*, and which source that was."""
        if self.name in exclude:
            raise FetchError(f"{self.name}: every source is excluded")
        return SourcedBytes(await self.read_range(blob, offset, length), self.name)

    def source_failed_verification(self, source: str) -> None:
        """Bytes *source* served failed verification (a backend with health may act on it)."""

    @abc.abstractmethod
    async def blob_size(self, blob: str) -> int:
        """The size of *blob* in bytes."""

    async def aclose(self) -> None:
        """Close connections."""
