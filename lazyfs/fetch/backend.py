"""Where blobs live: the backend interface every store (registry, OCI layout) implements."""

from __future__ import annotations

import abc


class Backend(abc.ABC):
    """Read-only access to content-addressed blobs by byte range.

    Blob names are OCI digests ("sha256:<hex>"). Implementations raise
    NotFoundError for a missing blob and FetchError for transport failures;
    they do not verify chunk digests (the scheduler does).
    """

    name: str = "backend"

    @abc.abstractmethod
    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        """Exactly *length* bytes of *blob* from *offset* (FetchError if short)."""

    @abc.abstractmethod
    async def blob_size(self, blob: str) -> int:
        """The size of *blob* in bytes."""

    async def aclose(self) -> None:
        """Close connections."""
