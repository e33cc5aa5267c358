"""The one retry layer of the registry client: tenacity's loop with trio sleeps, under one deadline.

``retrying(policy, what, attempt)`` runs *attempt* until it returns, retrying only
``Transient`` failures (5xx, 429, connection errors, timeouts, cut bodies):

* at most ``policy.attempts`` attempts, with full-jitter exponential backoff between them
  (``base_delay`` doubling up to ``max_delay``), or the server's ``Retry-After`` when it
  asks for longer;
* under one deadline on trio's clock: no attempt starts, and no backoff sleeps, past
  ``policy.deadline`` seconds after the call began; with ``hard=True`` (every call but
  uploads) an attempt still running at the deadline is cancelled too;
* anything else (404, auth refusals, bad digests, malformed answers) ends the call at once.

It raises the lazyfs error the last failure stands for; a Transient never leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity
import trio

from lazyfs.errors import ConfigError, FetchError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter, and a deadline per public call.

    ``attempt_timeout`` bounds one request to one source whose answer has a known, bounded
    size (ranged reads, HEADs, manifests, tokens): a source that stalls longer counts as
    failed and the next one is asked. Whole-blob streams are bounded by the client's idle
    (read) timeout instead.
    """

    attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 8.0
    deadline: float = 120.0
    attempt_timeout: float = 10.0

    def __post_init__(self) -> None:
        if (self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0 or self.deadline <= 0
                or self.attempt_timeout <= 0):
            raise ConfigError(f"retry policy: invalid {self}")


class Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's ``Retry-After`` in seconds."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        self.message, self.status, self.retry_after = message, status, retry_after
        super().__init__(message)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (an HTTP date is ignored)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(min(int(value.strip()), 3600))


async def retrying(
    policy: RetryPolicy,
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    hard: bool = True,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Run *attempt* under *policy* (see the module docstring)."""
    started = trio.current_time()
    deadline = started + policy.deadline
    seen: list[str] = []  # each distinct failure, for the final message
    status: list[int | None] = [None]  # the last HTTP status seen (a later reset has none)
    backoff = tenacity.wait_random_exponential(multiplier=policy.base_delay, max=policy.max_delay)

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = backoff(state)
        if isinstance(exc, Transient) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return delay

    def past_deadline(state: tenacity.RetryCallState) -> bool:
        return trio.current_time() + state.upcoming_sleep >= deadline

    def note(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, Transient):
            status[0] = exc.status if exc.status is not None else status[0]
            if exc.message not in seen:
                seen.append(exc.message)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None:
            on_retry()

    loop = tenacity.AsyncRetrying(
        sleep=trio.sleep,
        stop=tenacity.stop_after_attempt(policy.attempts) | past_deadline,
        wait=wait,
        retry=tenacity.retry_if_exception_type(Transient),
        after=note,
        before_sleep=before_sleep,
        reraise=True,
    )
    last: Transient | None = None
    with trio.move_on_at(deadline if hard else math.inf):
        try:
            return await loop(attempt)
        except Transient as e:
            last = e
        attempts = loop.statistics.get("attempt_number", 1)
        others = [m for m in seen if m != last.message]
        before = f"; earlier: {'; '.join(others)}" if others else ""
        why = f"gave up after {attempts} attempts" if attempts >= policy.attempts else (
            f"gave up after {attempts} attempts: the {policy.deadline:g} s deadline is near")
        raise FetchError(f"{what}: {last.message} ({why}{before})", status[0])
    cause = f"; last error: {seen[-1]}" if seen else ""
    raise FetchError(f"{what}: no success within the {policy.deadline:g} s deadline{cause}", status[0])
