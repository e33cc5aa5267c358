"""The chain of digests against a forging mirror: real registry, fault proxy, in-process host and the CLI.

A mirror listed before the registry serves, from before the attach, a
self-consistent forged tail (footer digest recomputed, forged chunk table)
and the forged chunks that table names, for one layer. The manifest's
meta-digest must stop the tail, the true chunk table the chunks, and the
registry behind the mirror must serve the image as it is.
"""

import json
import os
import random

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.errors import IntegrityError
from lazyfs.format.layer import parse_anchored_tail, parse_blob, parse_tail
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image, flatten_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import META_DIR, ImageOpener, pull_image, push_image
from lazyfs.serve.host import Host
from tests.support.cli import run_lazyfs
from tests.support.forgery import forge_blob
from tests.support.proxy import FaultProxy
from tests.support.registry import registry_fixture

pytestmark = pytest.mark.registry
registry = registry_fixture()
CHUNK = 64 << 10
MARKER = b"FORGED!\n"


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    """A two-layer image in the registry, its flattened bytes, and a forgery of its bottom layer."""
    tmp = tmp_path_factory.mktemp("trust")
    rng = random.Random(12)
    base = rng.randbytes(3 << 20) + bytes(1 << 20)
    (tmp / "base.img").write_bytes(base)
    v1 = LocalRef(str(tmp / "layout"), "v1")
    trio.run(lambda: create_image(v1, from_file=str(tmp / "base.img"), chunk_size=CHUNK))
    top = bytearray(base)
    top[200_000:400_000] = rng.randbytes(200_000)
    (tmp / "top.img").write_bytes(top)
    v2 = LocalRef(str(tmp / "layout"), "v2")
    trio.run(lambda: create_image(v2, from_file=str(tmp / "top.img"), base=v1, chunk_size=CHUNK))
    ref = parse_reference(f"{registry.registry}/trust/app:v2")
    config = Config(registries=(RegistrySettings(registry.registry, plain_http=True),))

    async def push():
        async with ImageOpener(config) as opener:
            await push_image(opener, v2, ref)
            return await opener.open(str(v2))

    opened = trio.run(push)
    trio.run(flatten_image, v2, str(tmp / "flat.img"))
    layer = opened.image.manifest.layers[0]
    true_blob = (tmp / "layout/blobs/sha256" / layer.digest[7:]).read_bytes()
    meta = opened.image.layers[0][0]
    forged, forged_digests = forge_blob(len(true_blob), layer.meta_offset, meta.virtual_size, meta.chunk_size,
                                        MARKER * (len(base) // len(MARKER)))
    return {"ref": ref, "flat": (tmp / "flat.img").read_bytes(), "layer": layer, "forged": forged, "true_blob": true_blob,
            "forged_digests": forged_digests, "true_digests": {c.digest for m, _ in opened.image.layers
                                                              for c in m.chunks}}


def host_config(tmp_path, registry_host: str, mirrors=()) -> Config:
    regs = (RegistrySettings(registry_host, plain_http=True, mirrors=tuple(mirrors)),) + tuple(
        RegistrySettings(m, plain_http=True) for m in mirrors)
    return Config(cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "writable"),
                  run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"), registries=regs,
                  trace_replay=False, trace_record_seconds=0, readahead_chunks=0)


def via(proxy, ref) -> str:
    return f"127.0.0.1:{proxy.port}/{ref.repository}:{ref.tag}"


def cache_bytes(root) -> bytes:
    out = bytearray()
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out += f.read()
    return bytes(out)


def test_the_forgery_is_self_consistent(image):
    """Only the manifest's meta-digest tells the forged tail from the true one."""
    layer, forged = image["layer"], image["forged"]
    tail = forged[layer.meta_offset:]
    _, meta = parse_tail(tail, layer.size)  # footer digest, lengths, every table rule: all fine
    assert {c.digest for c in meta.chunks} == image["forged_digests"]
    _, whole = parse_blob(forged)
    assert whole == meta
    with pytest.raises(IntegrityError, match="metadata of layer 0"):
        parse_anchored_tail(tail, layer.meta_digest, layer.size, what="layer 0")


def attach_through_mirror(registry, image, tmp_path, content: bytes) -> tuple[dict, FaultProxy]:
    """Attach the image with a mirror serving *content* for the forged layer from before the attach;
    read it whole (it must equal the true image) and return the scheduler's statistics."""
    ref, layer = image["ref"], image["layer"]
    with FaultProxy.running_in_thread(registry.port) as mirror, FaultProxy.running_in_thread(registry.port) as origin:
        mirror.faults.forge(content, path=layer.digest)

        async def main():
            config = host_config(tmp_path, f"127.0.0.1:{origin.port}", mirrors=[f"127.0.0.1:{mirror.port}"])
            async with Host.open(config) as host:
                att = await host.attach(via(origin, ref))
                assert await att.device.read(0, att.device.size) == image["flat"]
                for digest in image["forged_digests"]:
                    assert digest not in host.cache
                return host.scheduler.statistics()

        stats = trio.run(main)
        asked = [r for r in mirror.requests("GET", layer.digest) if r.fault is not None]
    assert asked, "the mirror was never asked"
    assert MARKER not in cache_bytes(tmp_path / "cache")
    return stats, asked


def test_forging_mirror_before_attach_fails_over_to_the_registry(registry, image, tmp_path):
    """A forged tail (and forged chunks behind it): the tail fails its meta-digest, the registry serves it.

    The registry client then holds the mirror unhealthy, so the chunks may never be asked of it;
    the next test forges the chunks alone."""
    attach_through_mirror(registry, image, tmp_path, image["forged"])


def test_forged_chunks_behind_a_true_tail_fail_over_to_the_registry(registry, image, tmp_path):
    """The true tail, forged frames: the chunks fail their blake3 and come from the registry."""
    layer = image["layer"]
    true_tail = image["true_blob"][layer.meta_offset:]
    stats, asked = attach_through_mirror(registry, image, tmp_path, image["forged"][: layer.meta_offset] + true_tail)
    assert stats["integrity_failures"] >= 1 and len(asked) >= 2


def test_no_good_source_fails_naming_the_layer(registry, image, tmp_path):
    ref, layer = image["ref"], image["layer"]
    with FaultProxy.running_in_thread(registry.port) as forger:
        forger.faults.forge(image["forged"], path=layer.digest)

        async def main():
            async with Host.open(host_config(tmp_path, f"127.0.0.1:{forger.port}")) as host:
                with pytest.raises(IntegrityError) as caught:
                    await host.attach(via(forger, ref))
                assert host.attachments == {}
                return str(caught.value)

        message = trio.run(main)
    assert "\n" not in message
    assert f"metadata of layer 0 ({layer.digest[:19]})" in message and layer.meta_digest in message
    assert f"127.0.0.1:{forger.port}" in message


def test_cli_mount_through_a_forger_only_is_one_line(registry, image, tmp_path):
    """`lazyfs pull` (the CLI path with no daemon) through the forger alone: exit 1, one line naming the layer."""
    ref, layer = image["ref"], image["layer"]
    with FaultProxy.running_in_thread(registry.port) as forger:
        forger.faults.forge(image["forged"], path=layer.digest)
        cfg = tmp_path / "config.json"
        cfg.write_text(json.dumps({"registries": [{"host": f"127.0.0.1:{forger.port}", "plain_http": True}],
                                   "cache_root": str(tmp_path / "cache")}))
        proc = run_lazyfs(str(cfg), "pull", via(forger, ref), f"oci:{tmp_path}/pulled:x", check=False, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"layer 0 ({layer.digest[:19]})" in lines[0]
    assert not (tmp_path / "pulled" / META_DIR / layer.digest[7:]).exists()  # nothing of it kept


def test_a_damaged_saved_tail_is_fetched_again(registry, image, tmp_path):
    ref = image["ref"]

    async def main():
        config = host_config(tmp_path, registry.registry)
        async with ImageOpener(config) as opener:
            await pull_image(opener, ref, LocalRef(str(tmp_path / "pulled"), "x"))
        saved = tmp_path / "pulled" / META_DIR / image["layer"].digest[7:]
        damaged = bytearray(saved.read_bytes())
        damaged[10] ^= 1
        saved.write_bytes(damaged)
        async with Host.open(config) as host:
            att = await host.attach(f"oci:{tmp_path}/pulled:x")
            assert await att.device.read(0, 1 << 20) == image["flat"][: 1 << 20]

    trio.run(main)


def verify(tmp_path, host, ref, *extra):
    cfg = tmp_path / "verify.json"
    cfg.write_text(json.dumps({"registries": [{"host": host, "plain_http": True}],
                               "cache_root": str(tmp_path / "cache")}))
    return run_lazyfs(str(cfg), "verify", ref, *extra, check=False)


def test_verify_registry_image(registry, image, tmp_path):
    ref, layer = image["ref"], image["layer"]
    good = verify(tmp_path, registry.registry, str(ref), "--json")
    assert good.returncode == 0, good.stderr
    summary = json.loads(good.stdout)
    assert summary["layers"] == 2 and summary["blobs_checked"] == 4
    assert summary["chunks_checked"] == len(image["true_digests"])
    assert "trust on first use" in summary["anchor"]
    pinned = verify(tmp_path, registry.registry, f"{ref.repo()}@{summary['manifest']}", "--quiet")
    assert pinned.returncode == 0, pinned.stderr
    # neither --json nor --quiet: one summary line (without the print in cli._run_with_progress,
    # tried once, this went red)
    told = verify(tmp_path, registry.registry, str(ref))
    assert told.returncode == 0 and f"{ref}: {summary['manifest']}, anchored by" in told.stdout, told
    assert f"{summary['chunks_checked']} chunks" in told.stdout and "match their digests" in told.stdout
    with FaultProxy.running_in_thread(registry.port) as proxy:
        target = via(proxy, ref)
        host = f"127.0.0.1:{proxy.port}"
        # a forged tail: the first bad object is that layer's metadata
        rule = proxy.faults.forge(image["forged"], path=layer.digest)
        bad = verify(tmp_path, host, target, "--quiet")
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert f"metadata of layer 0 ({layer.digest[:19]})" in bad.stderr
        proxy.faults.remove(rule)
        # one flipped byte among the frames: that chunk, in that layer, is named
        proxy.faults.corrupt(100_000, path=layer.digest)
        bad = verify(tmp_path, host, target, "--quiet")
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "digest mismatch for chunk" in bad.stderr and f"layer 0 ({layer.digest[:19]})" in bad.stderr
