"""The host's disk budget: chunk cache, conversion cache and writable layers (docs/durability.md).

The chunk cache holds at most ``cache_size`` bytes and evicts by its own LRU
only, never because the disk is full. When the writable root shares a file
system with the cache root, writable layers leave the cache's unused budget
free (``reserve_for``): a write that would eat into it fails with ENOSPC, so a
writable layer can never push out the chunks running containers read. The
numbers are sampled in a worker thread and reported by ``statistics()``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from lazyfs.config import Config
from lazyfs.device.writable import WritableLayer
from lazyfs.device.writable.base import directory_usage
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.flatfile import FlatCache

log = logging.getLogger(__name__)
SAMPLE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class FsSample:
    """One file system holding lazyfs roots: which roots, its size and what is left."""

    device: int
    roots: tuple[str, ...]
    total_bytes: int
    free_bytes: int


def same_filesystem(a: str, b: str) -> bool:
    """Whether paths *a* and *b* (the nearest existing ancestors) are on one file system."""
    return _device_of(a) == _device_of(b)


def _device_of(path: str) -> int:
    path = os.path.abspath(path)
    while True:
        try:
            return os.stat(path).st_dev
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                raise
            path = parent


def conversion_cache_dir(config: Config) -> str:
    return os.path.join(config.cache_root, "convert")  # lazyfs.image.convert.default_cache_dir


class DiskBudget:
    """Keeps writable layers out of the chunk cache's share of a disk, and reports who uses how much."""

    def __init__(self, config: Config, cache: ChunkCache, flat: FlatCache | None = None) -> None:
        self.config, self.cache, self.flat = config, cache, flat
        self._sample: dict = {}
        self._changed = trio.Event()

    def cache_unused(self) -> int:
        """The part of the chunk cache's budget not filled yet (what writable layers must leave free)."""
        stats = self.cache.statistics()
        flat = 0 if self.flat is None else max(0, self.flat.max_bytes - self.flat.held)
        return max(0, stats["max_bytes"] - stats["bytes"]) + flat

    def reserve_for(self, layer_dir: str) -> Callable[[], int] | None:
        """The ``keep_free`` of a writable layer in *layer_dir*: None if it is not on the cache's disk."""
        if self.cache.root is None or not same_filesystem(layer_dir, str(self.cache.root)):
            return None
        return self.cache_unused

    # ------------------------------------------------------------ sampling

    def changed(self) -> None:
        """Sample again soon (an image was attached or detached)."""
        self._changed.set()

    async def run(self, layers: Callable[[], Mapping[str, WritableLayer]], interval: float = SAMPLE_SECONDS) -> None:
        """Sample the numbers every *interval* seconds, and after changed(), in a worker thread, until cancelled."""
        while True:
            self._changed = trio.Event()
            current = dict(layers())
            try:
                self._sample = await trio.to_thread.run_sync(self.sample, current)
            except OSError as exc:
                log.warning("disk budget: cannot sample: %s", exc)
            with trio.move_on_after(interval):
                await self._changed.wait()

    def sample(self, layers: Mapping[str, WritableLayer]) -> dict:
        """Measure now (blocking: file system calls)."""
        per_layer = {name: {"bytes": layer.disk_usage(), "max_bytes": layer.max_disk_bytes}
                     for name, layer in layers.items()}
        bounded = all(v["max_bytes"] is not None for v in per_layer.values())
        roots = {"cache_root": self.config.cache_root, "writable_root": self.config.writable_root}
        filesystems: dict[int, FsSample] = {}
        for path in roots.values():
            try:
                dev = _device_of(path)
                st = os.statvfs(path if os.path.exists(path) else os.path.dirname(os.path.abspath(path)))
            except OSError:
                continue
            known = filesystems.get(dev)
            filesystems[dev] = FsSample(dev, (known.roots if known else ()) + (path,), st.f_blocks * st.f_frsize,
                                        st.f_bavail * st.f_frsize)
        shared = len(filesystems) == 1 and len(roots) == 2
        cache = self.cache.statistics()
        return {
            "sampled_at": time.time(),
            "chunk_cache": {"root": self.config.cache_root, "bytes": cache["bytes"], "max_bytes": cache["max_bytes"]},
            "flat_cache": {"root": os.path.join(self.config.cache_root, "flat"),
                           "bytes": 0 if self.flat is None else self.flat.held,
                           "max_bytes": 0 if self.flat is None else self.flat.max_bytes},
            "conversion_cache": {"root": conversion_cache_dir(self.config),
                                 "bytes": directory_usage(conversion_cache_dir(self.config)), "max_bytes": None},
            "writable_layers": {"root": self.config.writable_root,
                                "bytes": sum(v["bytes"] for v in per_layer.values()),
                                "max_bytes": sum(v["max_bytes"] for v in per_layer.values()) if bounded else None,
                                "layers": per_layer},
            "writable_reserve": self.cache_unused() if shared else 0,
            "filesystems": [{"roots": list(f.roots), "total_bytes": f.total_bytes, "free_bytes": f.free_bytes}
                            for f in filesystems.values()],
        }

    def statistics(self) -> dict:
        """The last sample (empty until the first one is taken)."""
        return self._sample
