"""The registry client against Debian's real docker-registry (plain, htpasswd, token, TLS)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from lazyfs.errors import AuthError, ConfigError, FetchError, IntegrityError, NotFoundError, RangeError
from lazyfs.fetch.backend import Backend
from lazyfs.fetch.credentials import Credential, Credentials
from lazyfs.fetch.registry import (
    SMALL_WHOLE_BLOB,
    RegistryBackend,
    RegistryClient,
    RegistryConfig,
    RetryPolicy,
)
from lazyfs.format.digest import digest_of
from lazyfs.format.oci import MEDIA_TYPE_MANIFEST
from lazyfs.format.reference import Reference, parse_reference
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryInfo, free_port, registry_fixture, write_auth_file

pytestmark = [pytest.mark.registry, pytest.mark.timeout(300)]

registry = registry_fixture()
mirror_registry = registry_fixture(name="mirror_registry")
basic_registry = registry_fixture(auth="htpasswd", name="basic_registry")
token_registry = registry_fixture(auth="token", name="token_registry", refresh_tokens={"refresh-abc": "lazyfs"})
tls_registry = registry_fixture(tls=True, name="tls_registry")
tls_token_registry = registry_fixture(auth="token", tls=True, name="tls_token_registry")

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, deadline=60)
RETRYING = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05, deadline=60)
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


def run(fn: Callable[[], Awaitable[object]], timeout: float = 120) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(main)


def payload(n: int, seed: int = 0) -> bytes:
    """*n* deterministic, incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


class Clock:
    """A hand-advanced monotonic clock for token expiry."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ref(info: RegistryInfo, path: str) -> Reference:
    return parse_reference(f"{info.registry}/{path}")


def client_for(info: RegistryInfo, credentials: Credentials | None = None, **kw) -> RegistryClient:
    kw.setdefault("retry", FAST)
    return RegistryClient(info.configs(), credentials, **kw)


def image(seed: int) -> tuple[bytes, bytes, bytes]:
    """(layer tar, config, manifest) of a tiny but real OCI image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = f"hello from image {seed}\n".encode()
        member = tarfile.TarInfo(f"hello-{seed}.txt")
        member.size, member.mtime = len(data), 0
        tar.addfile(member, io.BytesIO(data))
    layer = buf.getvalue()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [digest_of(layer)]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, "digest": digest_of(config), "size": len(config)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": digest_of(layer), "size": len(layer)}],
        },
        sort_keys=True,
    ).encode()
    return layer, config, manifest


async def push_image(client: RegistryClient, target: Reference, seed: int) -> tuple[bytes, str]:
    layer, config, manifest = image(seed)
    await client.push_blob(target, layer)
    await client.push_blob(target, config)
    digest = await client.put_manifest(target, manifest, MEDIA_TYPE_MANIFEST)
    return manifest, digest


def skopeo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["skopeo", *args], capture_output=True, timeout=120, check=True)


# --- plain registry ------------------------------------------------------------------------------


def test_push_monolithic_and_chunked(registry: RegistryInfo, tmp_path: Path) -> None:
    big = payload(3 * 1024 * 1024 + 17, seed=1)
    path = tmp_path / "blob"
    path.write_bytes(payload(1024 * 1024 + 5, seed=2))
    file_digest = digest_of(path.read_bytes())

    async def main() -> None:
        async with FaultProxy(registry.port) as proxy, RegistryClient(
            [RegistryConfig(f"127.0.0.1:{proxy.port}", plain_http=True)], retry=FAST
        ) as client:
            target = parse_reference(f"127.0.0.1:{proxy.port}/push/test")
            pushed = await client.push_blob(target, big)
            assert (pushed.digest, pushed.size, pushed.outcome) == (digest_of(big), len(big), "uploaded")
            assert proxy.count("PATCH") == 0 and proxy.count("PUT", r"/blobs/uploads/.*digest=") == 1
            assert (await client.push_blob(target, big)).outcome == "exists"

            chunked = await client.push_blob(target, path, chunk_size=256 * 1024)
            assert (chunked.digest, chunked.outcome) == (file_digest, "uploaded")
            assert proxy.count("PATCH") == 5  # 4 full chunks and a 5-byte tail
            # Chunked from bytes, and a file uploaded monolithically (streamed).
            other = payload(100_000, seed=3)
            assert (await client.push_blob(target, other, chunk_size=30_000)).outcome == "uploaded"
            second = tmp_path / "second"
            second.write_bytes(payload(200_000, seed=4))
            assert (await client.push_blob(target, second)).digest == digest_of(second.read_bytes())
            assert (await client.push_blob(target, b"")).digest == digest_of(b"")

            assert await client.get_blob(target, pushed.digest) == big
            assert await client.get_blob(target, file_digest) == path.read_bytes()
            assert await client.get_blob(target, digest_of(other)) == other
            assert await client.blob_size(target, chunked.digest) == path.stat().st_size
            assert await client.blob_size(target, digest_of(b"")) == 0
            dest = tmp_path / "out" / "blob"
            dest.parent.mkdir()
            assert await client.get_blob_to_file(target, chunked.digest, dest) == path.stat().st_size
            assert dest.read_bytes() == path.read_bytes()
            assert os.listdir(dest.parent) == ["blob"]

    run(main)


def test_push_wrong_digest_is_refused(registry: RegistryInfo) -> None:
    async def main() -> None:
        async with client_for(registry) as client:
            with pytest.raises(IntegrityError):
                await client.push_blob(ref(registry, "bad/digest"), b"some bytes", digest_of(b"other bytes"))
            with pytest.raises(NotFoundError):
                await client.blob_size(ref(registry, "bad/digest"), digest_of(b"other bytes"))

    run(main)


