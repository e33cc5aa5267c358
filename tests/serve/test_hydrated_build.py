"""hydrated.build: the hydrated file reads exactly as the merged device (in-process, no root)."""

import os
import stat

import pytest
import trio

from lazyfs.device.merged import MergedDevice
from lazyfs.errors import IntegrityError
from lazyfs.serve import hydrated
from tests.device.test_merged import SIZE, make_stack
from tests.support.layers import MemoryBackend, build_blob
from tests.support.sources import CountingSource

MANIFEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("seed", range(6))
def test_hydrated_file_is_the_merged_device(tmp_path, seed):
    """Every byte of the hydrated file equals the merged device's, holes and whited-out
    (ZEROED) blocks included; the file is 0600 and published under its final name.
    (Break-checked: ignoring seg.chunk_block when slicing the chunk makes it fail.)"""
    layers, backend, model = make_stack(seed)
    dev = MergedDevice(layers, CountingSource(backend))
    built = trio.run(hydrated.build, dev, dev.store, str(tmp_path), MANIFEST)
    assert built.path == hydrated.path_for(str(tmp_path), MANIFEST)
    with open(built.path, "rb") as f:
        assert f.read() == bytes(model) == trio.run(dev.read, 0, SIZE)
    assert stat.S_IMODE(os.stat(built.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(hydrated.directory(str(tmp_path))).st_mode) == 0o700
    assert hydrated.existing(str(tmp_path), MANIFEST, SIZE) == built
    assert os.listdir(hydrated.directory(str(tmp_path))) == [os.path.basename(built.path)]


def test_a_file_of_another_size_is_never_served(tmp_path):
    layers, backend, _ = make_stack(1)
    dev = MergedDevice(layers, CountingSource(backend))
    built = trio.run(hydrated.build, dev, dev.store, str(tmp_path), MANIFEST)
    assert hydrated.existing(str(tmp_path), MANIFEST, SIZE + 4096) is None
    os.truncate(built.path, SIZE - 4096)
    assert hydrated.existing(str(tmp_path), MANIFEST, SIZE) is None


def test_a_bad_chunk_leaves_no_file(tmp_path):
    """A chunk that fails verification aborts the build: no final file, no temporary file."""
    blob, digest, meta = build_blob(SIZE, [(0, b"x" * 4096 * 3)], chunk_size=4 * 4096)
    bad = bytearray(blob)
    bad[meta.chunks[0].offset] ^= 1
    dev = MergedDevice([(meta, digest)], CountingSource(MemoryBackend({digest: bytes(bad)})))
    with pytest.raises(IntegrityError):
        trio.run(hydrated.build, dev, dev.store, str(tmp_path), MANIFEST)
    assert os.listdir(hydrated.directory(str(tmp_path))) == []


def test_not_a_manifest_digest_is_refused(tmp_path):
    for bad in ("", "sha256", "sha256:../x", "../a:b"):
        with pytest.raises(Exception) as info:
            hydrated.path_for(str(tmp_path), bad)
        assert "manifest digest" in str(info.value)


class _Image:
    """What hydrated.watch reads of an attachment's opened image: its manifest digest."""

    def __init__(self, digest: str) -> None:
        self.image = type("I", (), {"manifest": type("M", (), {"digest": digest})()})()


class _Host:
    """What hydrated.watch reads of a Host: config, cache, attachments (weak-referenceable, as a Host is)."""

    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)


def test_the_daemon_check_hydrates_an_image_once_it_became_fully_local(tmp_path):
    """check_once (the daemon's periodic check) builds nothing while a chunk is missing, and the
    file once the last chunk is in the cache, exactly once. (Break-checked: with is_fully_local
    always True the file appears while a chunk is missing and the first assert fails.)"""
    from lazyfs.config import Config
    from lazyfs.fetch.cache import ChunkCache
    from lazyfs.format.chunk import decode_chunk

    layers, backend, model = make_stack(3)
    dev = MergedDevice(layers, CountingSource(backend))
    cache = ChunkCache(str(tmp_path / "chunks"), 1 << 30)
    att = _Host(device=dev, store=dev.store, opened=_Image(MANIFEST), ref="test/image", name="a", tasks=set())
    host = _Host(config=Config(cache_root=str(tmp_path)), cache=cache, attachments={"a": att})
    path = hydrated.path_for(str(tmp_path), MANIFEST)
    locations = dev.index.locations()

    async def put(loc):
        stored = await backend.read_range(loc.blob, loc.offset, loc.compressed_length)
        await cache.put(loc.digest, decode_chunk(loc.digest, stored, loc.compression, loc.raw_length, loc.blob))

    async def scenario():
        done: set[str] = set()
        for loc in locations[:-1]:
            await put(loc)
        assert await hydrated.check_once(host, done) == [] and not os.path.exists(path)
        await put(locations[-1])
        (built,) = await hydrated.check_once(host, done)
        assert built.path == path and done == {MANIFEST}
        assert await hydrated.check_once(host, done) == []  # once

    trio.run(scenario)
    with open(path, "rb") as f:
        assert f.read() == bytes(model)


