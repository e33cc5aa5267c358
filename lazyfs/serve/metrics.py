"""Prometheus metrics for the daemon, read from the objects' ``statistics()`` at scrape time.

``statistics()`` stays the single source of every number (trio style); the tables here only
say which statistic becomes which metric, of which type, under which name:

* counters (``_total``) for everything that only grows, gauges only for levels (sizes,
  entries, queue lengths, handles), and a real cumulative-bucket histogram for the chunk read
  latency, so hosts aggregate with ``sum by (le) (rate(..._bucket[5m]))``;
* Prometheus names: a ``lazyfs_`` prefix and base units as suffixes (``_bytes``, ``_seconds``);
* per-image series carry ``image`` (the reference) and ``name`` (the attachment) labels.

Every statistics key is either mapped to a metric or listed in a ``SKIPPED`` table with the
reason; a test holds the tables to the real ``statistics()`` dicts, so a new counter cannot be
dropped or mistyped silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lazyfs.errors import ConfigError

SNAPSHOT_INTERVAL = 2.0  # seconds between statistics() snapshots taken on the trio thread

COUNTER, GAUGE = "counter", "gauge"
IMAGE_LABELS = ("image", "name")


@dataclass(frozen=True, slots=True)
class Stat:
    """One statistics key exported as one sample of the metric family *name*.

    Several Stats may share a family; they then differ in their fixed *labels*
    (e.g. ``tier="memory"`` and ``tier="disk"``) and the first one's *doc* is the HELP text.
    A *flag* is a statistic that is a reason or None: exported as 1 when there is a reason, else 0.
    """

    key: str
    name: str
    kind: str
    doc: str
    labels: tuple[tuple[str, str], ...] = ()
    flag: bool = False


def _tier(tier: str) -> tuple[tuple[str, str], ...]:
    return (("tier", tier),)


# -- FetchScheduler.statistics() --------------------------------------------------------------

SCHEDULER: tuple[Stat, ...] = (
    Stat("requests", "lazyfs_fetch_requests_total", COUNTER, "Chunk reads asked of the fetch scheduler"),
    Stat("memory_hits", "lazyfs_fetch_tier_hits_total", COUNTER, "Chunk reads answered without the network, by cache tier",
         _tier("memory")),
    Stat("disk_hits", "lazyfs_fetch_tier_hits_total", COUNTER, "", _tier("disk")),
    Stat("joins", "lazyfs_fetch_joins_total", COUNTER, "Chunk reads that waited on a fetch another reader started"),
    Stat("fetches", "lazyfs_fetch_chunks_total", COUNTER, "Chunks sent to the network because no cache tier had them"),
    Stat("ranged_gets", "lazyfs_fetch_ranged_gets_total", COUNTER, "Ranged reads sent to the backends, retries included"),
    Stat("bytes_fetched", "lazyfs_fetch_bytes_total", COUNTER, "Bytes the backends returned (compressed, gaps included)"),
    Stat("bytes_served", "lazyfs_fetch_served_bytes_total", COUNTER, "Raw chunk bytes handed to readers"),
    Stat("wasted_bytes", "lazyfs_fetch_wasted_bytes_total", COUNTER, "Gap bytes read only to coalesce neighbouring chunks"),
    Stat("retries", "lazyfs_fetch_retries_total", COUNTER, "Ranged reads repeated after a fetch error"),
    Stat("failovers", "lazyfs_fetch_failovers_total", COUNTER, "Reads moved to the next backend (mirror) of a blob"),
    Stat("integrity_failures", "lazyfs_fetch_integrity_failures_total", COUNTER,
         "Fetched frames that failed blake3 verification (never served nor cached)"),
    Stat("fetch_errors", "lazyfs_fetch_errors_total", COUNTER, "Failed ranged read attempts"),
    Stat("deadline_exceeded", "lazyfs_fetch_deadline_exceeded_total", COUNTER, "Waits or fetch jobs that ran out of time"),
    Stat("errors", "lazyfs_fetch_failed_requests_total", COUNTER, "Chunk reads that ended in an error"),
    Stat("prefetched", "lazyfs_fetch_prefetched_chunks_total", COUNTER, "Chunks queued by trace prefetch and readahead"),
    Stat("background_chunks", "lazyfs_fetch_background_chunks_total", COUNTER, "Chunks fetched by background download"),
    Stat("background_bytes", "lazyfs_fetch_background_bytes_total", COUNTER, "Stored bytes fetched by background download"),
    Stat("decode_hops", "lazyfs_fetch_decode_hops_total", COUNTER,
         "Worker-thread hops that decoded, verified and wrote back one ranged read's chunks"),
    Stat("location_retries", "lazyfs_fetch_location_retries_total", COUNTER,
         "Readers that read their own location of a chunk after the shared fetch of another one failed"),
    Stat("chain_spans", "lazyfs_fetch_chain_spans_total", COUNTER,
         "Spans fetched only for their tail: the window of a chained span read after them"),
    Stat("window_reads", "lazyfs_fetch_window_reads_total", COUNTER,
         "Ranged reads of stored gzip windows from span map blobs (version 3 span maps)"),
    Stat("in_flight", "lazyfs_fetch_in_flight_chunks", GAUGE, "Chunks being read from disk or fetched right now"),
    Stat("span_tails", "lazyfs_fetch_span_tails", GAUGE, "Span tails remembered as the windows of chained spans"),
    Stat("demand_waiting", "lazyfs_fetch_demand_waiting", GAUGE, "Demand reads waiting for the network right now"),
)
SCHEDULER_SKIPPED: Mapping[str, str] = {
    "latency": "exported as the histogram lazyfs_chunk_read_duration_seconds",
    "planner": "its own table (PLANNER)",
    "cache": "its own table (CACHE)",
}

# -- FetchPlanner.statistics() ----------------------------------------------------------------

PLANNER: tuple[Stat, ...] = (
    Stat("jobs", "lazyfs_plan_jobs_total", COUNTER, "Fetch jobs planned (one ranged read each)"),
    Stat("chunks_planned", "lazyfs_plan_chunks_total", COUNTER, "Chunks put into fetch jobs"),
    Stat("coalesced", "lazyfs_plan_coalesced_chunks_total", COUNTER, "Chunks that joined a neighbour's job"),
    Stat("bytes_planned", "lazyfs_plan_bytes_total", COUNTER, "Bytes covered by planned fetch jobs, gaps included"),
    Stat("requests", "lazyfs_plan_requests_total", COUNTER, "Chunk requests handed to the planner (misses and prefetches)"),
    Stat("joined", "lazyfs_plan_joined_total", COUNTER, "Planner requests for chunks already queued or in flight"),
    Stat("upgraded", "lazyfs_plan_upgrades_total", COUNTER, "Queued chunks moved to a more urgent priority"),
    Stat("in_flight_jobs", "lazyfs_plan_in_flight_jobs", GAUGE, "Fetch jobs running right now"),
    Stat("in_flight_chunks", "lazyfs_plan_in_flight_chunks", GAUGE, "Chunks in fetch jobs running right now"),
)
PLANNER_SKIPPED: Mapping[str, str] = {
    "wasted_bytes": "the same number as lazyfs_fetch_wasted_bytes_total",
    "queued": "the sum of lazyfs_plan_queued_chunks over priorities",
    "queued_by_priority": "exported as lazyfs_plan_queued_chunks{priority}",
}

# -- ChunkCache.statistics() ------------------------------------------------------------------

CACHE: tuple[Stat, ...] = (
    Stat("memory_hits", "lazyfs_cache_hits_total", COUNTER, "Chunk cache lookups that found the chunk, by tier",
         _tier("memory")),
    Stat("disk_hits", "lazyfs_cache_hits_total", COUNTER, "", _tier("disk")),
    Stat("misses", "lazyfs_cache_misses_total", COUNTER, "Chunk cache lookups that found nothing"),
    Stat("evictions", "lazyfs_cache_evictions_total", COUNTER, "Chunks evicted from the disk cache to stay under its limit"),
    Stat("damaged", "lazyfs_cache_damaged_total", COUNTER, "Disk cache files that failed verification and were deleted"),
    Stat("writes", "lazyfs_cache_writes_total", COUNTER, "Chunks written to the disk cache"),
    Stat("bytes_written", "lazyfs_cache_written_bytes_total", COUNTER, "Bytes written to the disk cache"),
    Stat("write_errors", "lazyfs_cache_write_errors_total", COUNTER, "Disk cache writes that failed (full or broken disk)"),
    Stat("memory_entries", "lazyfs_cache_entries", GAUGE, "Chunks held, by tier", _tier("memory")),
    Stat("entries", "lazyfs_cache_entries", GAUGE, "", _tier("disk")),
    Stat("memory_bytes", "lazyfs_cache_size_bytes", GAUGE, "Bytes held, by tier", _tier("memory")),
    Stat("bytes", "lazyfs_cache_size_bytes", GAUGE, "", _tier("disk")),
    Stat("max_bytes", "lazyfs_cache_limit_bytes", GAUGE, "Configured size limit, by tier", _tier("disk")),
    Stat("pending_writes", "lazyfs_cache_pending_writes", GAUGE, "Chunks admitted whose disk write has not finished"),
)
CACHE_SKIPPED: Mapping[str, str] = {"hits": "the sum of lazyfs_cache_hits_total over tiers"}

# -- Attachment.statistics(): per image -------------------------------------------------------

IMAGE: tuple[Stat, ...] = (
    Stat("chunk_reads", "lazyfs_image_chunk_reads_total", COUNTER, "Demand chunk reads by the image"),
    Stat("demand_misses", "lazyfs_image_demand_misses_total", COUNTER, "Demand chunk reads that no cache tier had"),
    Stat("bytes_missed", "lazyfs_image_missed_bytes_total", COUNTER, "Stored bytes of the chunks the image waited for"),
    Stat("bytes_served", "lazyfs_image_served_bytes_total", COUNTER, "Raw chunk bytes the image got from the scheduler"),
    Stat("size", "lazyfs_image_size_bytes", GAUGE, "Virtual size of the image's block device"),
    Stat("layers", "lazyfs_image_layers", GAUGE, "Read-only layers stacked in the image"),
    Stat("attached_at", "lazyfs_image_attached_timestamp_seconds", GAUGE, "When the image was attached (Unix time)"),
    Stat("hydrate", "lazyfs_image_hydrating", GAUGE,
         "1 when the image is being made (and kept) fully local: mount --hydrate or the config's hydrate", flag=True),
)
IMAGE_SKIPPED: Mapping[str, str] = {
    "device": "its own table (DEVICE)",
    "hydration": "its own table (HYDRATION)",
    "trace": "the startup trace's state (recording, replayed chunks): logged, not a time series",
}

# -- Hydrator.statistics(): Attachment.statistics()["hydration"], per image --------------------

HYDRATION: tuple[Stat, ...] = (
    Stat("hydrated", "lazyfs_image_hydrated", GAUGE, "1 when every chunk the image can read is local (chunk cache or its flat layer files)",
         flag=True),
    Stat("bytes_local", "lazyfs_image_local_bytes", GAUGE, "Stored bytes of the image's local chunks (chunk cache or its flat layer files)"),
    Stat("bytes_total", "lazyfs_image_chunk_bytes", GAUGE, "Stored bytes of every distinct chunk the image can read"),
    Stat("chunks_local", "lazyfs_image_local_chunks", GAUGE, "Distinct chunks of the image that are local (chunk cache or its flat layer files)"),
    Stat("chunks_total", "lazyfs_image_chunks", GAUGE, "Distinct chunks the image can read"),
    Stat("deadline_at", "lazyfs_image_hydrate_deadline_timestamp_seconds", GAUGE,
         "When the image must be fully local (Unix time; only with a hydrate deadline)"),
    Stat("hydrated_at", "lazyfs_image_hydrated_timestamp_seconds", GAUGE,
         "When hydration found every chunk local (Unix time; absent while it is not)"),
    Stat("batches", "lazyfs_image_hydrate_batches_total", COUNTER, "Background download batches run by hydration"),
    Stat("chunks_fetched", "lazyfs_image_hydrate_chunks_total", COUNTER, "Chunks hydration fetched"),
    Stat("bytes_fetched", "lazyfs_image_hydrate_bytes_total", COUNTER, "Stored bytes hydration fetched"),
    Stat("chunks_failed", "lazyfs_image_hydrate_failed_chunks_total", COUNTER,
         "Chunks hydration could not fetch (tried again later)"),
)
HYDRATION_SKIPPED: Mapping[str, str] = {
    "rate": "the current batch's target rate; rate(lazyfs_image_hydrate_bytes_total) is what it achieved",
}

DEVICE: tuple[Stat, ...] = (
    Stat("bytes_read", "lazyfs_image_read_bytes_total", COUNTER, "Bytes read from the image's block device"),
    Stat("bytes_written", "lazyfs_image_written_bytes_total", COUNTER, "Bytes written to the image's block device"),
    Stat("segments", "lazyfs_image_extents", GAUGE, "Extents in the image's merged index"),
    Stat("writable_reads_inline", "lazyfs_image_writable_reads_inline_total", COUNTER,
         "Reads of the writable layer served from the page cache on the event loop (RWF_NOWAIT)"),
    Stat("writable_reads_in_thread", "lazyfs_image_writable_reads_in_thread_total", COUNTER,
         "Reads of the writable layer that waited for the disk in a worker thread"),
)
DEVICE_SKIPPED: Mapping[str, str] = {
    "writable": "its own table (WRITABLE)",
    "block_cache": "the image's share of the host-wide flat cache (FLAT): layers and blocks, not exported per image",
}

WRITABLE: tuple[Stat, ...] = (
    Stat("writes", "lazyfs_image_writable_writes_total", COUNTER, "Writes into the image's writable layer"),
    Stat("flushes", "lazyfs_image_writable_flushes_total", COUNTER, "Flushes of the image's writable layer"),
    Stat("write_errors", "lazyfs_image_writable_write_errors_total", COUNTER,
         "Writes the writable layer could not store (full or broken disk)"),
    Stat("flush_errors", "lazyfs_image_writable_flush_errors_total", COUNTER, "Flushes of the writable layer that failed"),
    Stat("refused_for_reserve", "lazyfs_image_writable_refused_writes_total", COUNTER,
         "Writes refused to keep disk space for the chunk cache"),
    Stat("compactions", "lazyfs_image_writable_compactions_total", COUNTER, "Journal compactions of the writable layer"),
    Stat("compaction_errors", "lazyfs_image_writable_compaction_errors_total", COUNTER,
         "Journal compactions of the writable layer that failed"),
    Stat("pending", "lazyfs_image_writable_pending_writes", GAUGE, "Writes recorded since the last flush"),
    Stat("failed", "lazyfs_image_writable_failed", GAUGE,
         "1 when the writable layer refuses all I/O after a failed flush or fsync (until reopened)", flag=True),
    Stat("max_disk_bytes", "lazyfs_image_writable_disk_limit_bytes", GAUGE,
         "Most disk space the writable layer can take (its data file and journal at full size)"),
)
WRITABLE_SKIPPED: Mapping[str, str] = {}

# -- ExportFS.statistics(): the FUSE front end -------------------------------------------------

FUSE: tuple[Stat, ...] = (
    Stat("requests", "lazyfs_fuse_requests_total", COUNTER, "FUSE requests handled"),
    Stat("errors", "lazyfs_fuse_errors_total", COUNTER, "FUSE requests answered with an error"),
    Stat("failures", "lazyfs_fuse_failures_total", COUNTER, "FUSE requests that hit an unexpected exception (a bug)"),
    Stat("opens", "lazyfs_fuse_opens_total", COUNTER, "Exported files opened"),
    Stat("fsyncs", "lazyfs_fuse_fsyncs_total", COUNTER, "fsync requests on exported files"),
    Stat("open_handles", "lazyfs_fuse_open_handles", GAUGE, "Open handles on exported files"),
    Stat("passthrough_opens", "lazyfs_fuse_passthrough_opens_total", COUNTER,
         "Opens of exported files passed through to a hydrated local file (the kernel serves their reads)"),
    Stat("passthrough", "lazyfs_fuse_passthrough_available", GAUGE,
         "1 when the FUSE connection can pass opens through to local files (docs/warm.md)", flag=True),
    Stat("largest_read", "lazyfs_fuse_largest_read_bytes", GAUGE, "Largest single FUSE read so far"),
    Stat("largest_write", "lazyfs_fuse_largest_write_bytes", GAUGE, "Largest single FUSE write so far"),
)
FUSE_SKIPPED: Mapping[str, str] = {
    "reads": "per export in lazyfs_export_reads_total", "writes": "per export in lazyfs_export_writes_total",
    "bytes_read": "per export in lazyfs_export_read_bytes_total",
    "bytes_written": "per export in lazyfs_export_written_bytes_total",
    "flushes": "per export in lazyfs_export_flushes_total", "exports": "its own table (EXPORT)",
}

EXPORT: tuple[Stat, ...] = (
    Stat("reads", "lazyfs_export_reads_total", COUNTER, "FUSE reads of the exported file"),
    Stat("writes", "lazyfs_export_writes_total", COUNTER, "FUSE writes to the exported file"),
    Stat("bytes_read", "lazyfs_export_read_bytes_total", COUNTER, "Bytes read through FUSE from the exported file"),
    Stat("bytes_written", "lazyfs_export_written_bytes_total", COUNTER, "Bytes written through FUSE to the exported file"),
    Stat("flushes", "lazyfs_export_flushes_total", COUNTER, "Flushes of the exported file"),
    Stat("errors", "lazyfs_export_errors_total", COUNTER, "FUSE requests on the exported file answered with an error"),
    Stat("open_handles", "lazyfs_export_open_handles", GAUGE, "Open handles on the exported file"),
    Stat("passthrough", "lazyfs_export_passthrough", GAUGE,
         "1 when opens of the exported file are passed through to its hydrated local file", flag=True),
    Stat("passthrough_opens", "lazyfs_export_passthrough_opens_total", COUNTER,
         "Opens of the exported file passed through to its hydrated local file"),
)
EXPORT_SKIPPED: Mapping[str, str] = {"size": "the same number as lazyfs_image_size_bytes"}

# -- RegistryClient.statistics(): Host.statistics()["registry"], None until a registry is used ----

REGISTRY: tuple[Stat, ...] = (
    Stat("requests", "lazyfs_registry_requests_total", COUNTER, "HTTP requests sent to registries and mirrors"),
    Stat("retries", "lazyfs_registry_retries_total", COUNTER, "Registry calls repeated by the retry layer"),
    Stat("failovers", "lazyfs_registry_failovers_total", COUNTER, "Registry calls moved on to the next source"),
    Stat("token_requests", "lazyfs_registry_token_requests_total", COUNTER, "Bearer token requests"),
    Stat("auth_challenges", "lazyfs_registry_auth_challenges_total", COUNTER, "Authentication challenges (401) received"),
    Stat("credential_reloads", "lazyfs_registry_credential_reloads_total", COUNTER,
         "Times the credentials were re-read after they changed"),
    Stat("bytes_received", "lazyfs_registry_received_bytes_total", COUNTER, "Body bytes received from registries"),
    Stat("bytes_sent", "lazyfs_registry_sent_bytes_total", COUNTER, "Body bytes sent to registries (uploads)"),
    Stat("reloads", "lazyfs_registry_config_reloads_total", COUNTER, "Registry configuration reloads"),
    Stat("cached_tokens", "lazyfs_registry_cached_tokens", GAUGE, "Bearer tokens held for reuse"),
)
REGISTRY_SKIPPED: Mapping[str, str] = {"sources": "its own table (SOURCE), one series per source"}

#: one series per source (a registry or mirror host), labelled ``source``
SOURCE: tuple[Stat, ...] = (
    Stat("requests", "lazyfs_registry_source_requests_total", COUNTER, "Requests to the source"),
    Stat("errors", "lazyfs_registry_source_errors_total", COUNTER,
         "Requests to the source that failed (connection, timeout, 5xx, 429, bad bytes)"),
    Stat("misses", "lazyfs_registry_source_not_found_total", COUNTER, "Requests the source answered 404"),
    Stat("bad_bytes", "lazyfs_registry_source_integrity_failures_total", COUNTER,
         "Answers from the source whose bytes failed verification"),
    Stat("bytes", "lazyfs_registry_source_received_bytes_total", COUNTER, "Body bytes received from the source"),
    Stat("cold", "lazyfs_registry_source_cold_reads_total", COUNTER,
         "Ranged reads the source answered with a whole blob (a cold pull-through mirror)"),
    Stat("consecutive_failures", "lazyfs_registry_source_consecutive_failures", GAUGE,
         "Failures of the source since its last success"),
)
SOURCE_STATES = ("up", "probing", "down")
SOURCE_SKIPPED: Mapping[str, str] = {
    "latency_seconds_sum": "in the histogram lazyfs_registry_request_duration_seconds",
    "latency_seconds_count": "in the histogram lazyfs_registry_request_duration_seconds",
    "latency_buckets": "in the histogram lazyfs_registry_request_duration_seconds",
    "retry_at": "a time on the picker's (trio) clock, not wall time; lazyfs_registry_source_state says down",
}
SOURCE_LATENCY = "lazyfs_registry_request_duration_seconds"

# -- FlatCache.statistics(): the flat per-layer disk cache (Host.statistics()["flat_cache"]) ----

FLAT: tuple[Stat, ...] = (
    Stat("hits", "lazyfs_flat_cache_hits_total", COUNTER, "Runs of blocks served from a flat layer file (one preadv each)"),
    Stat("misses", "lazyfs_flat_cache_misses_total", COUNTER, "Runs of blocks the flat layer files did not hold"),
    Stat("blocks_served", "lazyfs_flat_cache_served_blocks_total", COUNTER, "Verified blocks read from flat layer files"),
    Stat("nowait_reads", "lazyfs_flat_cache_reads_total", COUNTER, "Flat file reads, by how they were done",
         (("how", "nowait"),)),
    Stat("thread_reads", "lazyfs_flat_cache_reads_total", COUNTER, "", (("how", "thread"),)),
    Stat("tampered", "lazyfs_flat_cache_tampered_total", COUNTER,
         "Flat file reads whose blocks did not match their hashes (the chunk was dropped and fetched again)"),
    Stat("writes", "lazyfs_flat_cache_writes_total", COUNTER, "Extents of verified chunks written to flat layer files"),
    Stat("bytes_written", "lazyfs_flat_cache_written_bytes_total", COUNTER, "Bytes written to flat layer files"),
    Stat("write_errors", "lazyfs_flat_cache_write_errors_total", COUNTER, "Flat file writes or persists that failed"),
    Stat("persists", "lazyfs_flat_cache_persists_total", COUNTER, "Map persists (data fdatasync, then the map records)"),
    Stat("evictions", "lazyfs_flat_cache_evictions_total", COUNTER, "Whole layer files removed to stay under the limit"),
    Stat("copied_blocks", "lazyfs_flat_cache_copied_blocks_total", COUNTER,
         "Blocks of chunks copied from another layer's flat file (dedup by digest), checked against its hashes"),
    Stat("reflinked_blocks", "lazyfs_flat_cache_reflinked_blocks_total", COUNTER,
         "Of those, blocks shared by reflink (FICLONERANGE) instead of copied"),
    Stat("copy_errors", "lazyfs_flat_cache_copy_errors_total", COUNTER,
         "Copies from another layer's flat file that failed or did not match the source's hashes"),
    Stat("fetch_writes", "lazyfs_flat_cache_fetch_writes_total", COUNTER,
         "Of the writes, extents written by the fetch path's decode worker (the chunk then gets no chunk file)"),
    Stat("fetch_bytes_written", "lazyfs_flat_cache_fetch_written_bytes_total", COUNTER,
         "Bytes of those writes"),
    Stat("local_hits", "lazyfs_flat_cache_worker_reads_total", COUNTER,
         "Reads FUSE worker threads asked the flat layer files for, by outcome (served whole, or declined: "
         "a block not held or not matching its hash, and the read went to the trio thread)", (("outcome", "served"),)),
    Stat("local_declined", "lazyfs_flat_cache_worker_reads_total", COUNTER, "", (("outcome", "declined"),)),
    Stat("local_blocks", "lazyfs_flat_cache_worker_served_blocks_total", COUNTER,
         "Verified blocks FUSE worker threads served from flat layer files"),
    Stat("layers", "lazyfs_flat_cache_open_layers", GAUGE, "Layer files open right now"),
    Stat("blocks", "lazyfs_flat_cache_blocks", GAUGE, "Blocks the open layer files hold"),
    Stat("max_bytes", "lazyfs_flat_cache_limit_bytes", GAUGE, "Configured size limit of the flat cache"),
)
FLAT_SKIPPED: Mapping[str, str] = {}

#: Every table with the keys it leaves out on purpose, by the statistics() it reads. Only numbers
#: and nested dicts need a place here; strings, booleans and None describe (names, kinds, paths).
TABLES: Mapping[str, tuple[tuple[Stat, ...], Mapping[str, str]]] = {
    "scheduler": (SCHEDULER, SCHEDULER_SKIPPED),
    "planner": (PLANNER, PLANNER_SKIPPED),
    "cache": (CACHE, CACHE_SKIPPED),
    "image": (IMAGE, IMAGE_SKIPPED),
    "hydration": (HYDRATION, HYDRATION_SKIPPED),
    "device": (DEVICE, DEVICE_SKIPPED),
    "writable": (WRITABLE, WRITABLE_SKIPPED),
    "fuse": (FUSE, FUSE_SKIPPED),
    "export": (EXPORT, EXPORT_SKIPPED),
    "registry": (REGISTRY, REGISTRY_SKIPPED),
    "source": (SOURCE, SOURCE_SKIPPED),
    "flat": (FLAT, FLAT_SKIPPED),
}

# -- DiskBudget.statistics(): Host.statistics()["disk"], sampled every few seconds ----------------

#: the uses of disk space it reports, each with bytes and (when bounded) max_bytes
DISK_USES = ("chunk_cache", "flat_cache", "conversion_cache", "writable_layers")
DISK_SKIPPED: Mapping[str, str] = {
    "sampled_at": "exported as lazyfs_disk_sampled_timestamp_seconds",
    "writable_reserve": "exported as lazyfs_disk_writable_reserve_bytes",
    "filesystems": "exported as lazyfs_filesystem_size_bytes and lazyfs_filesystem_free_bytes",
    **{use: "exported as lazyfs_disk_usage_bytes{use} and lazyfs_disk_limit_bytes{use}" for use in DISK_USES},
}

LATENCY = "lazyfs_chunk_read_duration_seconds"
LATENCY_DOC = "Time from a chunk read request to its verified bytes (memory, disk or network), successful reads"


# -- snapshot -> metric families (pure) --------------------------------------------------------


class _Families:
    """Metric families by name, created on first use with their label names."""

    def __init__(self) -> None:
        self.by_name: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

    def add(self, stat: Stat, value: object, labels: tuple[tuple[str, str], ...] = ()) -> None:
        all_labels = labels + stat.labels
        family = self.by_name.get(stat.name)
        if family is None:
            cls = CounterMetricFamily if stat.kind == COUNTER else GaugeMetricFamily
            family = cls(stat.name, stat.doc, labels=[k for k, _ in all_labels])
            self.by_name[stat.name] = family
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return  # absent (an older or newer statistics()), or None: the family stays, without this sample
        family.add_metric([v for _, v in all_labels], value)

    def declare(self, stats: Iterable[Stat], labels: tuple[str, ...] = ()) -> None:
        """Create the families of *stats* even with no samples, so names and types are always there."""
        for stat in stats:
            self.add(stat, None, tuple((name, "") for name in labels))


def _table(families: _Families, stats: Iterable[Stat], source: Mapping, labels: tuple[tuple[str, str], ...] = (),
           *, declare: bool = False) -> None:
    """Add *source*'s samples of *stats* (with *declare*: first create every family, sampled or not)."""
    if declare:
        families.declare(stats)
    for stat in stats:
        value = source.get(stat.key)
        if stat.flag:
            value = 0 if value in (None, False, "") else 1
        families.add(stat, value, labels)


