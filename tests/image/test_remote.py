"""Remote images against a real docker-registry, through a fault-injecting proxy."""

import dataclasses
import os
import random

import pytest
import trio
import trio.testing

from lazyfs.config import Config, RegistrySettings
from lazyfs.errors import FetchError, IntegrityError
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image, flatten_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.referrers import add_referrer_remote
from lazyfs.image.remote import ImageOpener, pull_image, push_image
from lazyfs.image.traces import ANN_TRACE_BLOB, ANN_TRACE_CHUNKS, ARTIFACT_TYPE as TRACE_TYPE
from lazyfs.serve.host import Host
from tests.support.proxy import FaultProxy
from tests.support.registry import registry_fixture

pytestmark = pytest.mark.registry
registry = registry_fixture()
CHUNK = 64 << 10


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    """A two-layer image pushed to the registry; returns (local ref, flattened bytes, registry ref)."""
    tmp = tmp_path_factory.mktemp("image")
    rng = random.Random(5)
    base = bytearray(rng.randbytes(4 << 20) + bytes(2 << 20))
    (tmp / "base.img").write_bytes(base)
    v1 = LocalRef(str(tmp / "layout"), "v1")
    trio.run(lambda: create_image(v1, from_file=str(tmp / "base.img"), chunk_size=CHUNK))
    top = bytearray(base)
    top[100_000:300_000] = rng.randbytes(200_000)
    top[5 << 20 : (5 << 20) + 8192] = b"\x01" * 8192
    (tmp / "top.img").write_bytes(top)
    v2 = LocalRef(str(tmp / "layout"), "v2")
    trio.run(lambda: create_image(v2, from_file=str(tmp / "top.img"), base=v1, chunk_size=CHUNK))
    ref = parse_reference(f"{registry.registry}/test/app:v2")
    config = Config(registries=(RegistrySettings(registry.registry, plain_http=True),))

    async def push():
        async with ImageOpener(config) as opener:
            return await push_image(opener, v2, ref)

    pushed = trio.run(push)
    assert pushed["uploaded"] >= 3
    trio.run(flatten_image, v2, str(tmp / "flat.img"))
    return v2, (tmp / "flat.img").read_bytes(), ref


def host_config(tmp_path, *proxies, mirrors=(), **overrides) -> Config:
    regs = tuple(RegistrySettings(f"127.0.0.1:{p.port}", plain_http=True, mirrors=tuple(mirrors)) for p in proxies)
    regs += tuple(RegistrySettings(m, plain_http=True) for m in mirrors)
    values = dict(cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "writable"),
                  run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"), registries=regs,
                  trace_replay=False, trace_record_seconds=0, readahead_chunks=0, max_range=512 << 10)
    values.update(overrides)
    return Config(**values)


def via(proxy, ref) -> str:
    return f"127.0.0.1:{proxy.port}/{ref.repository}:{ref.tag}"


def test_remote_image_reads_like_flatten(registry, image, tmp_path):
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as proxy:
        async def main():
            async with Host.open(host_config(tmp_path, proxy)) as host:
                att = await host.attach(via(proxy, ref))
                data = await att.device.read(0, att.device.size)
                assert data == flat
                assert await att.device.read(12345, 70000) == flat[12345 : 12345 + 70000]

        trio.run(main)


