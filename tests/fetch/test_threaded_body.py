"""Blob range bodies read in worker threads (lazyfs/fetch/registry/threaded.py), against the real
docker-registry: plain, token auth, TLS; keep-alive reuse; and cancellation of a stalled body."""

from __future__ import annotations

import threading

import pytest
import trio

from lazyfs.fetch.credentials import Credentials
from lazyfs.fetch.registry import RegistryClient, RegistryConfig, RetryPolicy
from lazyfs.format.reference import parse_reference
from tests.fetch.test_registry import client_for, payload, ref, run
from tests.support.proxy import FaultProxy
from tests.support.registry import RegistryInfo, registry_fixture

pytestmark = [pytest.mark.registry, pytest.mark.timeout(300)]

registry = registry_fixture(name="threaded_registry")
token_registry = registry_fixture(auth="token", name="threaded_token_registry")
tls_registry = registry_fixture(tls=True, name="threaded_tls_registry")


async def _ranges(client: RegistryClient, target, digest: str, blob: bytes) -> None:
    for offset, length in [(0, 1), (12345, 67890), (len(blob) - 5, 5), (0, len(blob)), (4096, 3 << 20)]:
        assert await client.read_range(target, digest, offset, length) == blob[offset:offset + length]


@pytest.mark.parametrize("kind", ["plain", "token", "tls"])
def test_range_bodies_are_read_in_worker_threads(kind: str, request: pytest.FixtureRequest, tmp_path) -> None:
    """Every ranged GET goes through the thread pool (auth, TLS and all), its connections are
    kept alive and reused, and the bytes are right. Broken on purpose: `read_range_from` without
    the THREADED extension made `exchanges` stay 0 (red)."""
    info: RegistryInfo = request.getfixturevalue({"plain": "threaded_registry", "token": "threaded_token_registry",
                                                  "tls": "threaded_tls_registry"}[kind])
    blob = payload(4 << 20, seed=71)
    target = ref(info, f"threaded/{kind}")

    async def main() -> None:
        creds = Credentials(info.write_auth_file(tmp_path / "config.json")) if kind == "token" else None
        async with client_for(info, creds) as client:
            digest = (await client.push_blob(target, blob)).digest
            before = client.threaded.statistics()
            await _ranges(client, target, digest, blob)
            after = client.threaded.statistics()
            assert after["exchanges"] - before["exchanges"] >= 5
            assert after["reused"] - before["reused"] >= 3  # keep-alive: one connection does the sequence
            assert after["threads_done"] == after["exchanges"] and after["aborted"] == 0
        assert client.threaded.statistics()["idle"] == 0  # closed with the client

    run(main)


def test_a_cancelled_stalled_body_ends_its_thread(threaded_registry: RegistryInfo) -> None:
    """A body that stalls mid-way, its read cancelled: the trio side returns, and the worker's
    blocked recv is ended by the abort (outcome "aborted"), not by the 600 s socket timeout.
    Broken on purpose: `_Exchange.abort` without the `shutdown` left the thread blocked, the
    bounded wait below ran out with threads_done < exchanges (red)."""
    blob = payload(2 << 20, seed=72)

    async def main() -> None:
        async with FaultProxy(threaded_registry.port) as proxy, RegistryClient(
            [RegistryConfig(f"127.0.0.1:{proxy.port}", plain_http=True)], timeout=600,
            retry=RetryPolicy(attempts=1, deadline=600),
        ) as client:
            target = parse_reference(f"127.0.0.1:{proxy.port}/threaded/stall")
            digest = (await client.push_blob(target, blob)).digest
            headed = threading.Event()
            client.threaded.after_head = headed.set
            proxy.faults.stall(None, after=100_000, path=f"/blobs/{digest}", method="GET")
            before = client.threaded.statistics()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.read_range, target, digest, 0, len(blob))
                    assert await trio.to_thread.run_sync(headed.wait, 120)
                    scope.cancel()
            assert scope.cancelled_caught
            for _ in range(600):  # bounded: 60 s, far below the 600 s read timeout
                stats = client.threaded.statistics()
                if stats["threads_done"] == stats["exchanges"]:
                    break
                await trio.sleep(0.1)
            stats = client.threaded.statistics()
            assert stats["exchanges"] - before["exchanges"] == 1
            assert stats["threads_done"] == stats["exchanges"] and stats["aborted"] - before["aborted"] == 1
            proxy.faults.clear()
            client.threaded.after_head = None
            # The pool still works afterwards (the aborted connection was not pooled).
            assert await client.read_range(target, digest, 10, 1000) == blob[10:1010]

    run(main, timeout=240)
