"""A registry stalled on one image does not hold up attaches, reads or snapshotter calls of another (issue 13, "Stalls").

Two images in one real docker-registry, reached through the fault proxy, attached to one Host
(the daemon's runtime). Image A's requests are stalled; image B must be attached and read
whole while A still waits. Nothing is timed: each test records the order in which things
complete. A stall lasts STALL seconds at most (a stand-in for the fetch deadline), so a broken
guarantee makes B finish after A and the order comes out wrong, rather than hanging the test.
"""

import random
import threading
import time

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.errors import AlreadyExistsError
from lazyfs.format.oci import parse_manifest
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image
from lazyfs.image.commit import commit_writable
from lazyfs.image.layout import OciLayout
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.serve.host import Host, _Unrouted
from lazyfs.serve.snapshotter.core import Snapshotter
from lazyfs.serve.snapshotter.lazy import LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_SNAPSHOT_REF
from lazyfs.serve.snapshotter.table import LAZYFS
from tests.support.proxy import FaultProxy

pytestmark = [pytest.mark.registry, pytest.mark.slow]
STALL = 8.0  # seconds a stalled response is held unless released earlier (below the 10 s attempt timeout)
SIZE = 2 << 20


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    """Two raw images of different random bytes, pushed as nb/a and nb/b; their references."""
    tmp = tmp_path_factory.mktemp("stalls")

    async def make():
        config = Config(registries=(RegistrySettings(registry.registry, plain_http=True),))
        async with ImageOpener(config) as opener:
            for name in ("a", "b"):
                raw = tmp / f"{name}.raw"
                raw.write_bytes(random.Random(name).randbytes(SIZE))
                local = LocalRef(str(tmp / f"layout-{name}"), "v1")
                await create_image(local, from_file=str(raw), chunk_size=64 << 10)
                await push_image(opener, local, parse_reference(f"{registry.registry}/nb/{name}:v1"))

    trio.run(make)
    return tmp


@pytest.fixture
def proxy(registry):
    with FaultProxy.running_in_thread(registry.port) as proxy:
        yield proxy


def _config(tmp_path, proxy) -> Config:
    host = proxy.url.split("://", 1)[1].rstrip("/")
    return Config(cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "writable"),
                  registries=(RegistrySettings(host, plain_http=True),), trace_replay=False,
                  trace_record_seconds=0, background_download=False, fetch_deadline=4 * STALL)


def _ref(proxy, name):
    return f"{proxy.url.split('://', 1)[1].rstrip('/')}/nb/{name}:v1"


async def _until(condition, what: str) -> None:
    for _ in range(3000):  # bounded: 30 s at most
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def _read_all(device) -> int:
    n = 0
    for offset in range(0, device.size, 256 << 10):
        n += len(await device.read(offset, 256 << 10))
    return n


def test_attach_of_another_image_is_not_held_by_a_stalled_one(images, proxy, tmp_path):
    """B is attached and read whole while A's attach waits on its stalled manifest.

    Broken on purpose once: with ``Host.attach`` holding one host-wide lock across
    ``opener.open`` (as before), B's attach waited for A and the order was ["a", "b"].
    """
    proxy.faults.stall(STALL, path="/v2/nb/a/")

    async def main():
        async with Host.open(_config(tmp_path, proxy)) as host:
            order = []

            async def attach_a():
                await host.attach(_ref(proxy, "a"), "a")
                order.append("a")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attach_a)
                await _until(lambda: proxy.count(path="/v2/nb/a/") >= 1, "A's stalled request")
                att = await host.attach(_ref(proxy, "b"), "b")
                assert await _read_all(att.device) == SIZE
                order.append("b")
                proxy.faults.clear()
            assert order == ["b", "a"]
            assert set(host.attachments) == {"a", "b"}

    trio.run(main)


def test_reads_of_another_image_are_not_held_by_a_stalled_fetch(images, proxy, tmp_path):
    """With A's blob reads stalled and a reader of A waiting on a chunk miss, B (cold, from the
    same registry client and scheduler) is read whole, and a third image attaches.

    Broken on purpose once: with one host-wide trio.Lock taken around every chunk fetch in
    ``AttachmentReader.get``, B's reads waited for A's and the order was ["a", "b"].
    """
    async def main():
        async with Host.open(_config(tmp_path, proxy)) as host:
            a = await host.attach(_ref(proxy, "a"), "a")
            b = await host.attach(_ref(proxy, "b"), "b")
            proxy.faults.stall(STALL, path="/v2/nb/a/blobs/")
            before = proxy.count(path="/v2/nb/a/blobs/")
            order = []

            async def read_a():
                await a.device.read(0, 4096)
                order.append("a")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_a)
                await _until(lambda: proxy.count(path="/v2/nb/a/blobs/") > before, "A's stalled chunk read")
                assert await _read_all(b.device) == SIZE
                await host.attach(_ref(proxy, "b"), "b-again")
                order.append("b")
                proxy.faults.clear()
            assert order == ["b", "a"]
            assert b.store.statistics()["demand_misses"] > 0  # B really went to the registry

    trio.run(main)