def test_manifest_by_tag_and_digest(registry: RegistryInfo) -> None:
    target = ref(registry, "images/hello:1")

    async def main() -> None:
        async with client_for(registry) as client:
            manifest, digest = await push_image(client, target, seed=1)
            assert digest == digest_of(manifest)
            data, media_type, got = await client.get_manifest(target)
            assert (data, media_type, got) == (manifest, MEDIA_TYPE_MANIFEST, digest)
            assert await client.get_manifest(target.with_tag(None).with_digest(digest)) == (manifest, MEDIA_TYPE_MANIFEST, digest)
            assert await client.get_manifest(f"{registry.registry}/images/hello@{digest}") == (
                manifest, MEDIA_TYPE_MANIFEST, digest)
            assert await client.head_manifest(target) == (MEDIA_TYPE_MANIFEST, digest, len(manifest))
            # Pushing by digest only, then tagging it too.
            assert await client.put_manifest(target.with_tag(None).with_digest(digest), manifest, MEDIA_TYPE_MANIFEST) == digest
            await client.put_manifest(target.with_tag("2"), manifest, MEDIA_TYPE_MANIFEST)
            with pytest.raises(IntegrityError):
                await client.put_manifest(target.with_digest("sha256:" + "0" * 64), manifest, MEDIA_TYPE_MANIFEST)
            for n in range(3, 8):
                await client.put_manifest(target.with_tag(f"v{n}"), manifest, MEDIA_TYPE_MANIFEST)
            tags = ["1", "2"] + [f"v{n}" for n in range(3, 8)]
            assert sorted(await client.list_tags(target)) == sorted(tags)
            assert sorted(await client.list_tags(target, page_size=2)) == sorted(tags)

    run(main)
    # Another implementation reads what we pushed, byte for byte.
    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{target}").stdout
    assert raw == image(1)[2]
    inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{target}").stdout)
    assert inspected["Digest"] == digest_of(raw)
    assert inspected["Os"] == "linux"


def test_reads_what_skopeo_copied(registry: RegistryInfo, tmp_path: Path) -> None:
    source, copy = ref(registry, "images/source:1"), ref(registry, "images/copied:1")

    async def push() -> None:
        async with client_for(registry) as client:
            await push_image(client, source, seed=7)

    run(push)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    skopeo("--policy", str(policy), "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
           f"docker://{source}", f"docker://{copy}")

    async def main() -> None:
        async with client_for(registry) as client:
            data, media_type, _ = await client.get_manifest(copy)
            doc = json.loads(data)
            assert doc["mediaType"] == media_type
            layer = doc["layers"][0]
            # skopeo compresses our uncompressed tar layer on the way: same content, new blob.
            blob = await client.get_blob(copy, layer["digest"])
            assert len(blob) == layer["size"]
            assert gzip.decompress(blob) == image(7)[0]
            assert await client.get_blob(copy, doc["config"]["digest"]) == image(7)[1]

    run(main)


def test_ranged_reads(registry: RegistryInfo) -> None:
    blob = payload(1_000_003, seed=5)
    target = ref(registry, "ranges/blob")

    async def main() -> None:
        async with client_for(registry) as client:
            digest = (await client.push_blob(target, blob)).digest
            backend = RegistryBackend(client, target)
            assert isinstance(backend, Backend)
            assert await backend.blob_size(digest) == len(blob)
            for offset, length in [(0, 1), (0, 4096), (12345, 67890), (len(blob) - 1, 1), (0, len(blob)),
                                   (999_000, 1003), (262_144, 262_144)]:
                assert await backend.read_range(digest, offset, length) == blob[offset : offset + length]
            assert await client.read_range(target, digest, 10, 0) == b""
            with pytest.raises(FetchError, match="beyond the end|not satisfiable"):
                await client.read_range(target, digest, len(blob) - 10, 20)
            with pytest.raises(FetchError):
                await client.read_range(target, digest, len(blob), 1)
            with pytest.raises(RangeError):
                await client.read_range(target, digest, -1, 1)
            before = client.statistics().requests
            async with trio.open_nursery() as nursery:  # concurrent reads share the pool
                results: dict[int, bytes] = {}

                async def read(i: int) -> None:
                    results[i] = await backend.read_range(digest, i * 4096, 4096)

                for i in range(32):
                    nursery.start_soon(read, i)
            assert all(results[i] == blob[i * 4096 : (i + 1) * 4096] for i in range(32))
            assert client.statistics().requests - before == 32

    run(main)


def test_cross_repository_mount(registry: RegistryInfo) -> None:
    blob = payload(50_000, seed=6)

    async def main() -> None:
        async with client_for(registry) as client:
            first = await client.push_blob(ref(registry, "mount/source"), blob)
            mounted = await client.push_blob(ref(registry, "mount/target"), blob, mount_from="mount/source")
            assert mounted.outcome == "mounted"
            assert await client.get_blob(ref(registry, "mount/target"), first.digest) == blob
            # A source that lacks the blob: the registry opens an upload session instead.
            other = payload(1000, seed=66)
            fallback = await client.push_blob(ref(registry, "mount/target2"), other, mount_from="mount/nothing")
            assert fallback.outcome == "uploaded"
            with pytest.raises(ConfigError):
                await client.push_blob(ref(registry, "mount/x"), other, mount_from="Bad Name")

    run(main)