def _le(bound: object) -> str:
    """A bucket's upper bound as Prometheus writes it."""
    return "+Inf" if bound in ("+Inf", math.inf) else floatToGoString(bound)


def _closed(buckets: list[tuple[str, float]], count: float) -> list[tuple[str, float]]:
    """*buckets* (cumulative) ending in the +Inf bucket, which holds all *count* observations."""
    if not buckets or buckets[-1][0] != "+Inf":
        buckets.append(("+Inf", count))
    return buckets


def histogram_family(name: str, doc: str, snapshot: Mapping) -> HistogramMetricFamily:
    """A histogram family from ``LatencyHistogram.snapshot()``: per-bucket counts made cumulative."""
    buckets, running = [], 0
    for bound, count in snapshot.get("buckets", ()):
        running += count
        buckets.append((_le(bound), running))
    return HistogramMetricFamily(name, doc, buckets=_closed(buckets, running), sum_value=snapshot.get("sum", 0.0))


def metric_families(snapshot: Mapping) -> list:
    """Every lazyfs metric family for one statistics snapshot.

    *snapshot* is ``Host.statistics()`` (attachments, scheduler, disk, registry) plus
    ``"fuse": ExportFS.statistics()`` (or ``{}``).
    """
    families = _Families()
    attachments: Mapping = snapshot.get("attachments") or {}
    scheduler: Mapping = snapshot.get("scheduler") or {}
    fuse: Mapping = snapshot.get("fuse") or {}

    attached = GaugeMetricFamily("lazyfs_attached_images", "Images attached to the daemon")
    attached.add_metric([], len(attachments))
    info = GaugeMetricFamily("lazyfs_image_info", "Attached images (value 1), described by their labels",
                             labels=[*IMAGE_LABELS, "manifest", "writable"])
    for stats in (IMAGE, HYDRATION, DEVICE, WRITABLE, EXPORT):
        families.declare(stats, IMAGE_LABELS)
    images: dict[str, str] = {}
    for name, att in sorted(attachments.items()):
        image = str(att.get("image", ""))
        images[name] = image
        labels = (("image", image), ("name", name))
        device = att.get("device") or {}
        writable = device.get("writable") or {}
        info.add_metric([image, name, str(att.get("manifest", "")), str(writable.get("kind", "no"))], 1)
        _table(families, IMAGE, att, labels)
        _table(families, DEVICE, device, labels)
        _table(families, HYDRATION, att.get("hydration") or {}, labels)
        if writable:
            _table(families, WRITABLE, writable, labels)
    for name, export in sorted((fuse.get("exports") or {}).items()):
        _table(families, EXPORT, export, (("image", images.get(name, "")), ("name", name)))

    _table(families, FUSE, fuse, declare=True)
    families.declare(SCHEDULER + PLANNER + CACHE)
    _table(families, SCHEDULER, scheduler)
    planner = scheduler.get("planner") or {}
    _table(families, PLANNER, planner)
    queued = GaugeMetricFamily("lazyfs_plan_queued_chunks", "Chunks waiting for a fetch job, by priority",
                               labels=["priority"])
    for priority, n in sorted((planner.get("queued_by_priority") or {}).items()):
        queued.add_metric([priority], n)
    _table(families, CACHE, scheduler.get("cache") or {})
    latency = histogram_family(LATENCY, LATENCY_DOC, scheduler.get("latency") or {})
    _table(families, FLAT, snapshot.get("flat_cache") or {}, declare=True)
    registry: Mapping = snapshot.get("registry") or {}
    _table(families, REGISTRY, registry, declare=True)
    families.declare(SOURCE, ("source",))
    sources = [src for src in registry.get("sources") or () if isinstance(src, Mapping) and src.get("host")]
    for src in sources:
        _table(families, SOURCE, src, (("source", str(src["host"])),))
    return [attached, info, *families.by_name.values(), queued, *disk_families(snapshot.get("disk") or {}, images),
            *source_families(sources), latency]


