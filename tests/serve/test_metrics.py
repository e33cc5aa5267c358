"""Prometheus metrics: types, names, real histograms, and a Grafana dashboard that names only what exists.

The in-process tests read the statistics of real objects (a Host with an attached writable
image, its scheduler, planner and cache, an ExportFS). The daemon test scrapes a running
daemon's /metrics after reads through FUSE and holds ``contrib/grafana/lazyfs.json`` to it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from lazyfs.config import Config
from lazyfs.fetch.scheduler import LATENCY_BUCKETS, LatencyHistogram
from lazyfs.image.local import create_image
from lazyfs.image.ref import LocalRef
from lazyfs.serve import metrics
from lazyfs.serve.control import call
from lazyfs.serve.host import Host
from tests.serve.conftest import ROOT

DASHBOARD = os.path.join(ROOT, "contrib", "grafana", "lazyfs.json")
MiB = 1 << 20


# ---------------------------------------------------------------- real statistics, in process


def _statistics_of_a_real_host(tmp_path) -> list[dict]:
    """Two snapshots (before and after more I/O) of a Host with a writable image exported in an ExportFS."""
    pytest.importorskip("pyfuse3")
    from lazyfs.serve.fuse import ExportFS

    raw = tmp_path / "raw"
    raw.write_bytes(random.Random(1).randbytes(3 * MiB) + bytes(MiB))
    layout = tmp_path / "layout"
    config = Config(run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"), cache_root=str(tmp_path / "cache"),
                    writable_root=str(tmp_path / "writable"), trace_record_seconds=0, readahead_chunks=2)

    async def main():
        await create_image(LocalRef(str(layout), "v1"), from_file=str(raw))
        async with Host.open(config) as host:
            att = await host.attach(f"oci:{layout}:v1", name="img", writable=True)
            fs = ExportFS()
            fs.add("img", att.device)
            assert await att.device.read(0, MiB) == raw.read_bytes()[:MiB]
            await att.device.write(4096, b"w" * 8192)
            await att.device.flush()
            first = metrics.take_snapshot(host, fs)
            await att.device.read(0, 4 * MiB)
            await att.device.read(0, 4 * MiB)  # flat file hits now (readahead wrote the chunks there)
            await host.scheduler.get(att.device.index.segments[0].loc)  # a memory hit of the chunk store
            second = metrics.take_snapshot(host, fs)
            return [first, second]

    return trio.run(main)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    return _statistics_of_a_real_host(tmp_path_factory.mktemp("metrics"))


def _sections(snapshot: dict) -> dict[str, dict]:
    att = snapshot["attachments"]["img"]
    sched = snapshot["scheduler"]
    return {"scheduler": sched, "planner": sched["planner"], "cache": sched["cache"], "image": att,
            "hydration": att["hydration"],
            "device": att["device"], "writable": att["device"]["writable"], "fuse": snapshot["fuse"],
            "export": snapshot["fuse"]["exports"]["img"], "flat": snapshot["flat_cache"]}


def test_every_statistic_is_classified_and_every_table_entry_exists(snapshots):
    """A new counter in some statistics() must be given a metric type and name (or a reason to skip it)."""
    for section, stats in _sections(snapshots[0]).items():
        table, skipped = metrics.TABLES[section]
        mapped = {s.key for s in table}
        numeric = {k for k, v in stats.items() if isinstance(v, (int, float, dict)) and not isinstance(v, bool)}
        unclassified = numeric - mapped - set(skipped)
        assert not unclassified, f"{section}.statistics() keys with no metric: {sorted(unclassified)}"
        stale = (mapped | set(skipped)) - set(stats)
        assert not stale, f"{section} table names keys statistics() does not have: {sorted(stale)}"
        assert not mapped & set(skipped), f"{section}: mapped and skipped at once"
    disk = snapshots[1]["disk"]
    assert disk, "the disk budget has sampled by the second snapshot"
    unclassified = set(disk) - set(metrics.DISK_SKIPPED)
    assert not unclassified, f"disk statistics with no metric: {sorted(unclassified)}"


def _registry_snapshot() -> dict:
    """Host.statistics()["registry"] of a real RegistryClient whose picker saw a mirror fail and
    the registry answer (no network: the picker is pure, the client connects lazily)."""
    from types import SimpleNamespace

    from lazyfs.fetch.registry import RegistryClient
    from lazyfs.fetch.registry.picker import Outcome

    client = RegistryClient(clock=lambda: 0.0)  # the picker's clock: the mirror's cooldown has not run out
    for seconds in (0.003, 0.02, 0.02, 0.7):
        client.picker.record("registry.test", Outcome.OK, 0.0, seconds=seconds, nbytes=1000)
    client.picker.record("registry.test", Outcome.MISSING, 0.0, seconds=0.004)
    for _ in range(5):
        client.picker.record("mirror.test", Outcome.FAILED, 0.0, seconds=40.0)
    client.picker.record("mirror.test", Outcome.BAD_BYTES, 0.0)
    host = SimpleNamespace(opener=SimpleNamespace(existing_client=client))
    return Host.registry_statistics(host)


def _classify(section: str, stats: dict) -> None:
    table, skipped = metrics.TABLES[section]
    mapped = {s.key for s in table}
    numeric = {k for k, v in stats.items() if isinstance(v, (int, float, dict, list)) and not isinstance(v, bool)}
    unclassified = numeric - mapped - set(skipped)
    assert not unclassified, f"{section} statistics with no metric: {sorted(unclassified)}"
    stale = (mapped | set(skipped)) - set(stats)
    assert not stale, f"{section} table names keys statistics() does not have: {sorted(stale)}"


def test_registry_statistics_are_classified_and_exported_per_source():
    registry = _registry_snapshot()
    _classify("registry", registry)
    for src in registry["sources"]:
        _classify("source", src)
    families = metrics.metric_families({"registry": registry})
    assert _value(families, "lazyfs_registry_source_requests_total", source="registry.test") == 5
    assert _value(families, "lazyfs_registry_source_not_found_total", source="registry.test") == 1
    assert _value(families, "lazyfs_registry_source_errors_total", source="mirror.test") == 6
    assert _value(families, "lazyfs_registry_source_integrity_failures_total", source="mirror.test") == 1
    assert _value(families, "lazyfs_registry_source_received_bytes_total", source="registry.test") == 4000
    assert _value(families, "lazyfs_registry_source_state", source="mirror.test", state="down") == 1
    assert _value(families, "lazyfs_registry_source_state", source="mirror.test", state="up") == 0
    assert _value(families, "lazyfs_registry_source_state", source="registry.test", state="up") == 1
    # a cumulative histogram per source: 0.003 and 0.004 <= 0.005; both 0.02 <= 0.025; 0.7 <= 1
    bucket = "lazyfs_registry_request_duration_seconds_bucket"
    assert _value(families, bucket, source="registry.test", le="0.005") == 2
    assert _value(families, bucket, source="registry.test", le="0.025") == 4
    assert _value(families, bucket, source="registry.test", le="1.0") == 5
    assert _value(families, bucket, source="registry.test", le="+Inf") == 5
    assert _value(families, "lazyfs_registry_request_duration_seconds_count", source="mirror.test") == 5
    assert _value(families, "lazyfs_registry_request_duration_seconds_sum", source="mirror.test") == 200.0
    # before any registry is used the families are there, without samples
    empty = _by_name(metrics.metric_families({"registry": None}))
    assert empty["lazyfs_registry_source_requests"].samples == []


def _by_name(families) -> dict:
    return {f.name: f for f in families}


def test_names_and_types_follow_prometheus_conventions(snapshots):
    families = metrics.metric_families(snapshots[1])
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "one family per name"
    for f in families:
        assert f.name.startswith("lazyfs_"), f.name
        assert f.documentation, f"{f.name} has no HELP"
        assert f.type in ("counter", "gauge", "histogram"), f.name
        words = f.name.split("_")
        for unit in ("bytes", "seconds"):
            if unit in words:
                assert words[-1] == unit, f"{f.name}: the unit {unit} goes last"
        if f.type == "counter":
            assert all(s.name == f.name + "_total" for s in f.samples), f.name
        if f.type == "gauge":
            assert words[-1] not in ("total", "count", "sum", "bucket"), f"{f.name} reads like a counter"
    by_name = _by_name(families)
    assert by_name["lazyfs_chunk_read_duration_seconds"].type == "histogram"
    # the per-image series carry the image and attachment names
    for name in ("lazyfs_image_read_bytes_total", "lazyfs_image_chunk_reads_total", "lazyfs_export_read_bytes_total"):
        family = by_name[name.removesuffix("_total")]
        assert [s.labels for s in family.samples] == [{"image": f"oci:{_layout(snapshots)}:v1", "name": "img"}]


def _layout(snapshots) -> str:
    return snapshots[0]["attachments"]["img"]["image"].removeprefix("oci:").removesuffix(":v1")


def _value(families, sample_name: str, **labels) -> float:
    for f in families:
        for s in f.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(sample_name)


def test_metrics_equal_the_statistics_they_are_read_from(snapshots):
    before, after = snapshots
    f0, f1 = metrics.metric_families(before), metrics.metric_families(after)
    st0, st1 = _sections(before), _sections(after)
    assert _value(f1, "lazyfs_image_read_bytes_total") == st1["device"]["bytes_read"] == before_after_read(st0, 8 * MiB)
    assert _value(f1, "lazyfs_image_written_bytes_total") == 8192
    assert _value(f1, "lazyfs_image_writable_writes_total") == st1["writable"]["writes"] >= 1
    assert _value(f1, "lazyfs_fetch_requests_total") == st1["scheduler"]["requests"]
    assert _value(f1, "lazyfs_fetch_tier_hits_total", tier="memory") == st1["scheduler"]["memory_hits"] > 0
    assert _value(f1, "lazyfs_cache_size_bytes", tier="disk") == st1["cache"]["bytes"]
    assert _value(f1, "lazyfs_cache_limit_bytes", tier="disk") == st1["cache"]["max_bytes"]
    assert _value(f1, "lazyfs_image_size_bytes") == 4 * MiB
    assert _value(f1, "lazyfs_attached_images") == 1
    assert _value(f1, "lazyfs_image_writable_failed") == 0
    assert _value(f1, "lazyfs_disk_usage_bytes", use="chunk_cache") == after["disk"]["chunk_cache"]["bytes"]
    broken = copy.deepcopy(after)
    broken["attachments"]["img"]["device"]["writable"]["failed"] = "fdatasync failed (EIO)"
    assert _value(metrics.metric_families(broken), "lazyfs_image_writable_failed") == 1
    # counters never go down between two snapshots; the ones the reads touched went up
    for f in f0:
        if f.type == "counter":
            for s in f.samples:
                assert _value(f1, s.name, **s.labels) >= s.value, s.name
    for grown in ("lazyfs_fetch_requests_total", "lazyfs_image_chunk_reads_total", "lazyfs_image_read_bytes_total"):
        assert _value(f1, grown) > _value(f0, grown), grown


def before_after_read(st0, more: int) -> int:
    return st0["device"]["bytes_read"] + more


def _buckets(family) -> list[tuple[float, float]]:
    return [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]


def test_latency_is_a_cumulative_histogram_of_every_successful_read(snapshots):
    sched = snapshots[1]["scheduler"]
    family = _by_name(metrics.metric_families(snapshots[1]))["lazyfs_chunk_read_duration_seconds"]
    buckets = _buckets(family)
    assert [b for b, _ in buckets] == list(LATENCY_BUCKETS)  # every bound, ending with +Inf
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    count = next(s.value for s in family.samples if s.name.endswith("_count"))
    total = next(s.value for s in family.samples if s.name.endswith("_sum"))
    assert counts[-1] == count == sched["latency"]["count"] == sched["requests"] - sched["errors"]
    assert total == pytest.approx(sched["latency"]["sum"]) and total > 0


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile over cumulative buckets (linear within the bucket)."""
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == math.inf:
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def test_histograms_of_two_hosts_add_up_to_the_histogram_of_both():
    """The point of buckets over quantile gauges: sum by (le) over hosts is the fleet's histogram."""
    rng = random.Random(7)
    fast = [rng.uniform(0.0001, 0.003) for _ in range(900)]  # a host serving from its cache
    slow = [rng.uniform(0.02, 0.8) for _ in range(100)]  # a host fetching over a slow link
    hosts = [LatencyHistogram(), LatencyHistogram()]
    both = LatencyHistogram()
    for h, samples in zip(hosts, (fast, slow)):
        for s in samples:
            h.observe(s)
            both.observe(s)
    exported = [_buckets(metrics.histogram_family("x_seconds", "x", h.snapshot())) for h in hosts]
    summed = [(le, a + b) for (le, a), (le2, b) in zip(*exported) if le == le2]
    assert summed == _buckets(metrics.histogram_family("x_seconds", "x", both.snapshot()))
    # the fleet's quantiles come from the summed buckets; averaging per-host quantiles (all that
    # quantile gauges allow) is far off: the median read is fast, not a mean of fast and slow
    assert 0.25 <= _quantile(0.99, summed) <= 1.0
    fleet_median = _quantile(0.5, summed)
    assert fleet_median <= 0.005
    assert sum(_quantile(0.5, e) for e in exported) / 2 > 20 * fleet_median


