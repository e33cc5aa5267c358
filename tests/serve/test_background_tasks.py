"""An image's background tasks (download, trace replay and recording, hydration, metadata keeping)
are its own: a detach cancels them, and an unexpected failure in one is logged and counted, never
taken down the Host (and with it the daemon and every other image)."""

from __future__ import annotations

import dataclasses

import trio
import trio.testing

from tests.serve.test_hydrate import MiB, create_images, two_images


def test_a_failing_background_task_of_one_image_leaves_the_host_and_other_images_serving(tmp_path):
    """Image a's background download fails with an internal error (an AttributeError, like the one
    seen once after a detach). The Host logs and counts it; image b attaches and reads every byte.
    (Broken once on purpose — ``_contained`` without its ``except Exception`` — the error escaped
    through the Host's nursery and this test failed with the AttributeError.)"""
    from lazyfs.serve.host import Host

    images, config = two_images(tmp_path)
    config = dataclasses.replace(config, background_download=True, background_delay=0.0)

    async def main():
        await create_images(images)
        with trio.fail_after(120):
            async with Host.open(config) as host:
                original = host._background

                async def background(att):
                    if att.name == "a":
                        raise AttributeError("'NoneType' object has no attribute 'digest'")
                    await original(att)

                host._background = background
                await host.attach(f"oci:{images['a'][0].path}:v1", name="a", hydrate=False)
                b = await host.attach(f"oci:{images['b'][0].path}:v1", name="b", hydrate=False)
                for _ in range(1000):  # bounded: a's task has run within a few checkpoints
                    if host.background_failures:
                        break
                    await trio.sleep(0.01)
                assert host.statistics()["background_failures"] == 1
                want = images["b"][1].read_bytes()
                got = bytearray()
                for offset in range(0, b.device.size, MiB):
                    got += await b.device.read(offset, min(MiB, b.device.size - offset))
                assert bytes(got[:len(want)]) == want
                assert set(host.attachments) == {"a", "b"}

    trio.run(main)


def test_a_detach_cancels_the_image_s_background_tasks(tmp_path):
    """A background download waiting out its delay is cancelled by the detach, not left running
    for an image that is gone. (Broken once on purpose — no cancel in ``detach`` — the task was
    still pending after the detach and this test failed.)"""
    from lazyfs.serve.host import Host

    images, config = two_images(tmp_path)
    config = dataclasses.replace(config, background_download=True, background_delay=3600.0)

    async def main():
        await create_images(images)
        with trio.fail_after(120):
            async with Host.open(config) as host:
                ended = []
                original = host._background

                async def background(att):
                    try:
                        await original(att)
                    finally:
                        ended.append(att.name)

                host._background = background
                a = await host.attach(f"oci:{images['a'][0].path}:v1", name="a", hydrate=False)
                await a.trace_lookup.wait()  # its startup trace lookup, a background task too, is over
                await trio.testing.wait_all_tasks_blocked()
                assert len(a.tasks) == 1 and not ended  # waiting out the hour
                await host.detach("a")
                await trio.testing.wait_all_tasks_blocked()
                assert ended == ["a"] and not a.tasks
                assert host.background_failures == 0

    trio.run(main)