def source_families(sources: Iterable[Mapping]) -> list:
    """Each source's health state (1 for the state it is in) and its request latency histogram."""
    state = GaugeMetricFamily("lazyfs_registry_source_state", "1 for the health state the source is in, else 0",
                              labels=["source", "state"])
    latency = HistogramMetricFamily(SOURCE_LATENCY, "Time each request to the source took, by source",
                                    labels=["source"])
    for src in sources:
        host = str(src["host"])
        for name in SOURCE_STATES:
            state.add_metric([host, name], 1 if src.get("state") == name else 0)
        buckets = [(_le(bound), n) for bound, n in src.get("latency_buckets") or ()]
        count = src.get("latency_seconds_count", buckets[-1][1] if buckets else 0)
        latency.add_metric([host], _closed(buckets, count), src.get("latency_seconds_sum", 0.0))
    return [state, latency]


def disk_families(disk: Mapping, images: Mapping[str, str]) -> list:
    """Gauges of the disk budget's last sample: space by use, limits, file systems, per writable layer."""
    usage = GaugeMetricFamily("lazyfs_disk_usage_bytes", "Disk space lazyfs uses, by use", labels=["use"])
    limit = GaugeMetricFamily("lazyfs_disk_limit_bytes", "Most disk space lazyfs may use, by use (when bounded)",
                              labels=["use"])
    for use in DISK_USES:
        entry = disk.get(use) or {}
        if isinstance(entry.get("bytes"), (int, float)):
            usage.add_metric([use], entry["bytes"])
        if isinstance(entry.get("max_bytes"), (int, float)):
            limit.add_metric([use], entry["max_bytes"])
    layer_usage = GaugeMetricFamily("lazyfs_image_writable_disk_bytes", "Disk space the image's writable layer takes",
                                    labels=list(IMAGE_LABELS))
    for name, layer in sorted(((disk.get("writable_layers") or {}).get("layers") or {}).items()):
        if name in images and isinstance(layer.get("bytes"), (int, float)):
            layer_usage.add_metric([images[name], name], layer["bytes"])
    reserve = GaugeMetricFamily("lazyfs_disk_writable_reserve_bytes",
                                "Free space writable layers leave for the chunk cache on a shared file system")
    sampled = GaugeMetricFamily("lazyfs_disk_sampled_timestamp_seconds", "When the disk figures were sampled (Unix time)")
    if "writable_reserve" in disk:
        reserve.add_metric([], disk["writable_reserve"])
    if "sampled_at" in disk:
        sampled.add_metric([], disk["sampled_at"])
    size = GaugeMetricFamily("lazyfs_filesystem_size_bytes", "Size of a file system holding lazyfs roots",
                             labels=["roots"])
    free = GaugeMetricFamily("lazyfs_filesystem_free_bytes", "Space left on a file system holding lazyfs roots",
                             labels=["roots"])
    for fs in disk.get("filesystems") or ():
        roots = ",".join(fs.get("roots") or ())
        size.add_metric([roots], fs.get("total_bytes", 0))
        free.add_metric([roots], fs.get("free_bytes", 0))
    return [usage, limit, layer_usage, reserve, sampled, size, free]