def test_exposition_parses_in_both_formats(snapshots):
    collector = metrics.HostCollector()
    collector.update(snapshots[1])
    registry = metrics.new_registry(collector)
    text = generate_latest(registry).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"lazyfs_chunk_read_duration_seconds", "lazyfs_fetch_requests", "process_resident_memory_bytes"} <= names
    openmetrics = {f.name for f in parse_openmetrics(generate_openmetrics(registry).decode())}
    assert "lazyfs_chunk_read_duration_seconds" in openmetrics
    # an empty snapshot (daemon just started) still names and types every family
    empty = metrics.HostCollector()
    assert {f.name for f in empty.collect()} == {f.name for f in metrics.metric_families(snapshots[1])}


# ---------------------------------------------------------------- the dashboard


PROMQL_FUNCTIONS = {
    "abs", "avg", "count", "histogram_quantile", "increase", "irate", "max", "min", "rate",
    "sum", "topk", "vector", "clamp_min",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
PROMETHEUS_TARGET_LABELS = {"instance", "job"}


def _exprs(dashboard: dict) -> list[tuple[str, set[str]]]:
    """(PromQL expression, label names it asks for besides) of every panel target and variable query."""
    out = []
    for panel in dashboard["panels"]:
        out += [(t["expr"], set()) for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # Grafana's label_values(SELECTOR, LABEL): a selector and a label name
            m = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)", query)
            assert m, f"unexpected variable query {query!r}"
            out.append((m.group(1), {m.group(2)}))
    return out


def parse_promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) in a PromQL expression: enough PromQL for a dashboard's queries."""
    labels: set[str] = set()
    # label matchers: {a="x", b=~"$v"}
    for body in re.findall(r"\{([^}]*)\}", expr):
        for matcher in filter(None, (m.strip() for m in body.split(","))):
            name = re.match(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"[^\"]*\"$", matcher)
            assert name, f"bad label matcher {matcher!r} in {expr}"
            labels.add(name.group(1))
    # grouping lists: by (a, b), on (a), group_left (a, b)
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {w.strip() for w in body.split(",") if w.strip()}
    rest = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    rest = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rest):
        word = m.group(0)
        after = rest[m.end():].lstrip()
        if after.startswith("("):
            assert word in PROMQL_FUNCTIONS, f"unknown function {word} in {expr}"
        elif word not in PROMQL_KEYWORDS and not re.fullmatch(r"\d+(\.\d+)?", word):
            names.add(word)
    assert expr.count("(") == expr.count(")"), f"unbalanced parentheses in {expr}"
    return names, labels


