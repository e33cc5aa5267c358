"""Fleets on one machine (scripts/bench/fleet.py): hosts in their own network namespaces, each with
its own lazyfs daemon, cache, FUSE export and loop mount; a cache tier per rack; one origin.

The image is Debian bookworm minbase when its debootstrap tarball is cached on this machine (as
scripts/demo.sh and the benchmarks leave it), else a generated 48 MiB tree (the fleet is the same;
only the image is smaller): LAZYFS_FLEET_IMAGE=debian|small forces one.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from tests.conftest import require_fuse, require_loop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "scripts", "bench"))
import fleet as harness  # noqa: E402

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def image():
    require_fuse()
    require_loop()
    kind = os.environ.get("LAZYFS_FLEET_IMAGE") or (
        "debian" if any(os.path.exists(t) for t in harness.DEBIAN_TARS) else "small")
    if kind == "small":
        print("fleet tests: no cached Debian tarball here; using the generated image "
              "(LAZYFS_FLEET_IMAGE=debian builds the Debian one with debootstrap)")
    return harness.prepare_image(kind, log=lambda m: print(m))


def start_all(fleet, hosts, during=None):
    for host in hosts:
        if host.daemon is None:
            fleet.start_daemon(host)
    fleet.at_once(hosts, fleet.start_host, during)
    for host in hosts:
        assert "error" not in host.result, (host.name, host.result["error"])
        assert host.result["workload_ok"], host.name


def test_eight_hosts_in_two_racks_cost_the_origin_one_copy_per_rack(image):
    """Every host starts the image at the same moment, then reads its whole tree: the origin sends
    each rack at most one copy of the image's blobs, and every tree is right."""
    with harness.Fleet(image, hosts=8, racks=2) as fleet:
        start_all(fleet, fleet.hosts)
        for host in fleet.hosts:
            assert fleet.check_tree(host), (host.name, host.result.get("tree_differences"))
            stats = fleet.host_stats(host)
            assert stats["fetch_errors"] == 0 and stats["integrity_failures"] == 0, (host.name, stats)
        traffic = fleet.traffic()
        # one copy of the layer blobs per rack, plus the small image config each rack also fetches
        # once (hosts keep it with their cached metadata: docs/daemon.md, "Offline life")
        config_allowance = 4096
        assert traffic["origin_blob_bytes"] <= 2 * (image.compressed_bytes + config_allowance), traffic
        for rack in traffic["racks"]:  # and what a rack took from the origin is at most one copy (plus headers)
            assert rack["fetched_bytes"] <= image.compressed_bytes * 1.02, rack


def test_a_racks_tier_killed_mid_start(image):
    """Rack 0's cache tier is killed (SIGKILL) once its first host has mounted: that rack's hosts
    finish from the origin, with no read error in any of them, and every tree is right."""
    with harness.Fleet(image, hosts=4, racks=2) as fleet:
        rack0 = [h for h in fleet.hosts if h.rack == 0]
        mounted = threading.Event()

        def kill_when_mounted():
            assert mounted.wait(300), "no host of rack 0 mounted"
            fleet.kill_tier(fleet.racks[0])

        for host in fleet.hosts:
            fleet.start_daemon(host)

        def action(host, started):
            return fleet.start_host(host, started, mounted if host in rack0 else None)

        fleet.at_once(fleet.hosts, action, kill_when_mounted)
        assert not fleet.racks[0].proc.alive()
        for host in fleet.hosts:
            assert "error" not in host.result and host.result["workload_ok"], (host.name, host.result)
            assert fleet.check_tree(host), (host.name, host.result.get("tree_differences"))
            stats = fleet.host_stats(host)
            assert stats["fetch_errors"] == 0, (host.name, stats)
        for host in rack0:
            sources = fleet.host_stats(host)["sources"]
            assert sources[fleet.origin_name]["bytes"] > 0, sources  # finished from the origin
            assert sources[f"{fleet.racks[0].node.addr}:{harness.REGISTRY_PORT}"]["errors"] > 0


def test_origin_stopped_after_every_host_started(image):
    """With background download on, hosts hydrate fully; then the origin stops. Hydrated hosts keep
    running (their trees read right, from their caches), and a new host in a rack whose tier holds
    the image still starts (tag resolved and blobs served by the tier alone)."""
    with harness.Fleet(image, hosts=4, racks=2, background=True) as fleet:
        start_all(fleet, fleet.hosts)

        def hydrated():
            return all(fleet.host_stats(h)["background"] is not None for h in fleet.hosts)

        harness.wait_until("every host to hydrate", hydrated, timeout=600, interval=1.0)
        for host in fleet.hosts:
            background = fleet.host_stats(host)["background"]
            assert background["failed"] == 0, (host.name, background)
        fleet.stop_origin()
        assert not fleet._http_ok(fleet.hosts[0].node, f"http://{fleet.origin_name}/v2/")
        for host in fleet.hosts:
            before = fleet.host_stats(host)["bytes_fetched"]
            out = harness.run(["chroot", host.target, "/bin/sh", "-c", image.workload]).stdout
            assert image.expect in out
            assert fleet.check_tree(host), (host.name, host.result.get("tree_differences"))
            assert fleet.host_stats(host)["bytes_fetched"] == before  # everything came from its own cache
        time.sleep(11)  # past the 10 s the tier keeps a manifest fresh: the newcomer gets a stale copy
        newcomer = fleet.add_host(rack=0)
        fleet.start_daemon(newcomer)
        result = fleet.start_host(newcomer, time.perf_counter())
        assert "error" not in result and result["workload_ok"], result
        assert fleet.check_tree(newcomer), result.get("tree_differences")