# -- the exporter (I/O shell) --------------------------------------------------------------


class HostCollector(Collector):
    """Serves the latest snapshot. Snapshots are taken on the trio thread, never from the scrape thread.

    ``update`` swaps in a new dict (never mutated afterwards), so a scrape sees one whole snapshot.
    """

    def __init__(self) -> None:
        self.snapshot: Mapping = {}

    def update(self, snapshot: Mapping) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator:
        yield from metric_families(self.snapshot)


def take_snapshot(host, fs=None) -> dict:
    """The statistics the metrics are made of, from a ``Host`` and (optionally) an ``ExportFS``."""
    stats = host.statistics()
    return {**stats, "fuse": fs.statistics() if fs is not None else {}}


def new_registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own (no global state): lazyfs metrics plus the process, platform and GC ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


async def serve_metrics(address: str, host, fs=None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``/metrics`` on *address* ("HOST:PORT") until cancelled."""
    bind, _, port = address.rpartition(":")
    collector = HostCollector()
    collector.update(take_snapshot(host, fs))
    try:
        server, thread = start_http_server(int(port), addr=bind.strip("[]"), registry=new_registry(collector))
    except OSError as exc:
        raise ConfigError(f"metrics_address {address}: {exc.strerror or exc}") from None
    task_status.started()
    try:
        while True:
            collector.update(take_snapshot(host, fs))
            await trio.sleep(SNAPSHOT_INTERVAL)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