def test_not_found(registry: RegistryInfo) -> None:
    missing = "sha256:" + "1" * 64

    async def main() -> None:
        async with client_for(registry) as client:
            await client.push_blob(ref(registry, "exists/repo"), b"x")
            with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN|not found"):
                await client.get_manifest(ref(registry, "exists/repo:nope"))
            with pytest.raises(NotFoundError):
                await client.get_manifest(ref(registry, f"exists/repo@{missing}"))
            with pytest.raises(NotFoundError):
                await client.head_manifest(ref(registry, "exists/repo:nope"))
            with pytest.raises(NotFoundError):
                await client.blob_size(ref(registry, "exists/repo"), missing)
            with pytest.raises(NotFoundError):
                await client.read_range(ref(registry, "exists/repo"), missing, 0, 10)
            with pytest.raises(NotFoundError):
                await client.get_blob(ref(registry, "never/pushed"), missing)
            with pytest.raises(NotFoundError):
                await client.list_tags(ref(registry, "never/pushed"))
            assert client.statistics().retries == 0

    run(main)


# --- faults: retries, truncation, corruption, deadlines -------------------------------------------


def test_retries_and_faults(registry: RegistryInfo, tmp_path: Path) -> None:
    blob = payload(300_000, seed=8)

    async def main() -> None:
        async with FaultProxy(registry.port) as proxy, RegistryClient(
            [RegistryConfig(f"127.0.0.1:{proxy.port}", plain_http=True)], retry=RETRYING
        ) as client:
            target = parse_reference(f"127.0.0.1:{proxy.port}/faults/blob:1")
            digest = (await client.push_blob(target, blob)).digest
            manifest, manifest_digest = await push_image(client, target, seed=8)
            blobs = rf"/blobs/{digest}"

            proxy.faults.fail(503, path=blobs, method="GET", count=2)
            proxy.reset_counters()
            retries = client.statistics().retries
            assert await client.read_range(target, digest, 100, 1000) == blob[100:1100]
            # Both 503s were answered and retried (a reused connection the peer closed
            # meanwhile could cost one more retry, never fewer).
            assert proxy.faults.active() == []
            assert client.statistics().retries - retries >= 2
            assert [r.status for r in proxy.requests("GET", blobs)][-3:] == [503, 503, 206]

            rule = proxy.faults.fail(500, path=blobs, method="GET")
            with pytest.raises(FetchError) as e:
                await client.read_range(target, digest, 0, 10)
            assert e.value.status == 500 and f"{RETRYING.attempts} attempts" in str(e.value)
            proxy.faults.remove(rule)

            proxy.faults.fail(404, path=blobs, method="HEAD", count=1)  # a 404 is final: no retry
            with pytest.raises(NotFoundError):
                await client.blob_size(target, digest)

            proxy.faults.truncate(after=500, path=blobs, count=1)
            assert await client.read_range(target, digest, 0, 5000) == blob[:5000]
            proxy.faults.reset(path=blobs, count=1)
            assert await client.read_range(target, digest, 7, 70) == blob[7:77]
            proxy.faults.fail(502, path="/manifests/", count=1)
            assert (await client.get_manifest(target))[0] == manifest

            proxy.faults.corrupt(offset=3, path=blobs, count=1)
            with pytest.raises(IntegrityError) as integrity:
                await client.get_blob(target, digest)
            assert integrity.value.source == f"127.0.0.1:{proxy.port}"
            proxy.faults.corrupt(offset=3, path=blobs, count=1)
            dest = tmp_path / "blob"
            with pytest.raises(IntegrityError):
                await client.get_blob_to_file(target, digest, dest)
            assert os.listdir(tmp_path) == []  # nothing half-written is left behind
            proxy.faults.corrupt(offset=0, path="/manifests/sha256:", count=1)
            with pytest.raises(IntegrityError):
                await client.get_manifest(target.with_tag(None).with_digest(manifest_digest))
            assert await client.get_blob(target, digest) == blob

        # A server that never answers: the per-call deadline ends it.
        async with FaultProxy(registry.port) as proxy, RegistryClient(
            [RegistryConfig(f"127.0.0.1:{proxy.port}", plain_http=True)],
            retry=RetryPolicy(attempts=3, base_delay=0.01, deadline=1.0),
        ) as client:
            proxy.faults.stall(None)
            with pytest.raises(FetchError, match="deadline"):
                await client.read_range(parse_reference(f"127.0.0.1:{proxy.port}/faults/blob"), digest, 0, 10)
            proxy.faults.clear()

        # Nobody listening at all: bounded retries, then FetchError.
        dead = f"127.0.0.1:{free_port()}"
        async with RegistryClient([RegistryConfig(dead, plain_http=True)], retry=FAST) as client:
            with pytest.raises(FetchError, match="cannot connect") as e:
                await client.blob_size(parse_reference(f"{dead}/x"), digest)
            assert client.statistics().retries == FAST.attempts - 1

    run(main)


class _RangeIgnoringHandler(http.server.BaseHTTPRequestHandler):
    """Serves one blob and ignores Range (as some servers and CDNs do), or lies about it."""

    protocol_version = "HTTP/1.1"
    blob = b""
    mode = "ignore"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        blob, status, headers = self.blob, 200, {}
        if self.mode == "wrong-range":
            status, blob = 206, self.blob[:10]
            headers["Content-Range"] = f"bytes 0-9/{len(self.blob)}"
        elif self.mode == "long":
            status = 206
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob)


