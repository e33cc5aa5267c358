"""Chained gzip spans through the fetch scheduler: a chained span is decoded with the verified tail of the
span before it, remembered from an earlier read or fetched in the same ranged read (docs/index.md)."""

from __future__ import annotations

import gzip
import io
import os
import random

import pytest
import trio

from lazyfs.device.chunks import Priority
from lazyfs.errors import FetchError
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.scheduler import FetchScheduler
from lazyfs.format.digest import sha256_digest
from lazyfs.format.spanindex import build_spans, decode_span_map, encode_span_map
from tests.fetch.test_scheduler import Probe, run, settle

SPAN = 64 << 10


def _text(seed: int, size: int) -> bytes:
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randint(2, 9)).hex() for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        out += " ".join(rnd.choice(words) for _ in range(200)).encode() + b"\n"
    return bytes(out[:size])


def _layer(root, size: int = 1_000_000):
    """A gzip layer in an OCI layout under *root*, and its span map (64 KiB spans, one stored window)."""
    data = _text(1, size)
    blob = gzip.compress(data, 6)
    name = sha256_digest(blob)
    path = root / "blobs" / "sha256" / name[7:]
    path.parent.mkdir(parents=True)
    path.write_bytes(blob)
    built = build_spans(io.BytesIO(blob), "gzip", len(blob), lambda b: None, span_size=SPAN, window_spacing=1 << 20)
    spans = built.span_map(name, ()).spans
    assert spans[0].prev is None and all(s.prev is not None for s in spans[1:])  # one member, < 1 MiB apart
    return data, name, spans


def _raw(data: bytes, span) -> bytes:
    return data[span.tar_offset:span.tar_offset + span.raw_length]


def test_a_cold_chained_span_is_read_with_its_chain_in_one_read_then_each_next_span_alone(tmp_path):
    data, blob, spans = _layer(tmp_path / "oci")
    probe = Probe(DirectoryBackend(tmp_path / "oci"))

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert await sched.get(spans[3]) == _raw(data, spans[3])
            # spans 0..2 are fetched and decoded with it (their tails make its window), in one ranged read
            assert probe.calls == [(blob, spans[0].offset, spans[3].end - spans[0].offset)]
            st = sched.statistics()
            assert st["chain_spans"] == 3 and st["ranged_gets"] == 1 and st["integrity_failures"] == 0
            assert all(sched.is_cached(s.digest) for s in spans[:4])  # verified, so cached too
            assert await sched.get(spans[2]) == _raw(data, spans[2])
            assert len(probe.calls) == 1
            # span 4's window is span 3's remembered tail: only its own bytes are read
            assert await sched.get(spans[4]) == _raw(data, spans[4])
            assert probe.calls[1] == (blob, spans[4].offset, spans[4].compressed_length)
            assert sched.statistics()["chain_spans"] == 3

    run(main)


