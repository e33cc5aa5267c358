"""The trust policy for what is found through referrers, against a real registry, FUSE, loop and ext4.

Twins: another host ("foreign", its own conversion cache) converts an ordinary image
and pushes the lazyfs twin next to it. This host mounts it with --prefer-lazyfs or
reuses its layers in convert only if it converted the twin itself or the twin
carries a Notary Project signature that chains to a root in this host's trust store.

Traces: a trace naming chunks the image does not have is ignored and counted; hosts
publish traces only with trace_publish.
"""

import io
import json
import os
import tarfile

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.referrers import find_referrers_remote
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.image.traces import ARTIFACT_TYPE as TRACE_TYPE
from lazyfs.image.traces import save_trace
from lazyfs.serve.host import Host
from tests.support.cli import run_lazyfs
from tests.support.cleanup import release_under
from tests.support.notation import TestSigner
from tests.support.ociimages import skopeo_copy, write_image
from tests.support.registry import registry_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
registry = registry_fixture()


def client_config(registry) -> Config:
    return Config(registries=(RegistrySettings(registry.registry, plain_http=True),))


# ---------------------------------------------------------------- twins


def tar_of(path: str, files: dict[str, str]) -> str:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_650_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


class Hosts:
    """Config files for hosts that share one daemon (one run dir) but each have their own caches."""

    def __init__(self, tmp, registry):
        self.tmp, self.registry = tmp, registry
        self.socket = str(tmp / "run" / "lazyfs.sock")
        self.mounts = 0

    def config(self, name: str, **extra) -> str:
        path = str(self.tmp / f"config-{name}.json")
        doc = {"run_dir": str(self.tmp / "run"), "state_dir": str(self.tmp / "state"),
               "cache_root": str(self.tmp / f"cache-{name}"), "writable_root": str(self.tmp / "writable"),
               "trace_record_seconds": 0, "registries": [{"host": self.registry.registry, "plain_http": True}],
               **extra}
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    def lazyfs(self, *args, config: str, check=True):
        return run_lazyfs(config, *args, check=check, timeout=600)

    def convert(self, src, dst, *args, config) -> dict:
        return json.loads(self.lazyfs("convert", src, dst, "--json", "--quiet", *args, config=config).stdout)

    def mount(self, image, *args, config):
        """``lazyfs mount IMAGE T --prefer-lazyfs --json``: (process, the file it shows, or None); unmounts."""
        self.mounts += 1
        target = self.tmp / f"mnt{self.mounts}"
        target.mkdir()
        proc = self.lazyfs("mount", image, str(target), "--prefer-lazyfs", "--json", *args, config=config, check=False)
        if proc.returncode:
            return proc, None, None
        try:
            return proc, json.loads(proc.stdout), (target / "etc" / "release").read_text()
        finally:
            self.lazyfs("umount", str(target), config=config)

    def ref(self, name: str) -> str:
        return f"{self.registry.registry}/{name}"


