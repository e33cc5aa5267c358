"""Prometheus metrics for the daemon, read from ``statistics()`` snapshots at scrape time."""

from __future__ import annotations

import threading

import trio
from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lazyfs.errors import ConfigError

SNAPSHOT_INTERVAL = 2.0


class HostCollector:
    """Exports the latest snapshot; the snapshot is taken on the trio thread, never from the scrape thread."""

    def __init__(self) -> None:
        self.snapshot: dict = {"attachments": {}, "scheduler": {}}
        self._lock = threading.Lock()

    def update(self, snapshot: dict) -> None:
        with self._lock:
            self.snapshot = snapshot

    def collect(self):
        with self._lock:
            snap = self.snapshot
        per_image = [
            ("lazyfs_image_bytes_read", "Bytes read from the image's device", "counter", lambda a: a["device"]["bytes_read"]),
            ("lazyfs_image_bytes_written", "Bytes written to the image's device", "counter", lambda a: a["device"]["bytes_written"]),
            ("lazyfs_image_chunk_reads", "Chunk reads by the image", "counter", lambda a: a["chunk_reads"]),
            ("lazyfs_image_demand_misses", "Chunk reads that were not cached", "counter", lambda a: a["demand_misses"]),
            ("lazyfs_image_bytes_fetched", "Stored bytes fetched for demand misses", "counter", lambda a: a["bytes_missed"]),
        ]
        for name, doc, kind, get in per_image:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=["image", "name"])
            for att_name, att in snap["attachments"].items():
                family.add_metric([att["image"], att_name], get(att))
            yield family
        sched = snap.get("scheduler") or {}
        for key in ("requests", "ranged_gets", "bytes_fetched", "bytes_served", "memory_hits", "disk_hits", "joins",
                    "retries", "integrity_failures", "errors"):
            if key in sched:
                c = CounterMetricFamily(f"lazyfs_fetch_{key}", f"Fetch scheduler: {key.replace('_', ' ')}")
                c.add_metric([], sched[key])
                yield c
        latency = sched.get("latency") or {}
        for q in ("p50", "p95", "p99"):
            if q in latency:
                g = GaugeMetricFamily(f"lazyfs_fetch_latency_{q}_seconds", f"Chunk read latency, {q}")
                g.add_metric([], latency[q])
                yield g
        yield from registry_families(snap.get("registry"))
        cache = sched.get("cache") or {}
        for key, value in cache.items():
            if isinstance(value, (int, float)):
                g = GaugeMetricFamily(f"lazyfs_cache_{key}", f"Chunk cache: {key.replace('_', ' ')}")
                g.add_metric([], value)
                yield g


async def serve_metrics(address: str, host, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics on *address* ("HOST:PORT") until cancelled."""
    bind, _, port = address.rpartition(":")
    collector = HostCollector()
    collector.update(host.statistics())
    REGISTRY.register(collector)
    try:
        server, thread = start_http_server(int(port), addr=bind.strip("[]"))
    except OSError as exc:
        REGISTRY.unregister(collector)
        raise ConfigError(f"metrics_address {address}: {exc.strerror or exc}") from None
    task_status.started()
    try:
        while True:
            collector.update(host.statistics())
            await trio.sleep(SNAPSHOT_INTERVAL)
    finally:
        server.shutdown()
        REGISTRY.unregister(collector)


SOURCE_STATES = ("up", "probing", "down")
SOURCE_COUNTERS = (
    ("requests", "Requests to the source"),
    ("errors", "Requests that failed (connection, timeout, 5xx, 429, bad bytes)"),
    ("misses", "Requests the source answered 404"),
    ("bad_bytes", "Batches of bytes from the source that failed verification"),
    ("cold", "Ranged reads the source answered with a whole blob (a cold pull-through mirror)"),
    ("bytes", "Body bytes received from the source"),
)


def registry_families(registry: dict | None):
    """Per-source families from ``Host.registry_statistics()``: state, counters, latency histogram."""
    if not registry:
        return
    sources = registry.get("sources") or []
    state = GaugeMetricFamily("lazyfs_registry_source_state", "1 for the source's current health state",
                              labels=["source", "state"])
    for src in sources:
        for name in SOURCE_STATES:
            state.add_metric([src["host"], name], 1.0 if src["state"] == name else 0.0)
    yield state
    for key, doc in SOURCE_COUNTERS:
        family = CounterMetricFamily(f"lazyfs_registry_source_{key}", doc, labels=["source"])
        for src in sources:
            family.add_metric([src["host"]], src[key])
        yield family
    latency = HistogramMetricFamily("lazyfs_registry_source_latency_seconds", "Request latency per source",
                                    labels=["source"])
    for src in sources:
        buckets = [(str(bound) if bound != "+Inf" else "+Inf", n) for bound, n in src["latency_buckets"]]
        latency.add_metric([src["host"]], buckets, src["latency_seconds_sum"])
    yield latency
