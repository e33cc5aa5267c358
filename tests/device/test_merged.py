import pytest
import trio
from hypothesis import given, settings, strategies as st

from lazyfs.device.merged import MAX_LAYERS, MergedDevice
from lazyfs.device.writable import create_writable
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.layer import BLOCK_SIZE
from tests.support.conformance import check_source
from tests.support.layers import MemoryBackend, build_blob, make_stack
from tests.support.sources import CountingSource

from tests.support.layers import STACK_SIZE as SIZE


@pytest.mark.parametrize("seed", range(6))
def test_read_only_stack_conformance(seed):
    async def make():
        layers, backend, model = make_stack(seed)
        return MergedDevice(layers, CountingSource(backend)), bytes(model)

    trio.run(check_source, make, seed)


@pytest.mark.parametrize("kind", ["sparse", "log"])
@pytest.mark.parametrize("seed", range(4))
def test_writable_stack_conformance(tmp_path, kind, seed):
    async def make():
        layers, backend, model = make_stack(seed)
        writable = create_writable(str(tmp_path / f"w{seed}"), kind, SIZE)
        return MergedDevice(layers, CountingSource(backend), writable), bytes(model)

    trio.run(check_source, make, seed)


def test_read_fetches_only_needed_chunks():
    data = bytes(range(256)) * (8 * BLOCK_SIZE // 256)
    blob, digest, meta = build_blob(SIZE, [(0, data), (40, data)], chunk_size=4 * BLOCK_SIZE)
    store = CountingSource(MemoryBackend({digest: blob}))
    dev = MergedDevice([(meta, digest)], store)
    assert trio.run(dev.read, 41 * BLOCK_SIZE + 5, 10) == data[BLOCK_SIZE + 5 : BLOCK_SIZE + 15]
    assert len(store.gets) == 1
    assert trio.run(dev.read, 20 * BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)  # a hole: no fetch
    assert len(store.gets) == 1


def test_corrupt_chunk_raises_integrity_error():
    blob, digest, meta = build_blob(SIZE, [(0, b"x" * BLOCK_SIZE * 3)], chunk_size=4 * BLOCK_SIZE)
    bad = bytearray(blob)
    bad[meta.chunks[0].offset] ^= 1
    dev = MergedDevice([(meta, digest)], CountingSource(MemoryBackend({digest: bytes(bad)})))
    with pytest.raises(IntegrityError):
        trio.run(dev.read, 0, 100)


def test_too_many_layers_rejected():
    blob, digest, meta = build_blob(SIZE, [(0, b"x" * BLOCK_SIZE)])
    with pytest.raises(FormatError):
        MergedDevice([(meta, digest)] * (MAX_LAYERS + 1), CountingSource(MemoryBackend({digest: blob})))


@given(st.integers(0, 10_000), st.integers(1, 8))
@settings(max_examples=40, deadline=None)
def test_stacks_read_like_the_model(seed, nlayers):
    layers, backend, model = make_stack(seed, nlayers)
    dev = MergedDevice(layers, CountingSource(backend))
    assert trio.run(dev.read, 0, SIZE) == model