def test_promql_reader_finds_names_and_labels():
    names, labels = parse_promql_names(
        'histogram_quantile(0.99, sum by (le) (rate(lazyfs_a_bucket{instance=~"$instance", tier="disk"}[$__rate_interval])))'
        ' / on (instance) group_left (x) lazyfs_b')
    assert names == {"lazyfs_a_bucket", "lazyfs_b"} and labels == {"le", "instance", "tier", "x"}
    with pytest.raises(AssertionError):
        parse_promql_names("rate(lazyfs_a[5m]")


def test_dashboard_is_valid_grafana_json():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            for t in panel["targets"]:
                assert t["datasource"] == panel["datasource"] and t["refId"], panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "image"} <= variables
    for expr, _ in _exprs(dashboard):
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables or var.startswith("__"), f"undefined variable ${var} in {expr}"


def check_dashboard_against(samples: dict[str, set[str]]) -> set[str]:
    """Assert every metric and label the dashboard uses is in *samples* (sample name -> label names).

    Returns the metric names the dashboard uses.
    """
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    used = set()
    for expr, asked in _exprs(dashboard):
        names, labels = parse_promql_names(expr)
        labels |= asked
        missing = names - set(samples)
        assert not missing, f"the dashboard queries metrics the daemon does not export: {sorted(missing)} in {expr}"
        known = set().union(*(samples[n] for n in names)) | PROMETHEUS_TARGET_LABELS | {"le"}
        assert labels <= known, f"labels {sorted(labels - known)} are on none of {sorted(names)} ({expr})"
        used |= names
    return used