def test_slow_disk_write_does_not_stop_reads_of_another_image(images, proxy, tmp_path):
    """A's writable layer has a pwrite that hangs (a hook in the worker thread); B, cold, is read
    whole from the registry meanwhile.

    Broken on purpose once: with ``MergedDevice.write`` calling ``layer.write_blocks`` on the
    event loop (as before), every read waited for the hook and the order was ["a", "b"].
    """
    async def main():
        async with Host.open(_config(tmp_path, proxy)) as host:
            a = await host.attach(_ref(proxy, "a"), "a", writable=True)
            b = await host.attach(_ref(proxy, "b"), "b")
            entered, go = threading.Event(), threading.Event()
            real = a.device.writable._write_data

            def hanging_pwrite(data, offset):
                entered.set()
                go.wait(STALL)
                real(data, offset)

            a.device.writable._write_data = hanging_pwrite
            order = []

            async def write_a():
                await a.device.write(0, b"w" * 4096)
                order.append("a")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_a)
                await trio.to_thread.run_sync(entered.wait, STALL)
                assert await _read_all(b.device) == SIZE
                order.append("b")
                go.set()
            assert order == ["b", "a"]
            assert await a.device.read(0, 4096) == b"w" * 4096

    trio.run(main)


def test_routes_stay_bounded_across_reattaches(images, proxy, tmp_path):
    """Attaching an image again and again keeps one route per blob, not one per attach; a
    blob of no attached image has no route left.

    Broken on purpose once: without ``Host._unroute`` at detach, every attach added one more
    backend (2 at the second attach) and this failed.
    """
    async def main():
        async with Host.open(_config(tmp_path, proxy)) as host:
            for i in range(6):
                att = await host.attach(_ref(proxy, "a"), "a")
                blobs = att.opened.blobs
                assert all(len(host.scheduler.backends_for(blob)) == 1 for blob in blobs)
                await host.detach("a")
            assert all(isinstance(b, _Unrouted) for blob in blobs for b in host.scheduler.backends_for(blob))
            one = await host.attach(_ref(proxy, "a"), "one")
            await host.attach(_ref(proxy, "a"), "two")
            assert all(len(host.scheduler.backends_for(blob)) == 2 for blob in blobs)
            await host.detach("two")
            assert all(host.scheduler.backends_for(blob) == tuple(one.opened.backends) for blob in blobs)
            assert await _read_all(one.device) == SIZE  # still routed to a live backend

    trio.run(main)


def _layer_labels(images, proxy, name: str) -> dict:
    """The labels containerd puts on the Prepare of image *name*'s (only) layer."""
    manifest = parse_manifest(OciLayout(str(images / f"layout-{name}")).read_manifest("v1")[0])
    return {LABEL_SNAPSHOT_REF: f"chain-{name}", LABEL_IMAGE_REF: _ref(proxy, name),
            LABEL_LAYER_DIGEST: manifest.layers[0].digest}


def test_snapshotter_calls_for_another_image_are_not_held_by_a_stalled_one(images, proxy, tmp_path, monkeypatch):
    """A Prepare whose remote layer's registry stalls (A) holds up neither B's remote layer nor
    ordinary snapshots; every registry call goes through the process's one trio loop (a
    ``trio.run`` per call would fail here).

    Broken on purpose once: with the table lock held across ``self.images.find`` (the old
    RLock around registry calls), B's Prepare waited for A's and the order was ["a", "b"].
    """
    proxy.faults.stall(STALL, path="/v2/nb/a/")
    sn = Snapshotter(str(tmp_path / "root"), str(tmp_path / "writable"), _config(tmp_path, proxy))
    try:
        def no_new_loop(*args, **kwargs):
            raise AssertionError("trio.run called for a snapshotter request")

        monkeypatch.setattr(trio, "run", no_new_loop)
        order, errors = [], []

        def prepare_a():
            try:
                sn.prepare("extract-a", "", _layer_labels(images, proxy, "a"))
            except AlreadyExistsError:  # what containerd is told when a remote layer was registered
                order.append("a")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=prepare_a)
        thread.start()
        for _ in range(3000):  # bounded: 30 s at most
            if proxy.count(path="/v2/nb/a/") >= 1:
                break
            time.sleep(0.01)
        with pytest.raises(AlreadyExistsError):
            sn.prepare("extract-b", "", _layer_labels(images, proxy, "b"))
        sn.prepare("plain", "", {})
        sn.commit("plain-committed", "plain", {})
        assert sn.stat("chain-b").backend == LAZYFS
        order.append("b")
        proxy.faults.clear()
        thread.join(4 * STALL)
        assert not errors
        assert order == ["b", "a"]
        assert sn.stat("chain-a").backend == LAZYFS
        assert sn.portal.calls >= 2  # A's and B's manifests at least, on the one loop
    finally:
        monkeypatch.undo()
        sn.close()


def test_a_commit_pushing_to_a_stalled_registry_does_not_hold_writes(images, proxy, tmp_path):
    """While a commit of A's writable layer waits on its stalled push, A takes writes and
    flushes; the commit still pushes what the layer held when it was read out.

    Broken on purpose once: with ``writes_held`` around the whole commit (as the daemon did),
    the write waited for the push and the order was ["commit", "write"].
    """
    async def main():
        async with Host.open(_config(tmp_path, proxy)) as host:
            a = await host.attach(_ref(proxy, "a"), "a", writable=True)
            await a.device.write(0, b"1" * 4096)
            proxy.faults.stall(STALL, path="/v2/nb/committed/")
            before = proxy.count(path="/v2/nb/committed/")
            order, result = [], {}

            async def commit():
                result.update(await commit_writable(host.opener, a.opened, a.device.writable,
                                                    _ref(proxy, "committed"), hold=a.device.writes_held))
                order.append("commit")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(commit)
                await _until(lambda: proxy.count(path="/v2/nb/committed/") > before, "the stalled push")
                await a.device.write(0, b"2" * 4096)
                await a.device.flush()
                order.append("write")
                proxy.faults.clear()
            assert order == ["write", "commit"]
            assert await a.device.read(0, 4096) == b"2" * 4096
            committed = await host.attach(result["image"], "committed")
            assert await committed.device.read(0, 4096) == b"1" * 4096  # the layer as read out

    trio.run(main)