def test_request_accounting(registry, image, tmp_path):
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as proxy:
        async def main():
            async with Host.open(host_config(tmp_path, proxy)) as host:
                proxy.reset_counters()
                att = await host.attach(via(proxy, ref))
                layers = len(att.opened.image.layers)
                assert proxy.count("GET", "/manifests/") == 1
                assert proxy.count("GET", "/blobs/") == layers  # one ranged GET of metadata per layer
                assert proxy.count() == 1 + layers

                proxy.reset_counters()
                assert await att.device.read(1 << 20, 4096) == flat[1 << 20 : (1 << 20) + 4096]
                # the daemon keeps the image config with its cached metadata in the background
                # (docs/daemon.md "Offline life"): that GET is not the read's
                config = att.opened.image.manifest.config.digest
                gets = [g for g in proxy.requests("GET", "/blobs/") if config not in g.target]
                assert len(gets) == 1, gets
                assert gets[0].body_bytes <= CHUNK + 1024  # the one chunk, not more

                proxy.reset_counters()
                results = []

                async def reader():
                    results.append(await att.device.read((2 << 20) + 100, 1000))

                async with trio.open_nursery() as n:
                    for _ in range(100):
                        n.start_soon(reader)
                assert results == [flat[(2 << 20) + 100 : (2 << 20) + 1100]] * 100
                assert proxy.count("GET", "/blobs/") == 1

                proxy.reset_counters()
                n_chunks = 24  # base-layer chunks 40..63, adjacent in the blob, none cached
                start = 40 * CHUNK
                assert await att.device.read(start, n_chunks * CHUNK) == flat[start : start + n_chunks * CHUNK]
                requests = proxy.count("GET", "/blobs/")
                expected = n_chunks * CHUNK / (512 << 10)
                assert expected <= requests <= expected + 2, requests

        trio.run(main)


def test_corrupt_bytes_are_never_served_and_a_good_mirror_wins(registry, image, tmp_path):
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as bad, FaultProxy.running_in_thread(registry.port) as good:
        async def main():
            # the bad proxy alone: flipped bytes -> IntegrityError, nothing cached
            async with Host.open(host_config(tmp_path / "a", bad)) as host:
                att = await host.attach(via(bad, ref))
                bad.faults.corrupt(path="/blobs/", count=None)
                with pytest.raises(IntegrityError):
                    await att.device.read(3 << 20, 4096)
                assert host.cache.statistics()["entries"] == 0
                bad.faults.clear()
                assert await att.device.read(3 << 20, 4096) == flat[3 << 20 : (3 << 20) + 4096]
            # a mirror that corrupts, then the registry through a good proxy: the read succeeds
            mirror = f"127.0.0.1:{bad.port}"
            config = host_config(tmp_path / "b", good, mirrors=[mirror])
            async with Host.open(config) as host:
                att = await host.attach(via(good, ref))
                bad.faults.corrupt(path="/blobs/", count=None)
                good.reset_counters()
                assert await att.device.read(3 << 20, 4096) == flat[3 << 20 : (3 << 20) + 4096]
                assert bad.count("GET", "/blobs/") >= 1 and good.count("GET", "/blobs/") >= 1
                bad.faults.clear()

        trio.run(main)


def test_5xx_and_resets_are_retried(registry, image, tmp_path):
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as proxy:
        async def main():
            async with Host.open(host_config(tmp_path, proxy)) as host:
                att = await host.attach(via(proxy, ref))
                proxy.faults.fail(503, path="/blobs/", count=2)
                assert await att.device.read(0, 8192) == flat[:8192]
                proxy.faults.reset(path="/blobs/", count=2)
                assert await att.device.read(CHUNK * 5, 8192) == flat[CHUNK * 5 : CHUNK * 5 + 8192]
                statuses = [r.status for r in proxy.requests("GET", "/blobs/")]
                assert statuses.count(503) == 2

        trio.run(main)