def test_the_control_operation_reports_missing_chunks_then_builds(tmp_path):
    """``hydrate-file`` answers how many chunks are missing and builds nothing; once they are
    all local it returns the file; an unknown name is a NotFoundError."""
    from lazyfs.config import Config
    from lazyfs.errors import NotFoundError
    from lazyfs.fetch.cache import ChunkCache
    from lazyfs.format.chunk import decode_chunk

    layers, backend, model = make_stack(4)
    dev = MergedDevice(layers, CountingSource(backend))
    cache = ChunkCache(str(tmp_path / "chunks"), 1 << 30)
    att = _Host(device=dev, store=dev.store, opened=_Image(MANIFEST), ref="test/image", name="a", tasks=set())
    host = _Host(config=Config(cache_root=str(tmp_path)), cache=cache, attachments={"a": att})
    locations = dev.index.locations()

    async def scenario():
        for loc in locations[1:]:
            stored = await backend.read_range(loc.blob, loc.offset, loc.compressed_length)
            await cache.put(loc.digest, decode_chunk(loc.digest, stored, loc.compression, loc.raw_length, loc.blob))
        assert await hydrated.control(host, "a") == {"path": None, "missing_chunks": 1}
        loc = locations[0]
        stored = await backend.read_range(loc.blob, loc.offset, loc.compressed_length)
        await cache.put(loc.digest, decode_chunk(loc.digest, stored, loc.compression, loc.raw_length, loc.blob))
        done = await hydrated.control(host, "a")
        assert done == {"path": hydrated.path_for(str(tmp_path), MANIFEST), "size": SIZE, "manifest": MANIFEST}
        with pytest.raises(NotFoundError):
            await hydrated.control(host, "nope")

    trio.run(scenario)


def test_no_file_past_the_budget(tmp_path):
    """``hydrated_max_bytes`` bounds the disk the files take: an image that does not fit is not
    built (and 0 turns hydration off). (Break-checked: without the budget check the file is built.)"""
    from lazyfs.config import Config
    from lazyfs.fetch.cache import ChunkCache
    from lazyfs.format.chunk import decode_chunk

    layers, backend, _ = make_stack(5)
    dev = MergedDevice(layers, CountingSource(backend))
    cache = ChunkCache(str(tmp_path / "chunks"), 1 << 30)
    att = _Host(device=dev, store=dev.store, opened=_Image(MANIFEST), ref="test/image", name="a", tasks=set())

    async def scenario():
        for loc in dev.index.locations():
            stored = await backend.read_range(loc.blob, loc.offset, loc.compressed_length)
            await cache.put(loc.digest, decode_chunk(loc.digest, stored, loc.compression, loc.raw_length, loc.blob))
        for limit in (SIZE - 4096, 0):
            host = _Host(config=Config(cache_root=str(tmp_path), hydrated_max_bytes=limit), cache=cache,
                         attachments={"a": att})
            assert await hydrated.hydrate_if_local(host, att) is None
        assert not os.path.exists(hydrated.path_for(str(tmp_path), MANIFEST))

    trio.run(scenario)


def test_build_locks_are_dropped_once_unused(tmp_path):
    """The per-manifest build locks do not outlive their builds: after hydrating 8 images, the
    host's lock map is empty. (Break-checked: without the ``del`` it held 8 locks and this failed.)"""
    from lazyfs.config import Config
    from lazyfs.fetch.cache import ChunkCache
    from lazyfs.format.chunk import decode_chunk

    layers, backend, _ = make_stack(4)
    dev = MergedDevice(layers, CountingSource(backend))
    cache = ChunkCache(str(tmp_path / "chunks"), 1 << 30)
    host = _Host(config=Config(cache_root=str(tmp_path), hydrated_max_bytes=1 << 30), cache=cache, attachments={})

    async def scenario():
        for loc in dev.index.locations():
            stored = await backend.read_range(loc.blob, loc.offset, loc.compressed_length)
            await cache.put(loc.digest, decode_chunk(loc.digest, stored, loc.compression, loc.raw_length, loc.blob))
        for i in range(8):
            manifest = "sha256:" + f"{i:02x}" * 32
            att = _Host(device=dev, store=dev.store, opened=_Image(manifest), ref=f"test/image{i}")
            assert await hydrated.hydrate_if_local(host, att) is not None
        assert hydrated._locks[host] == {}

    trio.run(scenario)


def test_a_bug_checking_one_image_is_logged_and_the_check_goes_on_to_the_next(tmp_path, monkeypatch, caplog):
    """The daemon's periodic check runs in the daemon's own nursery: an unexpected error checking
    one image (the AttributeError once seen there) is logged with its traceback, and the other
    images are still checked and hydrated; the daemon does not die of it.

    Broken on purpose once (no ``except Exception`` in ``check_once``): the AttributeError left
    check_once and this test went red.
    """
    from lazyfs.config import Config
    from lazyfs.fetch.cache import ChunkCache

    layers, backend, model = make_stack(3)
    cache = ChunkCache(str(tmp_path / "chunks"), 1 << 30)
    good = MergedDevice(layers, CountingSource(backend))
    other = "sha256:" + "cd" * 32
    atts = {name: _Host(device=good, store=good.store, opened=_Image(manifest), ref=f"test/{name}", name=name,
                        tasks=set()) for name, manifest in (("a", other), ("b", MANIFEST))}
    host = _Host(config=Config(cache_root=str(tmp_path)), cache=cache, attachments=atts)
    real = hydrated.hydrate_if_local

    async def hydrate_if_local(host, att):
        if att.name == "a":
            raise AttributeError("'NoneType' object has no attribute 'digest'")
        return await real(host, att)

    monkeypatch.setattr(hydrated, "hydrate_if_local", hydrate_if_local)
    monkeypatch.setattr(hydrated, "is_fully_local", lambda device, cache: True)  # b's chunks come from the store

    (built,) = trio.run(hydrated.check_once, host, set())
    assert built.manifest == MANIFEST
    with open(built.path, "rb") as f:
        assert f.read() == bytes(model)
    assert "unexpected error checking test/a" in caplog.text and "AttributeError" in caplog.text