# ---------------------------------------------------------------- a running daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, dict]:
    """Sample name -> {"labels": label names, "values": [(labels, value)]} from a daemon's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            entry = out.setdefault(s.name, {"type": family.type, "labels": set(), "values": []})
            entry["labels"] |= set(s.labels)
            entry["values"].append((s.labels, s.value))
    return out


@pytest.mark.registry
@pytest.mark.fuse
def test_running_daemon_exports_what_the_dashboard_shows(env, tmp_path):
    port = _free_port()
    doc = dict(env.doc, run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"),
               cache_root=str(tmp_path / "cache"), writable_root=str(tmp_path / "writable"),
               metrics_address=f"127.0.0.1:{port}")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(doc))
    export = tmp_path / "exp"
    lazyfs = [sys.executable, "-m", "lazyfs.cli"]
    subprocess.run([*lazyfs, "export", env.ref, str(export), "--writable", "--config", str(cfg)],
                   check=True, cwd=ROOT, capture_output=True, timeout=120)
    sock = str(tmp_path / "run/lazyfs.sock")
    try:
        with open(export / "disk.img", "rb") as f:
            f.read(2 * MiB)
        deadline = time.monotonic() + 30
        while True:  # the exporter snapshots statistics every couple of seconds
            scraped = _scrape(port)
            read = [v for labels, v in scraped.get("lazyfs_image_read_bytes_total", {"values": []})["values"]
                    if labels.get("image") == env.ref]
            if read and read[0] >= 2 * MiB or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert read and read[0] >= 2 * MiB, read
        assert scraped["lazyfs_image_read_bytes_total"]["type"] == "counter"
        exported = dict((labels["image"], v) for labels, v in scraped["lazyfs_export_read_bytes_total"]["values"])
        assert exported[env.ref] >= 2 * MiB
        assert scraped["lazyfs_attached_images"]["values"][0][1] == 1
        buckets = sorted((float(labels["le"]), v) for labels, v in
                         scraped["lazyfs_chunk_read_duration_seconds_bucket"]["values"])
        count = scraped["lazyfs_chunk_read_duration_seconds_count"]["values"][0][1]
        assert buckets[-1] == (math.inf, count) and count > 0
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)
        assert scraped["lazyfs_fetch_bytes_total"]["values"][0][1] > 0
        registry = call(sock, "stats")["registry"]
        _classify("registry", registry)
        for src in registry["sources"]:
            _classify("source", src)
        host = env.ref.split("/")[0]
        assert [s["host"] for s in registry["sources"]] == [host]
        requested = dict((labels["source"], v) for labels, v in
                         scraped["lazyfs_registry_source_requests_total"]["values"])
        assert requested[host] > 0
        assert scraped["lazyfs_registry_source_state"]["values"]
        used = check_dashboard_against({name: entry["labels"] for name, entry in scraped.items()})
        assert "lazyfs_chunk_read_duration_seconds_bucket" in used and "lazyfs_image_read_bytes_total" in used
        # the old quantile gauges and gauge-typed counters are gone
        assert not [n for n in scraped if re.search(r"_p\d\d_|^lazyfs_cache_(hits|misses)$", n)]
    finally:
        subprocess.run([*lazyfs, "umount", str(export), "--config", str(cfg)], cwd=ROOT, capture_output=True,
                       timeout=120)
        call(sock, "stop")


def test_docs_list_every_metric(snapshots):
    with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
        documented = set(re.findall(r"^\| `(lazyfs_[a-z0-9_]+)` \|", f.read(), re.M))
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in metrics.metric_families(snapshots[1])}
    assert exported == documented, (sorted(exported - documented), sorted(documented - exported))


def test_daemon_without_metrics_address_never_imports_prometheus_client():
    """Every cold ``lazyfs mount`` waits for the daemon's imports (BENCHMARKS.md, issue 14): the
    metrics exporter and prometheus_client load only when ``metrics_address`` is set, which the
    running-daemon test above covers. Counts modules, not seconds. Broken on purpose once by
    importing ``serve_metrics`` at the top of lazyfs/serve/daemon.py again: this went red."""
    code = ("import sys, lazyfs.serve.daemon, lazyfs.serve.mount, lazyfs.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prometheus_client' or m == 'lazyfs.serve.metrics'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout
    assert out.strip() == "[]", out