def test_stalled_registry_fails_within_deadline_while_others_are_served(registry, image, tmp_path):
    local, flat, ref = image
    # another image, with other blobs, served by another registry address
    (tmp_path / "other.img").write_bytes(random.Random(9).randbytes(2 << 20))
    other_local = LocalRef(str(tmp_path / "layout"), "other")
    trio.run(lambda: create_image(other_local, from_file=str(tmp_path / "other.img"), chunk_size=CHUNK))
    other_ref = parse_reference(f"{registry.registry}/test/other:1")

    async def push():
        async with ImageOpener(Config(registries=(RegistrySettings(registry.registry, plain_http=True),))) as opener:
            await push_image(opener, other_local, other_ref)

    trio.run(push)
    other_data = (tmp_path / "other.img").read_bytes()
    with FaultProxy.running_in_thread(registry.port) as stalled, FaultProxy.running_in_thread(registry.port) as fine:
        async def main():
            config = host_config(tmp_path, stalled, fine, fetch_deadline=3.0)
            async with Host.open(config) as host:
                slow = await host.attach(via(stalled, ref), "slow")
                other = await host.attach(via(fine, other_ref), "other")
                stalled.faults.stall(path="/blobs/", count=None)
                outcome = {}

                async def read_slow():
                    start = trio.current_time()
                    try:
                        await slow.device.read((4 << 20) - 8192, 4096)
                    except FetchError:
                        outcome["slow"] = trio.current_time() - start

                async with trio.open_nursery() as n:
                    n.start_soon(read_slow)
                    await trio.sleep(0.2)
                    # meanwhile the other image, on another registry, is served
                    assert await other.device.read(1 << 20, 65536) == other_data[1 << 20 : (1 << 20) + 65536]
                    outcome["other_served_while_stalled"] = "slow" not in outcome
                stalled.faults.release_stalls()
                assert outcome["other_served_while_stalled"]
                assert "slow" in outcome and outcome["slow"] < 30

        trio.run(main)


def test_trace_replay_leaves_no_demand_misses(registry, image, tmp_path):
    local, flat, ref = image
    startup = [(0, 4096), (2 << 20, 300_000), (5 << 20, 8192), (123_456, 10)]
    with FaultProxy.running_in_thread(registry.port) as proxy:
        async def first():
            config = host_config(tmp_path / "one", proxy, trace_record_seconds=3600, trace_publish=True)
            async with Host.open(config) as host:
                att = await host.attach(via(proxy, ref))
                assert att.trace.get("recording")
                for off, n in startup:
                    await att.device.read(off, n)
                await host.detach(att.name)  # stores the trace next to the image
                return att.trace

        recorded = trio.run(first)
        assert recorded.get("chunks", 0) >= 4 and recorded.get("saved")

        async def second():
            config = host_config(tmp_path / "two", proxy, trace_replay=True)
            async with Host.open(config) as host:
                att = await host.attach(via(proxy, ref))
                with trio.fail_after(60):
                    while "chunks" not in att.trace:  # replay finished
                        await trio.sleep(0.05)
                assert att.trace["replay"] == recorded["chunks"] and att.trace["failed"] == 0
                for off, n in startup:
                    assert await att.device.read(off, n) == flat[off : off + n]
                return att.store.statistics(), host.flat.statistics() if host.flat is not None else {}

        stats, flat_stats = trio.run(second)
        # the replay fills the layers' flat files, so the reads are hits there or in the chunk tier
        assert stats["chunk_reads"] + flat_stats.get("hits", 0) > 0 and stats["demand_misses"] == 0


def test_pull_is_metadata_only_and_mounts_lazily(registry, image, tmp_path):
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as proxy:
        remote = parse_reference(via(proxy, ref))
        config = host_config(tmp_path, proxy)

        async def main():
            async with ImageOpener(config) as opener:
                proxy.reset_counters()
                pulled = await pull_image(opener, remote, LocalRef(str(tmp_path / "pulled"), "x"))
                sent = sum(r.body_bytes for r in proxy.requests("GET"))
                assert sent < 64 << 10  # manifest, config and metadata only
                assert pulled["layers"] == 2
            async with Host.open(dataclasses.replace(config)) as host:
                proxy.reset_counters()
                att = await host.attach(f"oci:{tmp_path}/pulled:x")
                assert proxy.count("GET", "/manifests/") == 0 and proxy.count("GET", "/blobs/") == 0
                assert await att.device.read(0, 1 << 20) == flat[: 1 << 20]

        trio.run(main)
        assert os.path.exists(tmp_path / "pulled/index.json")


