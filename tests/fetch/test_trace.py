"""Startup traces: recording, the msgpack wire form, replay into the cache."""

from __future__ import annotations

import random
from pathlib import Path

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.device.chunks import ChunkLocation, Priority
from lazyfs.errors import ConfigError, FormatError
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.scheduler import FetchScheduler
from lazyfs.fetch.trace import SPAN_ENTRY, RecordingChunkSource, TraceRecorder, decode_trace, encode_trace, replay
from lazyfs.format.spanindex import SpanLocation
from lazyfs.format.chunk import MAX_CHUNK_SIZE
from tests.support.layers import write_frames_blob

K = 1024

locations = st.builds(
    ChunkLocation,
    digest=st.binary(min_size=32, max_size=32),
    blob=st.sampled_from(["sha256:" + c * 64 for c in "0af"] + ["sha512:" + "e" * 128]),
    offset=st.integers(0, 1 << 40),
    compressed_length=st.integers(1, MAX_CHUNK_SIZE),
    raw_length=st.integers(1, MAX_CHUNK_SIZE),
    compression=st.sampled_from([0, 1]),
)


def sample(n: int = 0) -> ChunkLocation:
    return ChunkLocation(bytes([n]) * 32, "sha256:" + "a" * 64, n * 100, 100, 200, 1)


# ---------------------------------------------------------------- wire form


@given(st.lists(locations, max_size=50))
def test_trace_round_trip_keeps_order(locs):
    assert decode_trace(encode_trace(locs)) == tuple(locs)