def test_a_chain_span_corrupted_by_a_mirror_fails_the_read_over_to_the_origin(tmp_path):
    """A flipped byte in a span the chain needs (not in the span asked for): the asked span cannot be
    checked either, so it is not served from that mirror; the origin serves both."""
    data, blob, spans = _layer(tmp_path / "oci")
    bad = Probe(DirectoryBackend(tmp_path / "oci"), "bad-mirror")
    bad.corrupt.add(spans[1].offset + spans[1].compressed_length // 2)
    good = Probe(DirectoryBackend(tmp_path / "oci"), "origin")

    async def main():
        async with FetchScheduler.open([bad, good], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert await sched.get(spans[2]) == _raw(data, spans[2])
            st = sched.statistics()
            assert st["integrity_failures"] >= 1 and st["failovers"] >= 1
            assert good.calls, "the origin must have served the chain"
            assert await sched.get(spans[1]) == _raw(data, spans[1])

    run(main)


def test_remembered_tails_are_bounded_and_a_forgotten_one_is_fetched_again(tmp_path):
    data, blob, spans = _layer(tmp_path / "oci")
    probe = Probe(DirectoryBackend(tmp_path / "oci"))

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            sched.max_tails = 2
            for span in spans[:8]:
                assert await sched.get(span) == _raw(data, span)
            assert sched.statistics()["span_tails"] == 2
            assert sched.statistics()["chain_spans"] == 0  # read in order: every window was remembered
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache2", 1 << 30)) as sched:
            # a new scheduler remembers nothing: the chain back to the stored window comes along
            assert await sched.get(spans[6]) == _raw(data, spans[6])
            assert sched.statistics()["chain_spans"] == 6

    run(main)


def test_after_a_restart_the_tail_comes_from_the_cache_not_the_network(tmp_path):
    data, blob, spans = _layer(tmp_path / "oci")
    probe = Probe(DirectoryBackend(tmp_path / "oci"))

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert await sched.get(spans[2]) == _raw(data, spans[2])
            await settle(sched.cache)
        before = len(probe.calls)
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert sched.statistics()["span_tails"] == 0
            assert await sched.get(spans[3]) == _raw(data, spans[3])
            assert probe.calls[before:] == [(blob, spans[3].offset, spans[3].compressed_length)]
            assert sched.statistics()["chain_spans"] == 0

    run(main)


def test_readahead_of_the_next_span_waits_for_the_running_read_of_the_one_before(tmp_path):
    """Readahead queues the spans after a demand miss while the miss is being fetched: their window is the
    missed span's tail, so they wait for that running read rather than fetch it again."""
    data, blob, spans = _layer(tmp_path / "oci")
    probe = Probe(DirectoryBackend(tmp_path / "oci"))
    probe.gate = trio.Event()

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sched.get, spans[0])
                await probe.wait_calls(1)  # the demand read is running (held at the gate)
                sched.prefetch(spans[1:3], Priority.READAHEAD)
                await trio.sleep(0.05)
                probe.gate.set()
            for span in spans[:3]:
                assert await sched.get(span) == _raw(data, span)
            assert probe.calls[0] == (blob, spans[0].offset, spans[0].compressed_length)
            assert sorted(probe.calls[1:]) == [(blob, spans[1].offset, spans[2].end - spans[1].offset)]
            assert sched.statistics()["chain_spans"] == 0

    run(main)


def _indexed_layer(root):
    """A gzip layer and its span map blob (version 3: windows stored before the document) in one layout,
    with 64 KiB spans and a stored window every 256 KiB; the spans as a mount reads them from the map."""
    data = _text(2, 2_000_000)
    blob = gzip.compress(data, 6)
    name = sha256_digest(blob)
    built = build_spans(io.BytesIO(blob), "gzip", len(blob), lambda b: None, span_size=SPAN,
                        window_spacing=256 << 10)
    stored = encode_span_map(built.span_map(name, ()))
    map_name = sha256_digest(stored.data)
    for digest, content in ((name, blob), (map_name, stored.data)):
        path = root / "blobs" / "sha256" / digest[7:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    m = decode_span_map(stored.doc, blob=map_name, windows_end=len(stored.data) - stored.doc_length)
    with_window = [i for i, s in enumerate(m.spans) if s.window_at is not None]
    assert len(with_window) >= 3
    return data, name, map_name, m.spans, with_window


def test_a_span_with_a_stored_window_reads_the_window_alongside_and_once(tmp_path):
    """The mount reads a span map's document only; a span whose window is stored reads it from the map blob
    with its own range (both verified), and the chained span after it needs no window read."""
    data, blob, map_blob, spans, with_window = _indexed_layer(tmp_path / "oci")
    i = with_window[1]
    probe = Probe(DirectoryBackend(tmp_path / "oci"))

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert await sched.get(spans[i]) == _raw(data, spans[i])
            w = spans[i].window_at
            assert sorted(probe.calls) == sorted([(blob, spans[i].offset, spans[i].compressed_length),
                                                  (map_blob, w.offset, w.compressed_length)])
            assert sched.statistics()["window_reads"] == 1 and sched.statistics()["chain_spans"] == 0
            assert spans[i + 1].prev is spans[i]
            assert await sched.get(spans[i + 1]) == _raw(data, spans[i + 1])
            assert probe.calls[2:] == [(blob, spans[i + 1].offset, spans[i + 1].compressed_length)]
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache2", 1 << 30)) as sched:
            # a cold chained span: its chain back to the stored window, and that window, in two reads
            j = with_window[2] - 1
            assert spans[j].prev is not None
            assert await sched.get(spans[j]) == _raw(data, spans[j])
            st = sched.statistics()
            assert st["window_reads"] == 1 and st["chain_spans"] == j - with_window[1] and st["ranged_gets"] == 2

    run(main)


def test_a_window_corrupted_by_a_mirror_is_refused_and_read_from_the_origin(tmp_path):
    data, blob, map_blob, spans, with_window = _indexed_layer(tmp_path / "oci")
    i = with_window[-1]
    w = spans[i].window_at
    bad = Probe(DirectoryBackend(tmp_path / "oci"), "bad-mirror")
    flip = w.offset + w.compressed_length // 2
    assert not spans[i].offset <= flip < spans[i].end  # Probe flips an offset in any blob it reads
    bad.corrupt.add(flip)
    good = Probe(DirectoryBackend(tmp_path / "oci"), "origin")

    async def main():
        async with FetchScheduler.open([bad, good], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert await sched.get(spans[i]) == _raw(data, spans[i])
            st = sched.statistics()
            assert st["integrity_failures"] == 1 and st["window_reads"] == 2
            assert (map_blob, w.offset, w.compressed_length) in good.calls
            # the span's own bytes were good: they came from the mirror, with the origin's window
            assert (blob, spans[i].offset, spans[i].compressed_length) in bad.calls
            assert (blob, spans[i].offset, spans[i].compressed_length) not in good.calls

    run(main)


def test_windows_come_from_the_span_map_blobs_backends_and_a_missing_one_blames_no_source(tmp_path):
    """A backend that serves the layer but not the span map blob (another repository with the same layer):
    the window is read from the next backend, and the span from the first, with no integrity failure.
    When no backend has the window, the span fails with a FetchError and no source is blamed."""
    data, blob, map_blob, spans, with_window = _indexed_layer(tmp_path / "oci")
    i = with_window[1]
    (tmp_path / "layer-only" / "blobs" / "sha256").mkdir(parents=True)
    os.link(tmp_path / "oci" / "blobs" / "sha256" / blob[7:], tmp_path / "layer-only" / "blobs" / "sha256" / blob[7:])
    other = Probe(DirectoryBackend(tmp_path / "layer-only"), "other-repo")
    origin = Probe(DirectoryBackend(tmp_path / "oci"), "origin")

    async def main():
        async with FetchScheduler.open([other, origin], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert await sched.get(spans[i]) == _raw(data, spans[i])
            st = sched.statistics()
            assert st["integrity_failures"] == 0 and st["failovers"] == 0 and st["window_reads"] == 1
            assert (blob, spans[i].offset, spans[i].compressed_length) in other.calls
        async with FetchScheduler.open([other], ChunkCache(tmp_path / "cache2", 1 << 30)) as sched:
            with pytest.raises(FetchError, match="stored window"):
                await sched.get(spans[with_window[2]])
            assert sched.statistics()["integrity_failures"] == 0

    run(main)


def test_a_stored_window_read_once_serves_every_span_that_shares_its_checkpoint(tmp_path):
    """A deflate block longer than 4 spans is cut into pieces decoded from one checkpoint (with skips): they
    share its stored window, which is read once and then remembered."""
    rnd = random.Random(3)
    text = " ".join(str(rnd.randint(0, 999)) for _ in range(25_000)).encode()
    data = text + text[-1000:] * 3000 + rnd.randbytes(100_000)  # a long block that refers back into *text*
    blob = gzip.compress(data, 6)
    name = sha256_digest(blob)
    built = build_spans(io.BytesIO(blob), "gzip", len(blob), lambda b: None, span_size=SPAN, window_spacing=1)
    stored = encode_span_map(built.span_map(name, ()))
    map_name = sha256_digest(stored.data)
    root = tmp_path / "oci" / "blobs" / "sha256"
    root.mkdir(parents=True)
    (root / name[7:]).write_bytes(blob)
    (root / map_name[7:]).write_bytes(stored.data)
    spans = decode_span_map(stored.doc, blob=map_name, windows_end=len(stored.data) - stored.doc_length).spans
    shared = [s for s in spans if s.skip > 0 and s.window_at is not None]
    first = next(s for s in spans if s.window_at == shared[0].window_at and s is not shared[0])
    probe = Probe(DirectoryBackend(tmp_path / "oci"))

    async def main():
        async with FetchScheduler.open([probe], ChunkCache(tmp_path / "cache", 1 << 30)) as sched:
            assert await sched.get(first) == _raw(data, first)
            assert await sched.get(shared[0]) == _raw(data, shared[0])
            assert sched.statistics()["window_reads"] == 1

    run(main)
