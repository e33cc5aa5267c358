"""Which source to ask next: endpoint order, health, exclusions (pure code, time passed in).

Every source (an endpoint's ``host[:port]``) has a health state::

    up ──failure × threshold──▶ down ──cooldown passes──▶ probing
     ▲                           ▲                          │
     └──────── success ──────────┼──────── success ─────────┤
                                 └──────── failure ─────────┘  (cooldown doubles, up to a cap)

* ``up`` and ``probing`` sources are tried in their configured order (mirrors first, origin
  last); ``down`` ones after all of them, soonest-to-recover first. So when a mirror is
  down its rack goes to the next mirror or the origin, and when the origin is down (or
  everything before it is) the remaining mirrors are still tried: failover runs in both
  directions, and nothing is ever skipped outright.
* A 404 is not a health failure (a mirror may simply not have the blob), nor is an auth
  refusal. Bytes that failed verification are: one such failure takes a source down.
* Sources a caller excludes (they served bytes that failed verification) are not offered.
* A source that answered a ranged read of one blob with the whole blob (a cold pull-through
  mirror, which fetches the blob from upstream while it answers) is *cold* for that blob for
  ``cold_seconds``: reads of that blob ask it after the other usable sources, so they neither
  wait for its cache nor make it pull the blob from upstream again (docker-registry 2.8 starts
  another upstream copy for every request while it fills its cache). Afterwards, or as soon as
  it serves that blob (a whole-blob read through it, or a range), it is asked in its place again.

``SourcePicker`` also keeps per-source counters (requests, errors, bytes, latency) for
``statistics()``. Its maps are bounded: configured sources are kept, others are evicted
least recently used beyond ``max_sources``; the cold marks by ``max_cold``.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import cachetools

from lazyfs.errors import ConfigError

# Upper bounds (seconds) of the per-source latency histogram; the last is +inf.
LATENCY_BOUNDS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"
    PROBING = "probing"


class Outcome(enum.Enum):
    """What one request to a source came to, as far as its health is concerned."""

    OK = "ok"  # an answer (2xx, or a 404/401/403: the source works)
    MISSING = "missing"  # 404: works, but lacks what was asked
    FAILED = "failed"  # connection error, timeout, 5xx, 429, a cut body
    BAD_BYTES = "bad_bytes"  # served bytes that failed verification


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """``failures`` consecutive failures take a source down for ``cooldown`` seconds, doubling
    on each failed probe up to ``max_cooldown``."""

    failures: int = 2
    cooldown: float = 5.0
    max_cooldown: float = 120.0
    max_sources: int = 256
    cold_seconds: float = 10.0  # how long a cold mirror is asked last for one blob
    max_cold: int = 4096

    def __post_init__(self) -> None:
        if (self.failures < 1 or self.cooldown <= 0 or self.max_cooldown < self.cooldown or self.max_sources < 1
                or self.cold_seconds < 0 or self.max_cold < 1):
            raise ConfigError(f"health policy: invalid {self}")


@dataclass(frozen=True, slots=True)
class SourceStatistics:
    """One source's health and traffic, for ``statistics()`` and per-source metrics."""

    host: str
    state: str  # "up", "down" or "probing"
    requests: int
    errors: int  # FAILED and BAD_BYTES outcomes
    misses: int  # 404s
    bad_bytes: int
    bytes: int  # body bytes received from it
    consecutive_failures: int
    cold: int  # ranged reads it answered with a whole blob (a cold pull-through mirror)
    retry_at: float | None  # when a down source is probed again (picker clock)
    latency_seconds_sum: float
    latency_seconds_count: int
    latency_buckets: tuple[tuple[float, int], ...]  # (upper bound, cumulative count), Prometheus style


@dataclass(slots=True)
class _Source:
    host: str
    state: Health = Health.UP
    consecutive: int = 0
    downs: int = 0  # consecutive trips to down, for the cooldown's doubling
    retry_at: float = 0.0
    requests: int = 0
    errors: int = 0
    misses: int = 0
    bad_bytes: int = 0
    bytes: int = 0
    cold: int = 0
    latency_sum: float = 0.0
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BOUNDS))


