"""Host.opener_for: a request's plain-HTTP registries get a client of their own."""

import trio

from lazyfs.config import Config, RegistrySettings
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