@pytest.fixture
def range_ignoring_server() -> Iterator[tuple[str, type[_RangeIgnoringHandler]]]:
    handler = type("Handler", (_RangeIgnoringHandler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


def test_range_answer_checks(range_ignoring_server: tuple[str, type[_RangeIgnoringHandler]]) -> None:
    host, handler = range_ignoring_server
    handler.blob = payload(1000, seed=9)
    digest = digest_of(handler.blob)
    target = parse_reference(f"{host}/some/repo")

    async def main() -> None:
        async with RegistryClient([RegistryConfig(host, plain_http=True)], retry=FAST) as client:
            # A 200 is fine when it is exactly the range asked for (the whole blob), or when the
            # whole blob is small: the range is cut out of it.
            assert await client.read_range(target, digest, 0, 1000) == handler.blob
            assert await client.read_range(target, digest, 5, 100) == handler.blob[5:105]
            # A larger blob sent whole for a range is refused (the read goes elsewhere).
            big = handler.blob = payload(SMALL_WHOLE_BLOB + 1000, seed=9)
            with pytest.raises(FetchError, match="ignored the Range"):
                await client.read_range(target, digest_of(big), 0, 100)
            with pytest.raises(FetchError, match="ignored the Range"):
                await client.read_range(target, digest_of(big), 5, 100)
            handler.blob = payload(1000, seed=9)
            handler.mode = "wrong-range"
            with pytest.raises(FetchError, match="instead"):
                await client.read_range(target, digest, 100, 10)
            handler.mode = "long"
            with pytest.raises(FetchError, match="more than the 10"):
                await client.read_range(target, digest, 0, 10)

    run(main)


# --- mirrors ---------------------------------------------------------------------------------------


def test_mirrors(registry: RegistryInfo, mirror_registry: RegistryInfo) -> None:
    dead = f"127.0.0.1:{free_port()}"  # a mirror that is down
    only_on_mirror = payload(70_000, seed=10)
    only_on_origin = payload(60_000, seed=11)
    on_both = payload(50_000, seed=12)
    repo = "mirrored/app"

    async def main() -> None:
        async with client_for(mirror_registry) as m, client_for(registry) as o:
            await m.push_blob(ref(mirror_registry, repo), only_on_mirror)
            await o.push_blob(ref(registry, repo), only_on_origin)
            await m.push_blob(ref(mirror_registry, repo), on_both)
            await o.push_blob(ref(registry, repo), on_both)

        config = RegistryConfig(registry.registry, plain_http=True, mirrors=[dead, mirror_registry.registry])
        async with RegistryClient([config], retry=FAST) as client:
            backend = RegistryBackend(client, ref(registry, repo))
            assert backend.sources == (dead, mirror_registry.registry, registry.registry)

            got = await backend.read_range_from(digest_of(only_on_mirror), 1000, 5000)
            assert got.data == only_on_mirror[1000:6000] and got.source == mirror_registry.registry
            assert client.statistics().failovers >= 1 and client.statistics().retries == 0
            assert await backend.blob_size(digest_of(only_on_mirror)) == len(only_on_mirror)
            # The mirror lacks it (404): the origin serves it.
            got = await backend.read_range_from(digest_of(only_on_origin), 0, 100)
            assert got.data == only_on_origin[:100] and got.source == registry.registry
            assert await client.get_blob(ref(registry, repo), digest_of(only_on_origin)) == only_on_origin
            # "That range failed verification": exclude the source that served it.
            first = await backend.read_range_from(digest_of(on_both), 10, 10)
            assert first.source == mirror_registry.registry
            again = await backend.read_range_from(digest_of(on_both), 10, 10, exclude={first.source})
            assert again.source == registry.registry and again.data == on_both[10:20]
            with pytest.raises(FetchError, match="every source is excluded"):
                await backend.read_range(digest_of(on_both), 0, 1, exclude=set(backend.sources))
            # Manifests never go to mirrors.
            with pytest.raises(NotFoundError):
                await client.get_manifest(ref(registry, f"{repo}:latest"))

    run(main)


# --- Basic auth --------------------------------------------------------------------------------------


def test_basic_auth(basic_registry: RegistryInfo, tmp_path: Path) -> None:
    info = basic_registry
    target = ref(info, "basic/app:1")
    auth_file = info.write_auth_file(tmp_path / "config.json", style="plain")

    async def main() -> None:
        async with client_for(info, Credentials(auth_file)) as client:
            manifest, digest = await push_image(client, target, seed=20)
            assert (await client.get_manifest(target))[0] == manifest
            assert client.statistics().auth_challenges == 1  # later requests authenticate up front

        wrong = write_auth_file(tmp_path / "wrong.json", {info.registry: ("lazyfs", "not-the-password")})
        async with client_for(info, Credentials(wrong)) as client:
            with pytest.raises(AuthError) as e:
                await client.get_manifest(target)
            assert e.value.status == 401
            assert f"registry {info.registry} rejected the credentials of user 'lazyfs'" in str(e.value)
            assert str(wrong) in str(e.value)

        async with client_for(info, Credentials(tmp_path / "absent.json")) as client:
            with pytest.raises(AuthError, match="requires authentication and .*absent.json has no credentials"):
                await client.blob_size(target, digest_of(image(20)[0]))

        # Rotation: the same client picks up the new file content after a 401.
        rotating = write_auth_file(tmp_path / "rotating.json", {info.registry: ("lazyfs", "old-password")})
        creds = Credentials(rotating)
        async with client_for(info, creds) as client:
            with pytest.raises(AuthError):
                await client.get_manifest(target)
            info.write_auth_file(rotating)
            assert (await client.get_manifest(target))[0] == manifest
            assert client.statistics().credential_reloads >= 3

    run(main)
    skopeo("inspect", "--tls-verify=false", "--creds", f"{info.username}:{info.password}", f"docker://{target}")


# --- Bearer tokens ---------------------------------------------------------------------------------


def test_token_auth_and_cache(token_registry: RegistryInfo, tmp_path: Path) -> None:
    info = token_registry
    server = info.token_server
    assert server is not None
    target = ref(info, "token/app:1")
    auth_file = info.write_auth_file(tmp_path / "config.json")
    clock = Clock()
    blob = payload(40_000, seed=30)
    pull = ("repository:token/app:pull",)

    def tokens_for(scopes: tuple[str, ...]) -> int:
        return sum(1 for r in server.requests if r.scopes == scopes and r.status == 200)

    async def main() -> None:
        async with client_for(info, Credentials(auth_file), clock=clock) as client:
            digest = (await client.push_blob(target, blob)).digest
            await push_image(client, target, seed=30)
            assert all(r.username == "lazyfs" for r in server.requests)

            before = server.count()
            for i in range(10):
                assert await client.read_range(target, digest, i * 100, 100) == blob[i * 100 : i * 100 + 100]
            await client.get_manifest(target)
            assert server.count() - before == 1 and tokens_for(pull) == 1  # one token, reused

            server.expires_in = 30
            clock.now += 3600  # the first pull token (300 s) has expired: a new one is fetched
            await client.read_range(target, digest, 0, 10)
            assert tokens_for(pull) == 2
            clock.now += 20  # a 30 s token is still good after 20 s...
            await client.read_range(target, digest, 0, 10)
            assert tokens_for(pull) == 2
            clock.now += 20  # ...but not after 40 s
            await client.read_range(target, digest, 0, 10)
            assert tokens_for(pull) == 3
            server.expires_in = 300

            # Cross-repository mount needs push on the target and pull on the source in one token.
            mounted = await client.push_blob(ref(info, "token/other"), blob, mount_from="token/app")
            assert mounted.outcome == "mounted"
            assert tokens_for(("repository:token/other:pull,push", "repository:token/app:pull")) == 1

        # Concurrent first requests of a fresh client share one token fetch.
        async with client_for(info, Credentials(auth_file)) as client:
            before = tokens_for(pull)
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(client.read_range, target, digest, i, 1)
            assert tokens_for(pull) - before == 1

    run(main)


def test_token_auth_failures(token_registry: RegistryInfo, tmp_path: Path) -> None:
    info = token_registry
    server = info.token_server
    assert server is not None
    target = ref(info, "token/app:1")

    async def main() -> None:
        wrong = write_auth_file(tmp_path / "wrong.json", {info.registry: ("lazyfs", "nope")})
        async with client_for(info, Credentials(wrong)) as client:
            with pytest.raises(AuthError) as e:
                await client.get_manifest(target)
            assert f"token server {server.realm} refused user 'lazyfs'" in str(e.value)
            assert str(wrong) in str(e.value)

        async with client_for(info) as client:  # anonymous: the token carries no access
            with pytest.raises(AuthError, match="refused the token issued for anonymous access"):
                await client.list_tags(target)

    run(main)


def test_token_auth_over_tls(tls_token_registry: RegistryInfo, tmp_path: Path) -> None:
    info = tls_token_registry
    target = ref(info, "secure/app:1")
    creds = Credentials(info.write_auth_file(tmp_path / "config.json"))

    async def main() -> None:
        async with RegistryClient(info.configs(), creds, retry=FAST) as client:
            manifest, _ = await push_image(client, target, seed=50)
            assert (await client.get_manifest(target))[0] == manifest
        # The registry is HTTPS but its token realm is plain HTTP: credentials go there only
        # when that host is configured as plain HTTP (info.configs() does; config() alone not).
        async with RegistryClient([info.config()], creds, retry=FAST) as client:
            with pytest.raises(AuthError, match="plain-HTTP token realm"):
                await client.list_tags(target)

    run(main)


def test_identity_token(token_registry: RegistryInfo) -> None:
    info = token_registry
    server = info.token_server
    assert server is not None
    target = ref(info, "token/identity")
    creds = Credentials(None, entries={info.registry: Credential("", "", identity_token="refresh-abc")})

    async def main() -> None:
        async with client_for(info, creds) as client:
            pushed = await client.push_blob(target, b"identity token blob")
            assert await client.get_blob(target, pushed.digest) == b"identity token blob"
        assert any(r.method == "POST" and r.username == "lazyfs" and r.status == 200 for r in server.requests)

        bad = Credentials(None, entries={info.registry: Credential("", "", identity_token="revoked")})
        async with client_for(info, bad) as client:
            with pytest.raises(AuthError, match="token server"):
                await client.blob_size(target, digest_of(b"identity token blob"))

    run(main)


# --- TLS ---------------------------------------------------------------------------------------------


def test_tls(tls_registry: RegistryInfo) -> None:
    info = tls_registry
    assert info.url.startswith("https://") and info.ca_file is not None
    target = ref(info, "tls/app:1")

    async def main() -> None:
        async with client_for(info) as client:
            manifest, _ = await push_image(client, target, seed=40)
            assert (await client.get_manifest(target))[0] == manifest
            layer = image(40)[0]
            assert await client.read_range(target, digest_of(layer), 0, 100) == layer[:100]

        async with RegistryClient([RegistryConfig(info.registry)], retry=FAST) as client:  # system CAs only
            with pytest.raises(FetchError, match="TLS certificate verification failed") as e:
                await client.get_manifest(target)
            assert not isinstance(e.value, AuthError)
            assert client.statistics().retries == 0  # retrying cannot fix a certificate

        with pytest.raises(ConfigError, match="ca_file"):
            RegistryClient([RegistryConfig(info.registry, ca_file=str(info.root / "missing.pem"))])

    run(main)
    ca_dir = info.root.parent / "skopeo-certs"
    ca_dir.mkdir(exist_ok=True)
    shutil.copy(info.ca_file, ca_dir / "ca.crt")
    raw = skopeo("inspect", "--cert-dir", str(ca_dir), "--raw", f"docker://{target}").stdout
    assert raw == image(40)[2]


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        RegistryConfig("not a host")
    with pytest.raises(ConfigError):
        RegistryConfig("127.0.0.1:5000", mirrors=["bad host"])
    with pytest.raises(ConfigError):
        RegistryClient([RegistryConfig("a:1"), RegistryConfig("a:1")])
    with pytest.raises(ConfigError):
        RetryPolicy(attempts=0)
    config = RegistryConfig("h:1", ca_file=None, mirrors=["http://m:2", "n:3"])
    assert config.mirrors == ("http://m:2", "n:3")  # a list becomes a tuple: the value stays hashable

    async def main() -> None:
        async with RegistryClient([config, RegistryConfig("n:3", plain_http=True)]) as client:
            assert client.sources("h:1") == ("m:2", "n:3", "h:1")
            assert client.config_for("m:2").plain_http  # from its http:// prefix
            assert client.config_for("n:3").plain_http  # its own config wins
            assert not client.config_for("h:1").plain_http  # TLS by default
            assert not client.config_for("elsewhere.example.com").plain_http

    run(main)


# --- credential helpers ------------------------------------------------------------------------------

HELPER_SCRIPT = """#!/bin/sh
# docker-credential-lazyfstest: docker's credential helper protocol, answering for one registry
[ "$1" = get ] || exit 2
read server
echo "asked for $server" >> "{log}"
if [ "$server" = "{registry}" ]; then
  printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}' "$server"
else
  echo "credentials not found in native keychain"; exit 1
fi
"""


def install_helper(directory: Path, registry: str, user: str, secret: str) -> tuple[Path, Path]:
    """docker-credential-lazyfstest in *directory*/bin and its call log."""
    bindir = directory / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    log = directory / "helper.log"
    script = bindir / "docker-credential-lazyfstest"
    script.write_text(HELPER_SCRIPT.format(log=log, registry=registry, user=user, secret=secret))
    script.chmod(0o755)
    return bindir, log


def test_credential_helper(basic_registry: RegistryInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = basic_registry
    bindir, log = install_helper(tmp_path, info.registry, info.username, info.password)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {info.registry: {}}, "credsStore": "lazyfstest"}))
    target = ref(info, "helped/app:1")

    async def main() -> None:
        async with client_for(info, Credentials(config)) as client:
            manifest, _ = await push_image(client, target, seed=60)
            assert (await client.get_manifest(target))[0] == manifest
        assert log.read_text().split() == ["asked", "for", info.registry]  # asked once, then cached
        config.write_text(json.dumps({"credHelpers": {"elsewhere.test": "lazyfstest"}}))  # no helper for us now
        async with client_for(info, Credentials(config)) as client:
            with pytest.raises(AuthError, match="has no credentials"):
                await client.get_manifest(target)

    run(main)