def test_background_download_fetches_the_rest(registry, image, tmp_path):
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as proxy:
        async def main():
            config = host_config(tmp_path, proxy, background_download=True, background_delay=0.0,
                                 background_rate=64 << 20)
            async with Host.open(config) as host:
                att = await host.attach(via(proxy, ref))
                wanted = {loc.digest for loc in att.device.index.locations()}
                with trio.fail_after(120):
                    while "background" not in att.trace:
                        await trio.sleep(0.05)
                assert att.trace["background"]["failed"] == 0
                assert all(host.scheduler.is_cached(d) for d in wanted)
                proxy.reset_counters()
                assert await att.device.read(0, att.device.size) == flat
                assert proxy.count("GET", "/blobs/") == 0  # everything was already here

        trio.run(main)


def record_trace(proxy, ref, tmp_path, annotations=None) -> tuple[dict, list[str]]:
    """Record and publish a startup trace of *ref* (one read); with *annotations*, list it again
    under them, as another lazyfs (or anyone who can push) could have. The recording's
    ``att.trace``, and the image's layer blobs."""
    async def main():
        config = host_config(tmp_path / "record", proxy, trace_record_seconds=3600, trace_publish=True)
        async with Host.open(config) as host:
            att = await host.attach(via(proxy, ref))
            await att.device.read(2 << 20, 300_000)
            await host.detach(att.name)  # stores the trace
            if annotations is not None:
                client, repo = host.opener.client, att.opened.remote.repo()
                manifest, _, _ = await client.get_manifest(repo.with_digest(att.trace["saved"]))
                await add_referrer_remote(client, repo, manifest, TRACE_TYPE, att.opened.image.manifest.digest,
                                          annotations(att))
            return dict(att.trace), [blob for _, blob in att.opened.image.layers]

    recorded, blobs = trio.run(main)
    assert recorded.get("saved") and recorded.get("chunks")
    return recorded, blobs


def attach_with_replay(proxy, ref, tmp_path, flat) -> dict:
    """Attach *ref* on a fresh host that replays traces; its ``att.trace`` once the lookup (and any
    replay) is over, after the recorded range read back right."""
    async def main():
        async with Host.open(host_config(tmp_path / "replay", proxy, trace_replay=True)) as host:
            proxy.reset_counters()
            att = await host.attach(via(proxy, ref))
            with trio.fail_after(60):
                await att.trace_lookup.wait()
                while "replay" in att.trace and "chunks" not in att.trace:  # a replay under way
                    await trio.sleep(0.05)
            assert await att.device.read(2 << 20, 300_000) == flat[2 << 20 : (2 << 20) + 300_000]
            return dict(att.trace)

    return trio.run(main)


def test_the_trace_is_looked_up_while_the_chunk_tables_are_fetched(registry, image, tmp_path):
    """An attach looks for the startup trace as soon as it has the manifest, while the layers' chunk
    tables are still on the way, and the replay then uses what that lookup read: before, its three
    requests came only after the attach, ahead of the replay's first chunk (BENCHMARKS.md, issue 14).
    It is two requests now: the referrers, then the blob their entry names (ANN_TRACE_BLOB). Broken on
    purpose once (2026-12-08) by ignoring that annotation: this test failed (the trace manifest was read)."""
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as proxy:
        recorded, blobs = record_trace(proxy, ref, tmp_path)

        def trace_blob_served() -> bool:  # the only whole blob an attach reads is the trace
            return any(r.range is None and r.status == 200 and r.body_bytes
                       for r in proxy.requests("GET", "/blobs/"))

        async def second():
            config = host_config(tmp_path / "two", proxy, trace_replay=True)
            async with Host.open(config) as host:
                proxy.reset_counters()
                proxy.faults.stall(path="|".join(blobs), method="GET")  # the chunk tables wait
                attached = {}

                async def attach():
                    attached["att"] = await host.attach(via(proxy, ref))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(attach)
                    with trio.fail_after(30):  # bounds a lookup that waits for the attach (the old order)
                        while not trace_blob_served():
                            await trio.sleep(0.01)
                    assert "att" not in attached  # the attach is still waiting for the chunk tables
                    proxy.faults.clear()
                att = attached["att"]
                with trio.fail_after(60):
                    await att.trace_lookup.wait()
                    while "chunks" not in att.trace:  # replay finished
                        await trio.sleep(0.05)
                assert att.trace["replay"] == recorded["chunks"] and att.trace["failed"] == 0
                assert await att.device.read(2 << 20, 300_000) == flat[2 << 20 : (2 << 20) + 300_000]
                return att.store.statistics()

        reader = trio.run(second)
        assert reader["demand_misses"] == 0
        # the replay used the trace the early lookup read: the registry was asked once, for the blob
        # the referrers entry names; the trace's manifest was not needed (ANN_TRACE_BLOB)
        assert proxy.count("GET", f"/manifests/{recorded['saved']}") == 0
        trace_blob = next(r.path for r in proxy.requests("GET", "/blobs/") if r.range is None)
        assert proxy.count("GET", trace_blob) == 1


