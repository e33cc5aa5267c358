"""A Backend over an OCI image layout directory: blobs are files ``root/blobs/<alg>/<hex>``."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from lazyfs.errors import FetchError, NotFoundError, RangeError
from lazyfs.fetch.backend import Backend
from lazyfs.format.digest import split_digest

__all__ = ["DirectoryBackend"]



class DirectoryBackend(Backend):
    """Ranged reads of blobs in an OCI layout with ``os.pread`` in worker threads."""

    def __init__(self, root: str | os.PathLike, *, threads: int = 8) -> None:
        self.root = Path(root)
        self.name = f"dir:{self.root}"
        self._threads = threads
        self._limiter: trio.CapacityLimiter | None = None

    def path_of(self, blob: str) -> Path:
        """The file holding *blob* (NotFoundError for a name that is not a digest)."""
        parts = split_digest(blob)  # also keeps blob names from escaping the root
        if parts is None:
            raise NotFoundError(f"{self.name}: not a blob digest: {blob!r}")
        return self.root / "blobs" / parts[0] / parts[1]

    def _limit(self) -> trio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self._threads)
        return self._limiter

    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise RangeError(f"{self.name}: bad range {offset}+{length} of {blob}")
        path = self.path_of(blob)
        if length == 0:
            await self.blob_size(blob)  # still report a missing blob
            return b""
        return await trio.to_thread.run_sync(self._pread, path, blob, offset, length, limiter=self._limit())

    def _pread(self, path: Path, blob: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFoundError(f"{self.name}: no blob {blob}") from None
        except OSError as exc:
            raise FetchError(f"{self.name}: cannot open {blob}: {exc}") from exc
        try:
            parts = []
            done = 0
            while done < length:
                part = os.pread(fd, length - done, offset + done)
                if not part:
                    raise FetchError(
                        f"{self.name}: short read of {blob}: {done} of {length} bytes at offset {offset}"
                    )
                parts.append(part)
                done += len(part)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as exc:
            raise FetchError(f"{self.name}: cannot read {blob}: {exc}") from exc
        finally:
            os.close(fd)

    async def blob_size(self, blob: str) -> int:
        path = self.path_of(blob)
        try:
            st = await trio.to_thread.run_sync(os.stat, path, limiter=self._limit())
        except FileNotFoundError:
            raise NotFoundError(f"{self.name}: no blob {blob}") from None
        except OSError as exc:
            raise FetchError(f"{self.name}: cannot stat {blob}: {exc}") from exc
        return st.st_size