# --- proxies -----------------------------------------------------------------------------------------

PROXIED_NAME = "lazyfs-registry.test"  # resolvable only through the proxy
proxied_registry = registry_fixture(tls=True, name="proxied_registry", tls_hosts=(PROXIED_NAME, "127.0.0.1"))


def test_https_proxy_carries_the_traffic(proxied_registry: RegistryInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    from lazyfs.config import Config, RegistrySettings
    from lazyfs.image.remote import make_client
    from tests.support.httpproxy import ForwardProxy

    info = proxied_registry
    name = f"{PROXIED_NAME}:{info.port}"
    config = Config(registries=(RegistrySettings(name, ca_file=str(info.ca_file)),), fetch_deadline=20)
    blob = payload(100_000, seed=70)
    for var in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    async def main() -> None:
        with ForwardProxy({PROXIED_NAME: "127.0.0.1"}) as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            async with make_client(config) as client:
                target = parse_reference(f"{name}/proxied/app")
                digest = (await client.push_blob(target, blob)).digest
                assert await client.read_range(target, digest, 10, 1000) == blob[10:1010]
            assert proxy.count("CONNECT") >= 1
            assert {t for _, t in proxy.requests} == {name}
            monkeypatch.setenv("NO_PROXY", f"other.test,{PROXIED_NAME}")
            seen = len(proxy.requests)
            async with make_client(config) as client:  # direct: the name does not resolve here
                with pytest.raises(FetchError, match="cannot connect"):
                    await client.blob_size(parse_reference(f"{name}/proxied/app"), digest)
            assert len(proxy.requests) == seen

    run(main)


# --- client certificates (mTLS) ---------------------------------------------------------------------

mtls_registry = registry_fixture(tls=True, client_certs=True, name="mtls_registry")


def test_client_certificates(mtls_registry: RegistryInfo) -> None:
    info = mtls_registry
    assert info.pki is not None
    target = ref(info, "mtls/app:1")

    async def main() -> None:
        with_cert = info.config(client_cert=str(info.pki.client_cert_file), client_key=str(info.pki.client_key_file))
        async with RegistryClient([with_cert], retry=FAST) as client:
            manifest, _ = await push_image(client, target, seed=80)
            assert (await client.get_manifest(target))[0] == manifest
        async with RegistryClient([info.config()], retry=FAST) as client:
            with pytest.raises(FetchError, match="client certificate") as e:
                await client.get_manifest(target)
            assert not isinstance(e.value, AuthError) and client.statistics().retries == 0
        with pytest.raises(ConfigError, match="client_cert"):
            RegistryClient([info.config(client_cert=str(info.pki.ca_file))])  # a certificate without its key

    run(main)


# --- containerd hosts.toml, pull-through mirrors, health and failover --------------------------------


def write_hosts_toml(certs: Path, registry: str, server: str, hosts: list[tuple[str, str]]) -> None:
    directory = certs / registry
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f'server = "{server}"', ""]
    for url, extra in hosts:
        lines += [f'[host."{url}"]', '  capabilities = ["pull", "resolve"]', extra, ""]
    (directory / "hosts.toml").write_text("\n".join(lines))