def test_trace_is_compact():
    locs = [ChunkLocation(bytes([i % 256, i // 256]) * 16, "sha256:" + "b" * 64, i << 18, 90_000, 1 << 18, 1) for i in range(1000)]
    data = encode_trace(locs)
    assert len(data) < 60 * 1000  # the blob name is stored once


@given(st.binary(max_size=300))
def test_garbage_is_a_format_error(data):
    try:
        decoded = decode_trace(data)
    except FormatError:
        return
    assert decoded == ()  # only a (vanishingly unlikely) valid empty trace may decode


def _doc(**override):
    doc = {
        "format": "lazyfs-trace",
        "version": 1,
        "blobs": ["sha256:" + "a" * 64],
        "chunks": [[b"\1" * 32, 0, 0, 100, 200, 1]],
    }
    doc.update(override)
    return msgpack.packb(doc, use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x93\x01\x02",  # a list, not a map
        msgpack.packb({"format": "lazyfs-trace", "version": 1}, use_bin_type=True)[:-3],  # truncated
        _doc(format="something-else"),
        _doc(version=3),
        _doc(chunks=[[b"\1" * 32, 0, 0, 100, 200, 255]]),  # a span entry in a version-1 trace
        _doc(version=2, chunks=[[b"\1" * 32, 0, 0, 100, (16 << 20) + 1, 255]]),  # span longer than MAX_SPAN
        _doc(version=2, chunks=[[b"\1" * 32, 0, 0, 0, 200, 255]]),  # span with an empty range
        _doc(blobs=["../../etc/passwd"]),
        _doc(blobs="sha256:" + "a" * 64),
        _doc(chunks={}),
        _doc(chunks=[[b"\1" * 31, 0, 0, 100, 200, 1]]),  # short digest
        _doc(chunks=[[b"\1" * 32, 1, 0, 100, 200, 1]]),  # blob index out of range
        _doc(chunks=[[b"\1" * 32, 0, -1, 100, 200, 1]]),  # negative offset
        _doc(chunks=[[b"\1" * 32, 0, 0, 0, 200, 1]]),  # empty frame
        _doc(chunks=[[b"\1" * 32, 0, 0, 100, MAX_CHUNK_SIZE + 1, 1]]),  # absurd raw length
        _doc(chunks=[[b"\1" * 32, 0, 0, 100, 200, 7]]),  # unknown compression
        _doc(chunks=[[b"\1" * 32, True, 0, 100, 200, 1]]),  # bool is not an index
        _doc(chunks=[[b"\1" * 32, 0, 0, 100, 200]]),  # 5 fields
        _doc(chunks=[["x" * 32, 0, 0, 100, 200, 1]]),  # str digest
        _doc() + b"\x00",  # trailing bytes
    ],
)
def test_malformed_traces_are_rejected(data):
    with pytest.raises(FormatError):
        decode_trace(data)


def test_entry_limit():
    data = encode_trace([sample(i) for i in range(10)])
    assert len(decode_trace(data, max_entries=10)) == 10
    with pytest.raises(FormatError, match=r"^trace: 10 chunks \(at most 9\)$"):
        decode_trace(data, max_entries=9)


# ---------------------------------------------------------------- recording


def test_recorder_keeps_first_access_order_once_per_digest_and_is_bounded():
    rec = TraceRecorder(max_entries=3)
    for n in [1, 2, 1, 3, 2, 4, 5]:
        rec.record(sample(n))
    assert rec.locations == (sample(1), sample(2), sample(3)) and rec.full
    assert decode_trace(rec.encode()) == rec.locations
    rec2 = TraceRecorder()
    rec2.record(sample(1))
    rec2.stop()
    rec2.record(sample(2))
    assert len(rec2) == 1
    with pytest.raises(ConfigError):
        TraceRecorder(0)


# ---------------------------------------------------------------- replay against real blobs


class CountingBackend(Backend):
    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = "counting"
        self.calls: list[tuple[str, int, int]] = []

    async def read_range(self, blob: str, offset: int, length: int) -> bytes:
        self.calls.append((blob, offset, length))
        return await self.inner.read_range(blob, offset, length)

    async def blob_size(self, blob: str) -> int:
        return await self.inner.blob_size(blob)


def write_blob(root: Path, raws: list[bytes]) -> list[ChunkLocation]:
    return write_frames_blob(root, raws)[1]


def test_record_then_replay_turns_later_reads_into_hits(tmp_path):
    raws = [random.Random(i).randbytes(16 * K) + bytes(48 * K) for i in range(40)]
    locs = write_blob(tmp_path / "oci", raws)
    startup = [locs[i] for i in (7, 3, 30, 31, 32, 12, 3, 7, 39, 0)]  # a "startup" access pattern

    async def main():
        with trio.fail_after(60):
            # First boot: record what the reader touches (through the ChunkSource wrapper).
            first = CountingBackend(DirectoryBackend(tmp_path / "oci"))
            recorder = TraceRecorder()
            async with FetchScheduler.open([first], ChunkCache(tmp_path / "host1", 1 << 30)) as sched:
                store = RecordingChunkSource(sched, recorder)
                for loc in startup:
                    assert await store.get(loc) == raws[locs.index(loc)]
                await store.get(locs[20], Priority.READAHEAD)  # not a demand read: not traced
            trace_bytes = recorder.encode()

            # Another host, empty cache: replay the trace, then boot.
            second = CountingBackend(DirectoryBackend(tmp_path / "oci"))
            trace = decode_trace(trace_bytes)
            assert [locs.index(loc) for loc in trace] == [7, 3, 30, 31, 32, 12, 39, 0]
            async with FetchScheduler.open([second], ChunkCache(tmp_path / "host2", 1 << 30)) as sched:
                result = await replay(sched, trace, concurrency=4)
                assert result == {"chunks": 8, "failed": 0}
                replay_reads = len(second.calls)
                assert 1 <= replay_reads <= 8
                for loc in startup:
                    assert await sched.get(loc) == raws[locs.index(loc)]
                assert len(second.calls) == replay_reads  # zero backend reads during the boot
                assert sched.statistics()["planner"]["queued_by_priority"]["trace"] == 0

    trio.run(main)


def test_replay_counts_failures_without_raising(tmp_path):
    locs = write_blob(tmp_path / "oci", [b"\7" * 8192, b"\\8" * 8192])
    missing = ChunkLocation(b"\\9" * 32, "sha256:" + "d" * 64, 0, 10, 10, 0)

    async def main():
        with trio.fail_after(60):
            backend = DirectoryBackend(tmp_path / "oci")
            async with FetchScheduler.open([backend], ChunkCache(None, 0, 1 << 20), backoff_base=0.001) as sched:
                result = await replay(sched, [locs[0], missing, locs[1]])
                assert result == {"chunks": 2, "failed": 1}
                with pytest.raises(ConfigError):
                    await replay(sched, [], concurrency=0)

    trio.run(main)


def test_spans_are_recorded_and_written_as_span_entries_of_a_version_2_trace():
    """A span (an indexed image's read) is recorded like a chunk and written as a span entry: which
    span (digest, blob, range, length), never how to decode it; a trace without spans stays version 1."""
    span = SpanLocation(b"\7" * 32, "sha256:" + "b" * 64, 1000, 5000, 1 << 20, 0, 4096, 12, 3, b"window")
    recorder = TraceRecorder()
    recorder.record(sample(1))
    recorder.record(span)
    recorder.record(span)
    assert recorder.locations == (sample(1), span)
    data = recorder.encode()
    assert msgpack.unpackb(data)["version"] == 2
    assert b"window" not in data
    decoded = decode_trace(data)
    assert decoded[0] == sample(1)
    assert decoded[1] == ChunkLocation(span.digest, span.blob, 1000, 5000, 1 << 20, SPAN_ENTRY)
    assert encode_trace(decoded) == data  # placeholders write back as span entries
    assert msgpack.unpackb(encode_trace([sample(1)]))["version"] == 1