class SourcePicker:
    """Orders sources by health and records what each request to them came to."""

    def __init__(self, policy: HealthPolicy = HealthPolicy(), configured: Iterable[str] = ()) -> None:
        self.policy = policy
        self._configured = frozenset(configured)
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._cold: cachetools.LRUCache[tuple[str, str], float] = cachetools.LRUCache(policy.max_cold)

    def reconfigure(self, configured: Iterable[str]) -> None:
        """A new set of configured sources (after a reload). Sources that stay keep their health;
        sources no longer configured are forgotten."""
        removed = self._configured - frozenset(configured)
        self._configured = frozenset(configured)
        for host in removed:
            self._sources.pop(host, None)
        for key in [k for k in self._cold if k[0] in removed]:
            del self._cold[key]

    def _get(self, host: str) -> _Source:
        src = self._sources.get(host)
        if src is None:
            src = self._sources[host] = _Source(host)
            self._evict()
        else:
            self._sources.move_to_end(host)
        return src

    def _evict(self) -> None:
        excess = len(self._sources) - self.policy.max_sources
        if excess <= 0:
            return
        for host in [h for h in self._sources if h not in self._configured][:excess]:
            del self._sources[host]

    def state(self, host: str, now: float) -> Health:
        src = self._sources.get(host)
        if src is None:
            return Health.UP
        if src.state is Health.DOWN and now >= src.retry_at:
            src.state = Health.PROBING
        return src.state

    def order(self, hosts: Sequence[str], now: float, exclude: Collection[str] = (), key: str | None = None) -> list[str]:
        """*hosts* (in configured order) minus *exclude*: usable ones first, in order (those cold
        for *key* after the others), then the down ones by when they recover."""
        usable, cold, down = [], [], []
        for i, host in enumerate(hosts):
            if host in exclude:
                continue
            if self.state(host, now) is Health.DOWN:
                down.append((self._sources[host].retry_at, i, host))
            elif key is not None and self.is_cold(host, key, now):
                cold.append(host)
            else:
                usable.append(host)
        return usable + cold + [host for _, _, host in sorted(down)]

    def mark_cold(self, host: str, key: str, now: float) -> None:
        """*host* answered a ranged read of *key* with the whole of it: ask it last for a while."""
        self._get(host).cold += 1
        if self.policy.cold_seconds > 0:
            self._cold[(host, key)] = now + self.policy.cold_seconds

    def warm(self, host: str, key: str) -> None:
        """*host* served *key*: it is no longer cold for it."""
        self._cold.pop((host, key), None)

    def is_cold(self, host: str, key: str, now: float) -> bool:
        until = self._cold.get((host, key))
        if until is None:
            return False
        if now >= until:
            del self._cold[(host, key)]
            return False
        return True

    def record(self, host: str, outcome: Outcome, now: float, *, seconds: float | None = None, nbytes: int = 0) -> Health:
        """Account one request to *host*; returns its state afterwards."""
        src = self._get(host)
        src.requests += 1
        src.bytes += nbytes
        if seconds is not None:
            src.latency_sum += seconds
            src.latency[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        if outcome in (Outcome.OK, Outcome.MISSING):
            src.misses += outcome is Outcome.MISSING
            src.state, src.consecutive, src.downs = Health.UP, 0, 0
            return src.state
        src.errors += 1
        src.bad_bytes += outcome is Outcome.BAD_BYTES
        src.consecutive += 1
        probing = self.state(host, now) is Health.PROBING
        if probing or outcome is Outcome.BAD_BYTES or src.consecutive >= self.policy.failures:
            cooldown = min(self.policy.max_cooldown, self.policy.cooldown * 2 ** src.downs)
            src.downs += 1
            src.state, src.retry_at = Health.DOWN, now + cooldown
        return src.state

    def add_bytes(self, host: str, nbytes: int) -> None:
        """Body bytes received from *host* after its request was accounted."""
        self._get(host).bytes += nbytes

    def statistics(self, now: float) -> tuple[SourceStatistics, ...]:
        out = []
        for host, src in self._sources.items():
            state = self.state(host, now)
            cumulative, buckets = 0, []
            for bound, n in zip(LATENCY_BOUNDS, src.latency):
                cumulative += n
                buckets.append((bound, cumulative))
            out.append(SourceStatistics(
                host=host, state=state.value, requests=src.requests, errors=src.errors, misses=src.misses,
                bad_bytes=src.bad_bytes, bytes=src.bytes, consecutive_failures=src.consecutive, cold=src.cold,
                retry_at=src.retry_at if state is Health.DOWN else None,
                latency_seconds_sum=src.latency_sum, latency_seconds_count=cumulative,
                latency_buckets=tuple(buckets),
            ))
        return tuple(sorted(out, key=lambda s: s.host))