def test_hosts_toml_mirrors_are_used_and_fail_over_both_ways(registry: RegistryInfo, tmp_path: Path) -> None:
    from lazyfs.config import Config
    from lazyfs.image.remote import make_client
    from tests.support.registry import running_registry

    blob = payload(1_500_000, seed=90)  # more than SMALL_WHOLE_BLOB: a cold mirror's whole answer is not taken
    small = payload(200_000, seed=91)  # at most SMALL_WHOLE_BLOB: it is
    with running_registry(tmp_path / "mirror", proxy_remote=registry.url) as mirror, \
            FaultProxy.running_in_thread(mirror.port) as m1, FaultProxy.running_in_thread(mirror.port) as m2, \
            FaultProxy.running_in_thread(registry.port) as origin:
        name = f"127.0.0.1:{origin.port}"
        certs = tmp_path / "certs.d"
        write_hosts_toml(certs, name, f"http://{name}",
                         [(f"http://127.0.0.1:{m1.port}", ""), (f"http://127.0.0.1:{m2.port}", "")])
        target = parse_reference(f"{name}/mirrored/app:1")

        async def main() -> None:
            async with client_for(registry) as direct:
                digest = (await direct.push_blob(ref(registry, "mirrored/app"), blob)).digest
                small_digest = (await direct.push_blob(ref(registry, "mirrored/app"), small)).digest
                await push_image(direct, ref(registry, "mirrored/app:1"), seed=90)
            config = Config(hosts_dir=str(certs), fetch_deadline=30)
            async with make_client(config) as client:
                backend = RegistryBackend(client, target)
                assert backend.sources == (f"127.0.0.1:{m1.port}", f"127.0.0.1:{m2.port}", name)
                # the first mirror resolves the tag and serves the blob, pulling through from the origin
                data, _, _ = await client.get_manifest(target)
                # A cold pull-through mirror answers a ranged GET with the whole blob (HTTP 200) while
                # it fills its cache: that read goes to the next source, and the mirror stays up.
                got = await backend.read_range_from(digest, 100, 5000)
                assert got.data == blob[100:5100] and got.source != f"127.0.0.1:{m1.port}"
                assert [r.status for r in m1.requests("GET", "/blobs/")] == [200]
                assert client.statistics().source(f"127.0.0.1:{m1.port}").errors == 0
                # The first mirror address is now cold for that blob: its next reads ask the others
                # first, not the mirror that may still be pulling it from upstream.
                assert client.statistics().source(f"127.0.0.1:{m1.port}").cold == 1
                m1.reset_counters()
                assert (await backend.read_range_from(digest, 0, 10)).source != f"127.0.0.1:{m1.port}"
                assert m1.count("GET", "/blobs/") == 0
                # A small blob's whole answer is taken and cut to the range.
                got = await backend.read_range_from(small_digest, 1000, 300)
                assert got.data == small[1000:1300] and got.source == f"127.0.0.1:{m1.port}"
                assert [r.status for r in m1.requests("GET", "/blobs/")] == [200]
                # A whole-blob read through the mirror (m1 or m2: one mirror at two addresses) fills
                # it; then it serves ranges, and the origin is not asked.
                m1.reset_counters()
                m2.reset_counters()
                assert await client.get_blob(target, digest) == blob
                assert m1.count("GET", "/blobs/") + m2.count("GET", "/blobs/") == 1
                m1.reset_counters()
                m2.reset_counters()
                origin.reset_counters()
                got = await backend.read_range_from(digest, 100, 5000)
                assert got.data == blob[100:5100] and got.source in (f"127.0.0.1:{m1.port}", f"127.0.0.1:{m2.port}")
                assert [r.status for r in m1.requests("GET", "/blobs/") + m2.requests("GET", "/blobs/")] == [206]
                assert origin.count("GET", "/blobs/") == 0 and origin.count("GET", "/manifests/") == 0

                # mirror -> next mirror -> origin (the small blob: no mirror address is cold for it)
                m1.faults.fail(503, count=None)
                assert (await backend.read_range_from(small_digest, 0, 100)).source == f"127.0.0.1:{m2.port}"
                m2.faults.fail(503, count=None)
                for _ in range(3):
                    assert (await backend.read_range_from(small_digest, 0, 100)).source == name
                stats = client.statistics()
                assert stats.source(f"127.0.0.1:{m1.port}").state == "down"
                assert stats.source(f"127.0.0.1:{m2.port}").state == "down"
                assert stats.source(name).state == "up" and stats.source(name).bytes >= 300
                # origin -> another mirror: the origin fails while the second mirror is back
                m2.faults.clear()
                origin.faults.fail(503, path="/blobs/", count=None)
                got = await backend.read_range_from(small_digest, 0, 100)
                assert got.source == f"127.0.0.1:{m2.port}" and got.data == small[:100]
                assert client.statistics().source(f"127.0.0.1:{m2.port}").state == "up"
                origin.faults.clear()
                m1.faults.clear()
                states = await client.probe_sources(name)
                assert set(states.values()) == {"up"}

                # a reload with another mirror list: the dropped mirror is no longer asked
                (certs / name / "hosts.toml").unlink()
                write_hosts_toml(certs, name, f"http://{name}", [(f"http://127.0.0.1:{m2.port}", "")])
                from lazyfs.image.remote import reload_registries

                await reload_registries(client, config)
                assert backend.sources == (f"127.0.0.1:{m2.port}", name)
                m1.reset_counters()
                await backend.read_range(digest, 0, 10)
                assert m1.count("GET", "/blobs/") == 0
                assert client.statistics().source(f"127.0.0.1:{m1.port}") is None
                assert client.statistics().reloads == 1

        run(main)


