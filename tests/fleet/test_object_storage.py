"""Object storage behind the registry: docker-registry's S3 driver on Ceph's radosgw (a real
single-node cluster started by scripts/radosgw.sh). Blob GETs are redirected to presigned URLs;
lazyfs follows them with ranged GETs, sends no credentials there, and verifies what it gets."""

from __future__ import annotations

import base64
import http.client
import os

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.errors import IntegrityError
from lazyfs.fetch.credentials import Credentials
from lazyfs.fetch.registry import RegistryClient, RegistryConfig, RetryPolicy
from lazyfs.format.layer import parse_blob
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image, flatten_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.serve.host import Host
from tests.image.test_local import make_busybox_tree
from tests.support.proxy import FaultProxy
from tests.support.registry import running_registry, write_auth_file
from tests.support.s3 import running_radosgw

pytestmark = [pytest.mark.registry, pytest.mark.slow, pytest.mark.timeout(600)]
FAST = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05, deadline=60)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with running_radosgw(tmp_path_factory.mktemp("ceph") / "cluster") as info:
        yield info


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    """Registry A on S3 (Basic auth, redirects to presigned URLs through a recording proxy in front
    of radosgw) and registry B on a filesystem, both anonymous to nobody but A's user."""
    tmp = tmp_path_factory.mktemp("stores")
    with FaultProxy.running_in_thread(s3.port) as gateway, \
            running_registry(tmp / "a", auth="htpasswd", storage_driver=s3.registry_storage("reg-a", gateway.url)) as a, \
            running_registry(tmp / "b") as b:
        auth = write_auth_file(tmp / "auth.json", {a.registry: (a.username, a.password)})
        yield a, b, gateway, auth


def run(fn, timeout=240):
    async def main():
        with trio.fail_after(timeout):
            return await fn()

    return trio.run(main)


def test_ranged_reads_follow_the_redirect_and_keep_credentials_home(stores):
    a, b, gateway, auth = stores
    blob = os.urandom(7 << 20)  # several S3 multipart parts (chunksize 5 MiB)
    repo_a, repo_b = parse_reference(f"{a.registry}/s3/blob"), parse_reference(f"{b.registry}/s3/blob")

    async def main():
        creds = Credentials(str(auth))
        async with RegistryClient([RegistryConfig(a.registry, plain_http=True)], creds, retry=FAST) as ca, \
                RegistryClient([RegistryConfig(b.registry, plain_http=True)], retry=FAST) as cb:
            digest = (await ca.push_blob(repo_a, blob)).digest
            await cb.push_blob(repo_b, blob)
            gateway.reset_counters()
            offset, length = (5 << 20) - 1000, 300_000  # across a part boundary
            assert await ca.read_range(repo_a, digest, offset, length) == blob[offset:offset + length]
            assert await ca.blob_size(repo_a, digest) == len(blob)
            whole = await ca.get_blob(repo_a, digest)
            assert whole == await cb.get_blob(repo_b, digest) == blob  # through S3 == read directly
            return digest

    digest = run(main)
    # The gateway also carries the registry's own S3 calls (signed in their Authorization header);
    # the client's are the presigned ones.
    seen = [r for r in gateway.requests() if "X-Amz-Signature=" in r.target]
    assert [r.method for r in seen] == ["GET", "HEAD", "GET"]
    assert seen[0].range == f"bytes={(5 << 20) - 1000}-{(5 << 20) - 1000 + 300_000 - 1}" and seen[0].status == 206
    assert seen[0].body_bytes == 300_000 and seen[2].status == 200 and seen[2].body_bytes == len(blob)
    assert not any(r.authorization for r in seen), "registry credentials were sent to the object store"

    # The registry really redirects (and wants the credentials the client did send it).
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
    basic = base64.b64encode(f"{a.username}:{a.password}".encode()).decode()
    conn.request("GET", f"/v2/s3/blob/blobs/{digest}", headers={"Authorization": f"Basic {basic}"})
    answer = conn.getresponse()
    assert answer.status == 307 and answer.getheader("Location").startswith(gateway.url)
    conn.close()


def test_a_tampered_object_is_caught_and_failed_over(stores, s3, tmp_path):
    """A flipped byte in the bucket: the chunk fails its blake3, the S3-backed source is excluded and
    taken down, and the bytes come from the other registry; a whole-blob read via S3 alone fails."""
    a, b, gateway, auth = stores
    src = tmp_path / "src"
    make_busybox_tree(str(src))
    local = LocalRef(str(tmp_path / "layout"), "v1")
    run(lambda: create_image(local, from_dir=str(src)))
    flat = str(tmp_path / "flat.img")
    run(lambda: flatten_image(local, flat))
    config = Config(run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"),
                    cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "w"),
                    credentials=str(auth), trace_record_seconds=0, trace_replay=False, readahead_chunks=0,
                    registries=(RegistrySettings(a.registry, plain_http=True),
                                RegistrySettings(b.registry, plain_http=True, mirrors=(f"http://{a.registry}",))))

    async def push():
        async with ImageOpener(config) as opener:
            await push_image(opener, local, parse_reference(f"{a.registry}/s3/busybox:v1"))
            await push_image(opener, local, parse_reference(f"{b.registry}/s3/busybox:v1"))

    run(push)
    with open(os.path.join(local.path, "index.json")) as f:
        import json
        manifest_digest = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(local.path, "blobs", *manifest_digest.split(":"))) as f:
        layer = json.load(f)["layers"][0]["digest"]
    bucket = s3.client()
    key = s3.blob_key(layer)
    original = bucket.get_object(Bucket="reg-a", Key=key)["Body"].read()
    _, meta = parse_blob(original)
    chunk = max(meta.chunks, key=lambda c: c.compressed_length)
    tampered = bytearray(original)
    tampered[chunk.offset + chunk.compressed_length // 2] ^= 0x40
    bucket.put_object(Bucket="reg-a", Key=key, Body=bytes(tampered))

    async def read_everything():
        async with Host.open(config) as host:
            att = await host.attach(f"{b.registry}/s3/busybox:v1", "tampered")
            device = att.device
            data = bytearray()
            for offset in range(0, device.size, 1 << 20):
                data += await device.read(offset, min(1 << 20, device.size - offset))
            return bytes(data), host.scheduler.statistics(), host.registry_statistics()

    gateway.reset_counters()
    data, sched, registry = run(read_everything)
    with open(flat, "rb") as f:
        assert data == f.read(), "the merged device differs from the image"
    assert gateway.count("GET", "X-Amz-Signature=") > 0  # the S3 path was used
    assert sched["integrity_failures"] >= 1
    by_host = {s["host"]: s for s in registry["sources"]}
    assert by_host[a.registry]["bad_bytes"] >= 1 and by_host[a.registry]["state"] == "down"
    assert by_host[b.registry]["bytes"] >= chunk.compressed_length

    async def whole_via_s3_only():
        async with RegistryClient([RegistryConfig(a.registry, plain_http=True)], Credentials(str(auth)),
                                  retry=FAST) as ca:
            await ca.get_blob(f"{a.registry}/s3/busybox", layer)

    with pytest.raises(IntegrityError):
        run(whole_via_s3_only)
    bucket.put_object(Bucket="reg-a", Key=key, Body=original)
