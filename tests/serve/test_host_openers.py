"""Host.opener_for: a request's plain-HTTP registries get a client of their own."""

import pytest
import trio
import trio.testing

from lazyfs.config import Config, RegistrySettings
from lazyfs.errors import LazyfsError
from lazyfs.serve.host import Host


def test_one_requests_plain_http_never_downgrades_the_shared_client(tmp_path):
    config = Config(cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "writable"),
                    registries=(RegistrySettings("mirrored:1", mirrors=("m:2",)), RegistrySettings("plain:3", plain_http=True)))

    async def main():
        async with Host.open(config) as host:
            plain = host.opener_for(["a:1", "mirrored:1"])
            assert plain is not host.opener
            assert plain.client.config_for("a:1").plain_http and plain.client.config_for("mirrored:1").plain_http
            assert tuple(plain.client.config_for("mirrored:1").mirrors) == ("m:2",)  # its other settings kept
            assert not host.opener.client.config_for("a:1").plain_http  # the shared client still speaks TLS
            assert not host.opener.client.config_for("mirrored:1").plain_http
            assert host.opener_for(["mirrored:1", "a:1", "a:1"]) is plain  # one client per set of hosts
            assert host.opener_for(["plain:3"]) is host.opener  # the config says so already
            assert host.opener_for([]) is host.opener

    trio.run(main)


@pytest.mark.registry
def test_an_extra_registry_client_is_closed_with_the_last_attachment_using_it(env, tmp_path):
    """A request's plain-HTTP client lives as long as an attachment (or an attach, a commit) uses it.

    Broken on purpose once (2026-12-06): without the ``_close_if_unused`` call in ``Host.detach``,
    ``registry_clients`` stayed at 1 after the last detach and this test went red.
    """
    host_port = env.registry.registry
    config = Config(cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "writable"),
                    trace_record_seconds=0)  # no registry in the config: plain HTTP comes with each request

    async def metadata_kept(host):
        # each attach keeps its image's config and looks for its startup trace in the background,
        # through the same client (uses of their own): wait for those to start, then to end, so the
        # detach below is what must close the client
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3000):
            if not host._opener_leases:
                return
            await trio.sleep(0.01)
        raise AssertionError(f"background uses of registry clients never ended: {host._opener_leases}")

    async def main():
        async with Host.open(config) as host:
            assert host.open_registry_clients() == 0
            await host.attach(env.ref, "a", plain_http=[host_port])
            await host.attach(env.ref, "b", plain_http=[host_port])
            assert host.open_registry_clients() == 1  # one client for both: the same set of hosts
            assert host.statistics()["registry_clients"] == 1
            await metadata_kept(host)
            await host.detach("a")
            assert host.open_registry_clients() == 1  # b still reads through it
            await host.detach("b")
            assert host.open_registry_clients() == 0
            assert set(host._openers) == {()}
            # a failed attach does not leave its client behind either
            with pytest.raises(LazyfsError):
                await host.attach(f"{host_port}/serve/none:v1", "c", plain_http=[host_port])
            assert host.open_registry_clients() == 0 and set(host._openers) == {()}
            # attached again: a new client, closed again at shutdown
            await host.attach(env.ref, "d", plain_http=[host_port])
            assert host.open_registry_clients() == 1
            await metadata_kept(host)
            opener = host._openers[(host_port,)]
        assert opener.existing_client is None

    trio.run(main)


def test_the_registry_client_is_made_at_start(tmp_path, caplog):
    """A host whose config lists registries makes its client when it starts, so the first attach does
    not wait for hosts.toml and CA certificates to be read (BENCHMARKS.md, issue 14). One that cannot
    be made is logged, and left to the first attach to report."""
    good = Config(cache_root=str(tmp_path / "a" / "cache"), writable_root=str(tmp_path / "a" / "writable"),
                  registries=(RegistrySettings("r:1", plain_http=True),))
    bad = Config(cache_root=str(tmp_path / "b" / "cache"), writable_root=str(tmp_path / "b" / "writable"),
                 registries=(RegistrySettings("r:1", ca_file=str(tmp_path / "missing.pem")),))

    def logged() -> bool:
        return any("first attach tries again" in r.getMessage() and "missing.pem" in r.getMessage()
                   for r in caplog.records)

    async def main():
        async with Host.open(good) as host:
            with trio.fail_after(30):  # made in a worker thread
                while not host.open_registry_clients():
                    await trio.sleep(0.01)
        async with Host.open(bad) as host:
            with trio.fail_after(30):
                while not logged():
                    await trio.sleep(0.01)
            assert host.open_registry_clients() == 0
            with pytest.raises(LazyfsError, match="missing.pem"):
                await host.attach("r:1/some/image:v1")

    trio.run(main)