def test_tls_settings_from_hosts_toml(mtls_registry: RegistryInfo, tmp_path: Path) -> None:
    from lazyfs.fetch.registry.certsd import load_hosts_dir

    info = mtls_registry
    assert info.pki is not None
    certs = tmp_path / "certs.d"
    host_dir = certs / f"127.0.0.1_{info.port}_"  # containerd's spelling of host:port
    host_dir.mkdir(parents=True)
    for f in (info.pki.ca_file, info.pki.client_cert_file, info.pki.client_key_file):
        shutil.copy(f, host_dir / f.name)
    (host_dir / "hosts.toml").write_text(
        f'server = "https://{info.registry}"\nca = "ca.crt"\nclient = [["client.cert", "client.key"]]\n')
    target = ref(info, "hoststoml/app:1")

    async def main() -> None:
        async with RegistryClient(hosts=load_hosts_dir(certs), retry=FAST) as client:
            manifest, _ = await push_image(client, target, seed=91)
            assert (await client.get_manifest(target))[0] == manifest
        # docker's legacy layout (no hosts.toml): *.crt CAs, *.cert + *.key client pairs
        (host_dir / "hosts.toml").unlink()
        async with RegistryClient(hosts=load_hosts_dir(certs), retry=FAST) as client:
            assert (await client.get_manifest(target))[0] == manifest
        (host_dir / "client.cert").unlink()
        async with RegistryClient(hosts=load_hosts_dir(certs), retry=FAST) as client:
            with pytest.raises(FetchError, match="client certificate"):
                await client.get_manifest(target)

    run(main)


