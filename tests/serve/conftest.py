"""Shared by the serve tests: a registry with a pushed busybox image, and a lazyfs config of their own."""

import json
import os

import pytest
import trio

from lazyfs.config import Config, RegistrySettings
from lazyfs.format.reference import parse_reference
from lazyfs.image.local import create_image, flatten_image
from lazyfs.image.ref import LocalRef
from lazyfs.image.remote import ImageOpener, push_image
from lazyfs.serve import system
from lazyfs.serve.control import call
from tests.support.cli import run_lazyfs
from tests.support.cleanup import loops_under, release_under
from tests.support.registry import registry_fixture
from tests.image.test_local import make_busybox_tree

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
registry = registry_fixture()


class Env:
    def __init__(self, tmp, registry):
        self.tmp = tmp
        self.registry = registry
        self.config_path = str(tmp / "config.json")
        self.doc = {"run_dir": str(tmp / "run"), "state_dir": str(tmp / "state"), "cache_root": str(tmp / "cache"),
                    "writable_root": str(tmp / "writable"), "trace_record_seconds": 0,
                    "registries": [{"host": registry.registry, "plain_http": True}]}
        with open(self.config_path, "w") as f:
            json.dump(self.doc, f)
        self.socket = os.path.join(self.doc["run_dir"], "lazyfs.sock")

    def lazyfs(self, *args, check=True, timeout=120):
        return run_lazyfs(self.config_path, *args, check=check, timeout=timeout)

    def daemon_pid(self):
        return call(self.socket, "ping", timeout=10)["pid"]

    def cleanup(self):
        release_under(self.tmp, self.socket)


@pytest.fixture(scope="module")
def env(registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mount")
    e = Env(tmp, registry)
    src = tmp / "src"
    make_busybox_tree(str(src))
    with open(src / "marker", "w") as f:
        f.write("lazyfs marker\n")
    local = LocalRef(str(tmp / "layout"), "v1")
    trio.run(lambda: create_image(local, from_dir=str(src)))
    e.src, e.local = src, local
    e.ref = f"{registry.registry}/serve/busybox:v1"

    async def push():
        config = Config(registries=(RegistrySettings(registry.registry, plain_http=True),))
        async with ImageOpener(config) as opener:
            await push_image(opener, local, parse_reference(e.ref))

    trio.run(push)
    e.flat = str(tmp / "flat.img")
    trio.run(flatten_image, local, e.flat)
    yield e
    e.cleanup()


def leftovers(env) -> list[str]:
    """Mounts and loop devices of this test environment still around."""
    found = [m.mountpoint for m in system.mounts() if m.mountpoint.startswith(str(env.tmp) + "/mnt")]
    found += [line for line in loops_under(env.tmp) if "/export/" in line]
    return found