def test_a_trace_listed_without_its_blob_is_read_through_its_manifest(registry, image, tmp_path):
    """A trace a lazyfs from before ANN_TRACE_BLOB stored is listed without the annotation: the lookup
    reads the trace's manifest for its blob, and the replay is the same. Broken on purpose once
    (2026-12-08) by refusing entries without the annotation: this test failed (nothing replayed)."""
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as proxy:
        recorded, _ = record_trace(proxy, ref, tmp_path, lambda att: {ANN_TRACE_CHUNKS: str(att.trace["chunks"])})
        replayed = attach_with_replay(proxy, ref, tmp_path, flat)
        assert replayed["replay"] == recorded["chunks"] and replayed["failed"] == 0
        assert proxy.count("GET", f"/manifests/{recorded['saved']}") == 1


def test_a_trace_entry_naming_a_blob_that_is_no_trace_is_ignored(registry, image, tmp_path, caplog):
    """The blob annotation is the registry's word, as the whole referrers index is: an entry naming
    another blob of the repository (here the image's top layer), or no digest at all, gives no trace
    to replay. It is skipped with a warning (an older trace, if any, is tried next, as after any
    unreadable trace), and the image is served as without it. Broken on purpose once (2026-12-08)
    by ignoring the annotation: this test failed (no warning: the trace behind the entry was replayed)."""
    local, flat, ref = image
    forgeries = {"layer": lambda att: att.opened.image.layers[-1][1], "no digest": lambda att: "../../v2/_catalog"}
    with FaultProxy.running_in_thread(registry.port) as proxy:
        for name, blob in forgeries.items():
            caplog.clear()
            forged, _ = record_trace(proxy, ref, tmp_path / name, lambda att: {ANN_TRACE_BLOB: blob(att)})
            attach_with_replay(proxy, ref, tmp_path / name, flat)
            assert f"ignoring the startup trace {forged['saved']}" in caplog.text, name


def test_a_failed_attach_cancels_its_early_trace_lookup(registry, image, tmp_path):
    """An attach that ends without an image after the manifest (here: cancelled while its chunk
    tables are stalled) stops the trace lookup it started: nothing of it stays behind, even with
    the registry's answer to the lookup stalled too."""
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as proxy:
        async def layer_blobs():
            async with Host.open(host_config(tmp_path / "probe", proxy)) as host:
                return [blob for _, blob in (await host.attach(via(proxy, ref))).opened.image.layers]

        blobs = trio.run(layer_blobs)

        async def main():
            async with Host.open(host_config(tmp_path / "host", proxy, trace_replay=True)) as host:
                proxy.faults.stall(path="/manifests/sha256-", method="GET")  # the lookup never gets an answer
                proxy.faults.stall(path="|".join(blobs), method="GET")  # nor the chunk tables
                with trio.CancelScope() as attaching:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(host.attach, via(proxy, ref))
                        with trio.fail_after(30):
                            while not proxy.count("GET", "/manifests/sha256-"):  # the lookup has started
                                await trio.sleep(0.01)
                        attaching.cancel()
                assert not host.attachments
                await trio.testing.wait_all_tasks_blocked()
                assert not host._opener_leases  # the lookup was cancelled with the attach
                assert host.background_failures == 0
                proxy.faults.clear()

        trio.run(main)