@pytest.mark.fuse
def test_daemon_uses_a_credential_helper_and_never_logs_its_secret(basic_registry: RegistryInfo,
                                                                    tmp_path: Path) -> None:
    """A real daemon (debug logging) reads an image from a password-protected registry with the
    password coming from a credential helper; afterwards its log holds no trace of the secret."""
    import base64
    import random
    import sys

    from lazyfs.config import Config, RegistrySettings
    from lazyfs.image.local import create_image
    from lazyfs.image.ref import LocalRef
    from lazyfs.image.remote import ImageOpener, push_image as push_local
    from tests.support.cleanup import release_under

    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this host")
    info = basic_registry
    bindir, helper_log = install_helper(tmp_path, info.registry, info.username, info.password)
    docker_config = tmp_path / "docker.json"
    docker_config.write_text(json.dumps({"credsStore": "lazyfstest"}))
    raw = random.Random(3).randbytes(1 << 20)
    (tmp_path / "disk.raw").write_bytes(raw)
    local = LocalRef(str(tmp_path / "layout"), "v1")
    trio.run(lambda: create_image(local, from_file=str(tmp_path / "disk.raw"), chunk_size=64 << 10))
    image = f"{info.registry}/secret/disk:v1"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    os.environ["PATH"] = env["PATH"]
    try:
        async def push() -> None:
            config = Config(registries=(RegistrySettings(info.registry, plain_http=True),),
                            credentials=str(docker_config))
            async with ImageOpener(config) as opener:
                await push_local(opener, local, parse_reference(image))

        trio.run(push)
    finally:
        os.environ["PATH"] = env["PATH"].removeprefix(f"{bindir}:")
    run_dir = tmp_path / "run"
    config_path = tmp_path / "lazyfs.toml"
    config_path.write_text(
        f'run_dir = "{run_dir}"\nstate_dir = "{tmp_path / "state"}"\ncache_root = "{tmp_path / "cache"}"\n'
        f'writable_root = "{tmp_path / "writable"}"\ncredentials = "{docker_config}"\nlog_level = "debug"\n'
        f'trace_record_seconds = 0\n\n[[registries]]\nhost = "{info.registry}"\nplain_http = true\n')
    export = tmp_path / "export"
    export.mkdir()
    root = Path(__file__).resolve().parents[2]

    def lazyfs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", str(config_path)],
                              capture_output=True, text=True, cwd=root, env=env, timeout=120)

    helper_log.write_text("")  # from here on, what the daemon asks
    try:
        done = lazyfs("export", image, str(export))
        assert done.returncode == 0, done.stderr
        with open(export / "disk.img", "rb") as f:
            assert f.read(len(raw)) == raw
        assert lazyfs("umount", str(export)).returncode == 0
    finally:
        release_under(tmp_path, str(run_dir / "lazyfs.sock"))
    daemon_log = (run_dir / "daemon.log").read_text()
    assert "DEBUG" in daemon_log  # the log is verbose...
    secrets = [info.password, base64.b64encode(f"{info.username}:{info.password}".encode()).decode()]
    assert not any(s in daemon_log for s in secrets)  # ...and still holds no secret
    assert f"asked for {info.registry}" in helper_log.read_text()
