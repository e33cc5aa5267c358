"""The daemon and its mirrors: periodic health probes, reload by SIGHUP and by `lazyfs reload`,
per-source statistics. A real pull-through mirror (docker-registry proxy mode) behind fault proxies."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lazyfs.serve.control import call
from tests.serve.conftest import ROOT
from tests.support.cleanup import release_under
from tests.support.proxy import FaultProxy
from tests.support.registry import running_registry

pytestmark = [pytest.mark.registry, pytest.mark.fuse, pytest.mark.loop, pytest.mark.timeout(300)]


def wait_for(what, predicate, timeout=30.0):
    """Poll *predicate* (bounded); its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.2)


def sources(sock):
    registry = call(sock, "stats", timeout=30)["registry"]
    return {s["host"]: s for s in (registry or {}).get("sources", [])}


def test_probe_reload_and_per_source_statistics(env, tmp_path):
    with running_registry(tmp_path / "mirror", proxy_remote=env.registry.url) as mirror, \
            FaultProxy.running_in_thread(mirror.port) as m1, FaultProxy.running_in_thread(mirror.port) as m2:
        a, b = f"127.0.0.1:{m1.port}", f"127.0.0.1:{m2.port}"
        origin = env.registry.registry
        doc = dict(env.doc, run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"),
                   cache_root=str(tmp_path / "cache"), registry_probe_interval=0.3,
                   registries=[{"host": origin, "plain_http": True, "mirrors": [f"http://{a}"]}])
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps(doc))
        sock = str(tmp_path / "run/lazyfs.sock")
        export = tmp_path / "exp"

        def lazyfs(*args, check=True):
            proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *args, "--config", str(cfg)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
            assert not check or proc.returncode == 0, proc.stderr
            return proc

        try:
            lazyfs("export", env.ref, str(export))
            with open(export / "disk.img", "rb") as f:
                f.read(4 << 20)
            seen = sources(sock)
            assert set(seen) == {a, origin}
            assert seen[origin]["bytes"] > 0 and seen[origin]["latency_seconds_count"] > 0
            assert seen[origin]["latency_buckets"][-1][0] == "+Inf"  # strict JSON, Prometheus style
            assert seen[a]["state"] == "up" and seen[a]["requests"] > 0

            # The probe takes a failing mirror down with no read asking it, and brings it back.
            m1.faults.fail(503, count=None)
            wait_for("the mirror to go down", lambda: sources(sock)[a]["state"] == "down")
            m1.faults.clear()
            wait_for("the mirror to come back", lambda: sources(sock)[a]["state"] == "up")
            assert m1.count("GET", "/v2/") >= 3

            # Reload by SIGHUP: another mirror list from the next request on.
            doc["registries"] = [{"host": origin, "plain_http": True, "mirrors": [f"http://{b}"]}]
            cfg.write_text(json.dumps(doc))
            os.kill(call(sock, "ping")["pid"], signal.SIGHUP)
            wait_for("the reload", lambda: call(sock, "stats")["registry"]["reloads"] == 1)
            wait_for("the new mirror to be probed", lambda: b in sources(sock))
            assert a not in sources(sock)  # a dropped source is forgotten
            m1.reset_counters()
            with open(export / "disk.img", "rb") as f:
                f.seek(8 << 20)
                f.read(4 << 20)
            time.sleep(1.0)  # a few probe periods: the dropped mirror must not be probed either
            assert m1.count() == 0 and m2.count("GET", "/blobs/") > 0

            # Reload by `lazyfs reload`: the sources it now uses; a bad config is one line and changes nothing.
            doc["registries"] = [{"host": origin, "plain_http": True, "mirrors": [f"http://{a}", f"http://{b}"]}]
            cfg.write_text(json.dumps(doc))
            out = json.loads(lazyfs("reload", "--json").stdout)
            assert out == {"sources": {origin: [a, b, origin]}}
            doc["registries"][0]["ca_file"] = str(tmp_path / "missing.pem")
            cfg.write_text(json.dumps(doc))
            bad = lazyfs("reload", check=False)
            assert bad.returncode != 0 and "missing.pem" in bad.stderr and "Traceback" not in bad.stderr
            assert len(bad.stderr.strip().splitlines()) == 1
            assert call(sock, "stats")["registry"]["reloads"] == 2
            os.kill(call(sock, "ping")["pid"], signal.SIGHUP)  # logged, changes nothing, the daemon lives on
            time.sleep(0.5)
            assert call(sock, "stats")["registry"]["reloads"] == 2
            assert set(sources(sock)) == {a, b, origin}
        finally:
            subprocess.run([sys.executable, "-m", "lazyfs.cli", "umount", str(export), "--config", str(cfg)],
                           cwd=ROOT, capture_output=True, timeout=120)
            release_under(tmp_path, sock)


def test_per_source_metric_families():
    from prometheus_client import CollectorRegistry, generate_latest

    from lazyfs.serve.metrics import HostCollector

    buckets = [[0.005, 1], [0.01, 2], ["+Inf", 3]]
    source = {"host": "mirror:5000", "state": "down", "requests": 3, "errors": 2, "misses": 0, "bad_bytes": 1,
              "cold": 1, "bytes": 4096, "latency_seconds_sum": 0.5, "latency_seconds_count": 3,
              "latency_buckets": buckets}
    collector = HostCollector()
    collector.update({"attachments": {}, "scheduler": {}, "registry": {"sources": [source]}})
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'lazyfs_registry_source_state{source="mirror:5000",state="down"} 1.0' in text
    assert 'lazyfs_registry_source_state{source="mirror:5000",state="up"} 0.0' in text
    assert 'lazyfs_registry_source_received_bytes_total{source="mirror:5000"} 4096.0' in text
    assert 'lazyfs_registry_source_integrity_failures_total{source="mirror:5000"} 1.0' in text
    assert 'lazyfs_registry_request_duration_seconds_bucket{le="+Inf",source="mirror:5000"} 3.0' in text
    assert 'lazyfs_registry_request_duration_seconds_count{source="mirror:5000"} 3.0' in text