@pytest.fixture(scope="module")
def hosts(registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    h = Hosts(tmp, registry)
    layout = str(tmp / "src")
    base = tar_of(str(tmp / "base.tar"), {"etc/release": "trusted twin 1\n", "bin/tool": "#!/bin/sh\n"})
    top = tar_of(str(tmp / "top.tar"), {"usr/share/doc": "docs\n"})
    h.source_digest = write_image(layout, "app", [base, top])[0]
    skopeo_copy(f"oci:{layout}:app", f"docker://{h.ref('trust/app:1')}")
    h.foreign = h.config("foreign")
    h.twin = h.convert(h.ref("trust/app:1"), h.ref("trust/app:1-lazyfs"), config=h.foreign)
    assert h.twin["layers_converted"] == 2 and h.twin["source_manifest"] == h.source_digest
    h.acme = TestSigner(str(tmp / "acme"), "acme")
    h.mallory = TestSigner(str(tmp / "mallory"), "mallory", key="ec")
    h.trusting = h.config("trusting", trust={"trust_store": [h.acme.root]})
    h.other = h.config("other", trust={"trust_store": [h.mallory.root]})
    yield h
    release_under(tmp, h.socket)


def sign(h, signer, digest):
    async def main():
        async with ImageOpener(client_config(h.registry)) as opener:
            return await signer.sign_remote(opener.client, parse_reference(h.ref("trust/app")), digest)

    return trio.run(main)


def test_prefer_lazyfs_mounts_only_a_trusted_twin(hosts):
    h = hosts
    plain = h.config("plain")
    proc, _, _ = h.mount(h.ref("trust/app:1"), config=plain)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("lazyfs: error: no trusted lazyfs twin of"), line
    assert "was not made on this host, and no trust store is configured" in line, line
    proc, _, _ = h.mount(h.ref("trust/app:1"), config=h.trusting)  # a trust store, but the twin is unsigned
    assert proc.returncode == 1 and "is not signed" in proc.stderr, proc.stderr

    sign(h, h.acme, h.twin["manifest"])
    proc, info, release = h.mount(h.ref("trust/app:1"), config=h.trusting)
    assert proc.returncode == 0, proc.stderr
    assert release == "trusted twin 1\n"
    assert info["twin"]["mounted"].endswith("@" + h.twin["manifest"]) and info["twin"]["trust"]["basis"] == "signature"
    assert "mounted its lazyfs twin" in proc.stderr and "signed by CN=acme signer" in proc.stderr, proc.stderr

    proc, _, _ = h.mount(h.ref("trust/app:1"), config=h.other)  # signed, but by a key this host does not trust
    assert proc.returncode == 1 and "no signature of it verifies" in proc.stderr, proc.stderr
    assert "does not lead to a trusted root" in proc.stderr

    proc, info, _ = h.mount(h.ref("trust/app:1"), config=h.foreign)  # the host that converted it: its ledger
    assert proc.returncode == 0 and info["twin"]["trust"]["basis"] == "host", proc.stderr


def test_a_digest_pinned_reference_is_never_replaced_silently(hosts):
    h = hosts
    pinned = f"{h.ref('trust/app')}@{h.source_digest}"
    proc, info, _ = h.mount(pinned, config=h.foreign)
    assert proc.returncode == 0, proc.stderr
    assert f"is pinned to {h.source_digest}; mounted its lazyfs twin" in proc.stderr, proc.stderr
    assert h.twin["manifest"] in proc.stderr
    assert info["twin"]["named"] == pinned and info["image"] != pinned


def test_a_newer_untrusted_twin_does_not_displace_a_trusted_one(hosts):
    h = hosts
    sign(h, h.acme, h.twin["manifest"])
    newer = h.convert(h.ref("trust/app:1"), h.ref("trust/app:1-small"), "--chunk-size", "16384",
                      config=h.config("foreign2"))  # listed after the first twin, unsigned
    assert newer["manifest"] != h.twin["manifest"]
    proc, info, _ = h.mount(h.ref("trust/app:1"), config=h.trusting)
    assert proc.returncode == 0, proc.stderr
    assert info["twin"]["mounted"].endswith("@" + h.twin["manifest"])
    assert [d["artifact"] for d in info["twin"]["refused"]] == [newer["manifest"]]
    assert "1 newer twin(s) refused" in proc.stderr


def test_convert_does_not_reuse_an_unsigned_foreign_layer(hosts):
    h = hosts
    cold = h.convert(h.ref("trust/app:1"), h.ref("trust/app:1-cold"), config=h.config("cold"))
    assert (cold["layers_converted"], cold["layers_reused"]) == (2, 0)
    refused = {d["artifact"]: d["reason"] for d in cold["untrusted_images"]}
    assert h.twin["manifest"] in refused and "not made on this host" in refused[h.twin["manifest"]]
    assert cold["manifest"] == h.twin["manifest"]  # converting again gives the same image (and now it is ours)

    again = h.convert(h.ref("trust/app:1"), h.ref("trust/app:1-again"), config=h.foreign)
    assert [layer["origin"] for layer in again["layers"]] == ["cache", "cache"]  # its own conversion cache

    sign(h, h.acme, h.twin["manifest"])
    signed = h.convert(h.ref("trust/app:1"), h.ref("trust/app:1-signed"),
                       config=h.config("cold-trusting", trust={"trust_store": [h.acme.root]}))
    assert [layer["origin"] for layer in signed["layers"]] == ["target", "target"]
    assert signed["layers_converted"] == 0 and signed["untrusted_images"] == []


# ---------------------------------------------------------------- traces


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    """Two small lazyfs images in the registry: (ref a, ref b)."""
    tmp = tmp_path_factory.mktemp("traced")
    refs = []
    for name, seed in (("a", 1), ("b", 2)):
        (tmp / f"{name}.img").write_bytes(os.urandom(1 << 20) + bytes([seed]) * (1 << 20))
        local = LocalRef(str(tmp / "layout"), name)
        trio.run(lambda: create_image(local, from_file=str(tmp / f"{name}.img"), chunk_size=64 << 10))
        ref = parse_reference(f"{registry.registry}/traced/{name}:1")

        async def push():
            async with ImageOpener(client_config(registry)) as opener:
                await push_image(opener, local, ref)

        trio.run(push)
        refs.append(str(ref))
    return refs


def host_config(tmp, registry, **extra) -> Config:
    return Config(cache_root=str(tmp / "cache"), writable_root=str(tmp / "w"), run_dir=str(tmp / "run"),
                  state_dir=str(tmp / "state"), registries=(RegistrySettings(registry.registry, plain_http=True),),
                  readahead_chunks=0, **extra)


def test_traces_are_published_only_when_the_config_says_so(registry, images, tmp_path):
    a, _ = images

    async def main(config):
        async with Host.open(config) as host:
            att = await host.attach(a)
            await att.device.read(0, 200_000)
            trace = dict(att.trace)
            await host.detach(att.name)
            found = await find_referrers_remote(host.opener.client, parse_reference(a).repo(),
                                                att.opened.image.manifest.digest, TRACE_TYPE)
            return trace, dict(att.trace), found, host.statistics()["traces"]

    before, after, found, counts = trio.run(main, host_config(tmp_path / "off", registry, trace_record_seconds=3600))
    assert not before.get("recording") and found == [] and counts["published"] == 0
    before, after, found, counts = trio.run(main, host_config(tmp_path / "on", registry, trace_record_seconds=3600,
                                                              trace_publish=True))
    assert before.get("recording") and after.get("saved") and len(found) == 1 and counts["published"] == 1


def test_a_trace_naming_chunks_not_in_the_image_is_ignored_and_counted(registry, images, tmp_path):
    a, b = images

    async def main():
        async with Host.open(host_config(tmp_path / "one", registry)) as host:
            att_a = await host.attach(a)
            att_b = await host.attach(b)
            own = [loc for meta, d in att_a.opened.image.layers for loc in meta.locations(d)][:6]
            other = [loc for meta, d in att_b.opened.image.layers for loc in meta.locations(d)][:3]
            bent = [own[0].__class__(own[0].digest, own[0].blob, own[0].offset + 1, own[0].compressed_length,
                                     own[0].raw_length, own[0].compression)]  # right digest, wrong place
            await save_trace(host.opener, att_a.opened, own)  # a good trace first ...
            await save_trace(host.opener, att_a.opened, own[:3] + other)  # ... then forged ones, newer
            await save_trace(host.opener, att_a.opened, own[:3] + bent)
            await save_trace(host.opener, att_b.opened, other + own[:2])  # b has only a forged trace
            await host.detach(att_a.name, save=False)
            await host.detach(att_b.name, save=False)
            return len(own)

    good = trio.run(main)

    async def second():
        async with Host.open(host_config(tmp_path / "two", registry, trace_replay=True)) as host:
            att_a = await host.attach(a)
            att_b = await host.attach(b)
            with trio.fail_after(60):
                while "chunks" not in att_a.trace:  # a's good trace replayed
                    await trio.sleep(0.05)
                await att_b.trace_lookup.wait()  # b's traces were looked at (the attach does not wait)
            return dict(att_a.trace), dict(att_b.trace), host.statistics()

    trace_a, trace_b, stats = trio.run(second)
    assert trace_a["replay"] == good and trace_a["chunks"] == good and trace_a["failed"] == 0
    assert trace_a["foreign_entries"] == 3 + 1  # the two newer forged traces were skipped and counted
    assert "replay" not in trace_b and trace_b["foreign_entries"] == 2
    assert stats["traces"]["rejected"] == 2 and stats["traces"]["foreign_entries"] == 6
    assert stats["traces"]["replayed"] == 1