def test_reads_of_a_replayed_trace_read_nothing_ahead(registry, image, tmp_path):
    """A startup read of a chunk the replayed trace names is on the script: it queues no readahead, even
    when it finds the chunk still in flight from the replay (a join that counts as a miss). Readahead
    there fetched what the trace already had or what startup never read (BENCHMARKS.md, issue 14).
    Nor does a read while the trace is still being looked for (the attach does not wait for that)."""
    local, flat, ref = image
    startup = [(0, 4096), (2 << 20, 300_000), (5 << 20, 8192)]
    with FaultProxy.running_in_thread(registry.port) as proxy:
        async def first():
            config = host_config(tmp_path / "one", proxy, trace_record_seconds=3600, trace_publish=True)
            async with Host.open(config) as host:
                att = await host.attach(via(proxy, ref))
                for off, n in startup:
                    await att.device.read(off, n)
                await host.detach(att.name)
                return att.trace

        assert trio.run(first).get("saved")

        async def second():
            config = host_config(tmp_path / "two", proxy, trace_replay=True, readahead_chunks=4)
            async with Host.open(config) as host:
                proxy.faults.latency = 0.3  # the lookup, then the replay, are in flight when the reads come
                att = await host.attach(via(proxy, ref))
                assert not att.trace_lookup.is_set()
                off, n = startup[0]
                assert await att.device.read(off, n) == flat[off : off + n]  # during the lookup
                await att.trace_lookup.wait()
                assert att.trace.get("replay") and att.store.traced
                for off, n in startup[1:]:
                    assert await att.device.read(off, n) == flat[off : off + n]  # joins the replay
                proxy.faults.latency = 0
                return att.store.statistics(), host.scheduler.statistics()

        reader, sched = trio.run(second)
        assert reader["demand_misses"] > 0, reader  # the reads did join the replay's fetches
        assert sched["prefetched"] == 0, sched


def test_the_startup_trace_records_reads_the_flat_files_serve(registry, image, tmp_path):
    """A chunk read ahead and then read from the layer's flat file (never reaching the chunk store) is in
    the recorded trace: a trace with only the misses left the chunks readahead had fetched to be missed
    again at the next start (BENCHMARKS.md, issue 14)."""
    local, flat, ref = image
    with FaultProxy.running_in_thread(registry.port) as proxy:
        async def main():
            config = host_config(tmp_path, proxy, trace_record_seconds=3600, trace_publish=True, readahead_chunks=4)
            async with Host.open(config) as host:
                att = await host.attach(via(proxy, ref))
                assert att.device.block_cache is not None and att.device.read_local(0, 4096) is None
                await att.device.read(0, 4096)  # a miss: the chunks after it are read ahead
                first = att.device.index.lookup(0, 1)[0].loc
                ahead = att.device.index.following(first, 4)
                assert ahead
                with trio.fail_after(30):
                    while not all(host.flat.holds(loc.digest) for loc in ahead):
                        await trio.sleep(0.01)
                seg = next(s for s in att.device.index.segments if s.loc == ahead[-1])
                store_reads = att.store.statistics()["chunk_reads"]
                bs = att.device.block_size
                assert await att.device.read(seg.start * bs, bs) == flat[seg.start * bs:(seg.start + 1) * bs]
                assert att.store.statistics()["chunk_reads"] == store_reads  # served by the flat file
                recorded = {loc.digest for loc in att.store.recorder.locations}
                assert first.digest in recorded and ahead[-1].digest in recorded
                await host.finish_trace(att)
                assert att.device.observe_read is None and att.trace["chunks"] >= 2

        trio.run(main)
