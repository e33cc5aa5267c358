from hypothesis import given, settings, strategies as st

from lazyfs.device.index import MergedIndex
from lazyfs.format.layer import BLOCK_SIZE
from tests.support.layers import build_blob

NBLOCKS = 48


@st.composite
def layer_specs(draw):
    """Per layer: data runs (block, count) and zeroed runs, non-overlapping."""
    layers = []
    for _ in range(draw(st.integers(1, 5))):
        used = set()
        writes, zeroed = [], []
        for _ in range(draw(st.integers(0, 6))):
            start = draw(st.integers(0, NBLOCKS - 1))
            count = draw(st.integers(1, 8))
            span = set(range(start, min(NBLOCKS, start + count)))
            if span & used:
                continue
            used |= span
            if draw(st.booleans()):
                writes.append((start, len(span)))
            else:
                zeroed.append((start, len(span)))
        layers.append((writes, zeroed))
    return layers


@given(layer_specs())
@settings(max_examples=150, deadline=None)
def test_merged_index_matches_top_down_resolution(specs):
    layers, expected = [], [None] * NBLOCKS  # expected[b] = (layer, tag) of the block's owner
    for li, (writes, zeroed) in enumerate(specs):
        data_writes = []
        for start, count in writes:
            data = b"".join((b"L%dB%d" % (li, b)).ljust(BLOCK_SIZE, b".") for b in range(start, start + count))
            data_writes.append((start, data))
        blob, digest, meta = build_blob(NBLOCKS * BLOCK_SIZE, data_writes, zeroed, chunk_size=4 * BLOCK_SIZE)
        layers.append((meta, digest))
        for start, count in writes:
            for b in range(start, start + count):
                expected[b] = (li, digest)
        for start, count in zeroed:
            for b in range(start, start + count):
                expected[b] = None
    index = MergedIndex(layers, NBLOCKS)
    got = [None] * NBLOCKS
    for seg in index.lookup(0, NBLOCKS):
        for b in range(seg.start, seg.end):
            got[b] = seg.loc.blob
    assert got == [e[1] if e else None for e in expected]
    # clipped lookups agree with the full one
    for start in range(0, NBLOCKS, 7):
        for seg in index.lookup(start, start + 5):
            assert start <= seg.start < seg.end <= start + 5
    assert all(seg.loc is not None for seg in index.segments)
