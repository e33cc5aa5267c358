"""The exception-group idiom where it matters (docs/errors.md).

The APIs that run tasks fail with the error itself, not with a group. The boundaries (cli.main,
the control socket) reduce a group that a library's nursery raises to one line or one reply.
"""

from __future__ import annotations

import os
import shutil

import pytest
import trio

from lazyfs import cli
from lazyfs.config import Config
from lazyfs.errors import FormatError, IntegrityError, NotFoundError
from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.direct import DirectChunkSource
from lazyfs.fetch.directory import DirectoryBackend
from lazyfs.fetch.scheduler import FetchScheduler
from lazyfs.format.oci import parse_manifest
from lazyfs.image.layout import OciLayout
from lazyfs.image.local import create_image, open_local
from lazyfs.image.ref import LocalRef
from lazyfs.nursery import open_nursery
from lazyfs.serve.control import call
from lazyfs.serve.controlserver import serve_control
from lazyfs.serve.host import Host

CHUNK = 64 << 10


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """A good image of random bytes, and copies with flipped metadata and a flipped first chunk."""
    tmp = tmp_path_factory.mktemp("error-paths")
    (tmp / "raw").write_bytes(os.urandom(1 << 20))
    good = LocalRef(str(tmp / "good"), "v1")
    trio.run(lambda: create_image(good, from_file=str(tmp / "raw"), chunk_size=CHUNK))
    out = {"good": good}
    for name in ("bad-meta", "bad-chunk"):
        shutil.copytree(tmp / "good", tmp / name)
        layout = OciLayout(str(tmp / name))
        layer = parse_manifest(layout.read_manifest("v1")[0]).layers[0]
        blob = layout.blob_path(layer.digest)
        data = bytearray(open(blob, "rb").read())
        data[layer.meta_offset + layer.meta_length // 2 if name == "bad-meta" else 40] ^= 0xFF
        os.chmod(blob, 0o644)
        with open(blob, "wb") as f:
            f.write(data)
        out[name] = LocalRef(str(tmp / name), "v1")
    return out


# ------------------------------------------------------------------ nursery owners raise the error itself


def test_load_image_raises_the_integrity_error_itself(layouts):
    with pytest.raises(IntegrityError, match="metadata of layer 0"):
        trio.run(open_local, layouts["bad-meta"])


def test_host_attach_raises_the_integrity_error_itself(layouts, tmp_path):
    config = Config(cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "w"), trace_replay=False,
                    trace_record_seconds=0)

    async def main():
        async with Host.open(config) as host:
            await host.attach(f"oci:{layouts['bad-meta'].path}:v1", "bad")

    with pytest.raises(IntegrityError, match="metadata of layer 0"):
        trio.run(main)


def test_a_read_over_several_chunks_raises_the_integrity_error_itself(layouts):
    async def main():
        image, layout = await open_local(layouts["bad-chunk"])
        device = image.device(DirectChunkSource(DirectoryBackend(layout.path)))
        await device.read(0, 4 * CHUNK)  # four chunks at once: the concurrent path

    with pytest.raises(IntegrityError, match="chunk"):
        trio.run(main)


def test_the_scheduler_and_host_let_the_body_error_through(tmp_path):
    async def scheduler_body():
        cache = await ChunkCache.load(str(tmp_path / "cache"), 1 << 20, 1 << 20)
        try:
            async with FetchScheduler.open([DirectoryBackend(str(tmp_path))], cache):
                raise NotFoundError("from the body")
        finally:
            await cache.aclose()

    with pytest.raises(NotFoundError, match="from the body"):
        trio.run(scheduler_body)

    async def host_body():
        async with Host.open(Config(cache_root=str(tmp_path / "cache2"), writable_root=str(tmp_path / "w"))):
            raise FormatError("from the host body")

    with pytest.raises(FormatError, match="from the host body"):
        trio.run(host_body)


# ------------------------------------------------------------------ boundaries reduce a library's group


@pytest.mark.parametrize("raised, code, expected", [
    (ExceptionGroup("lib", [IntegrityError("layer metadata", "aa", "bb")]), 1,
     "lazyfs: error: info oci:/x:v1: digest mismatch for layer metadata: expected aa, got bb"),
    (ExceptionGroup("lib", [ExceptionGroup("inner", [KeyError("k")]), NotFoundError("n")]), 1,
     "lazyfs: error: info oci:/x:v1: internal error: KeyError: 'k' (run with --debug for the traceback)"),
    (BaseExceptionGroup("lib", [KeyboardInterrupt(), NotFoundError("n")]), 130, ""),
])
def test_cli_main_turns_any_group_into_one_line(monkeypatch, capsys, raised, code, expected):
    def failing(args):
        raise raised

    monkeypatch.setattr(cli, "cmd_info", failing)
    assert cli.main(["info", "oci:/x:v1"]) == code
    captured = capsys.readouterr()
    assert captured.err.strip() == expected
    assert "sub-exception" not in captured.err and "Traceback" not in captured.err


def test_the_control_socket_replies_with_the_error_inside_a_group(tmp_path):
    socket_path = str(tmp_path / "control.sock")

    async def handle(op, args):
        async with trio.open_nursery() as nursery:  # a library's nursery: strict, it raises a group
            nursery.start_soon(trio.sleep_forever)
            raise NotFoundError(f"no image attached as {args['name']!r}")

    async def main():
        async with open_nursery() as nursery:
            await nursery.start(serve_control, socket_path, handle)
            try:
                await trio.to_thread.run_sync(lambda: call(socket_path, "detach", timeout=30, name="x"))
            finally:
                nursery.cancel_scope.cancel()

    with pytest.raises(NotFoundError, match="no image attached as 'x'"):
        trio.run(main)
