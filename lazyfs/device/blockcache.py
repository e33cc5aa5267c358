"""A block cache under the merged device: whole virtual ranges of read-only layers, read by offset.

The merged device asks it first for the read-only part of a read; what it does
not serve goes through the chunk store as before, and is then offered to it.
The implementation (``lazyfs.fetch.flatfile``) keeps one flat file per layer.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence

from lazyfs.device.index import Segment

__all__ = ["BlockCache"]


class BlockCache(abc.ABC):
    """Serves virtual blocks of read-only layers that it holds, verified."""

    @abc.abstractmethod
    async def read_into(self, buf: bytearray, offset: int, segments: Sequence[Segment]) -> list[Segment]:
        """Fill the parts of *buf* (device bytes from *offset*) that *segments* cover and this cache
        holds with verified bytes; return the segments it did not serve, in order."""

    @abc.abstractmethod
    async def admit(self, segments: Sequence[Segment], chunks: Mapping[bytes, bytes]) -> None:
        """Offer verified raw *chunks* (by digest) that *segments* were read from. Never raises for I/O errors."""

    def read_local_into(self, buf: bytearray, offset: int, segments: Sequence[Segment]) -> bool:
        """Fill *buf* as ``read_into`` would, synchronously, from any thread but the trio thread;
        True only if every segment was served, verified (False: nothing is promised about *buf*,
        and no state changed: the caller reads through ``read_into``)."""
        return False

    def counted_in(self) -> object | None:
        """The object whose ``native_counter`` slot counts the reads served outside Python from
        these files (the FUSE threads' C path sets it at first use); None: not counted."""
        return None

    def local_files(self) -> list[tuple[int, object, object, int]] | None:
        """Per read-only layer, ``(fd, bits, hashes, blocks)``: where ``read_local_into`` finds its
        blocks, for a reader outside Python that checks them the same way (the FUSE threads' C
        path, ``lazyfs.serve.fusekernel.fastpath``); fd -1 for a layer with no file. None: no such
        files (the default)."""
        return None

    def holds(self, segment: Segment) -> bool:
        """Whether every block of *segment* is held here (so it is local without its chunk)."""
        return False

    def watch(self, callback: Callable[[bytes], None]) -> Callable[[], None]:
        """Call *callback(digest)* whenever what :meth:`holds` says of the segments of chunk *digest*
        may have changed; returns the function that stops it. (This one holds nothing, ever.)"""
        return lambda: None

    async def aclose(self) -> None:
        """Persist what is written and release the layers' files."""

    def statistics(self) -> dict:
        return {}
