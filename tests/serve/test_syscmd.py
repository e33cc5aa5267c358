"""syscmd's steps run the same under both runners: the blocking one (the CLI) and trio's (the daemon).

No root needed: the commands are ``sh -c``.
"""

from __future__ import annotations

import time

import pytest
import trio

from lazyfs.errors import BusyError
from lazyfs.serve import system
from lazyfs.serve.syscmd import TERM_GRACE, Command, CommandError, run_steps_blocking


def _steps(log: list[str]):
    """Every kind of step: a command's stdout comes back, a failure is thrown in where it was yielded."""
    out = yield Command(("sh", "-c", "echo hello"))
    log.append(out.strip())
    try:
        yield Command(("sh", "-c", "echo half >&1; echo broken >&2; exit 3"))
    except CommandError as exc:
        log.append(f"{exc.returncode} {exc.stdout.strip()} {exc.stderr.strip()}")
    try:
        yield Command(("sh", "-c", "echo 'device is busy' >&2; exit 32"))
    except BusyError:
        log.append("busy")
    try:
        yield Command(("sleep", "5"), timeout=0.2)
    except CommandError as exc:
        log.append(f"timeout {exc.returncode}")
    log.append((yield lambda: "called"))

    def fail() -> None:
        raise FileNotFoundError("gone")

    try:
        yield fail
    except FileNotFoundError:
        log.append("not found")
    return "done"


EXPECTED = ["hello", "3 half broken", "busy", "timeout None", "called", "not found"]


def test_the_blocking_runner():
    log: list[str] = []
    assert run_steps_blocking(_steps(log)) == "done"
    assert log == EXPECTED


def test_the_trio_runner():
    log: list[str] = []
    assert trio.run(system.run_steps, _steps(log)) == "done"
    assert log == EXPECTED


def _uncaught():
    yield Command(("sh", "-c", "exit 1"))


@pytest.mark.parametrize("runner", [run_steps_blocking, lambda steps: trio.run(system.run_steps, steps)])
def test_a_failure_the_steps_do_not_catch_is_the_callers(runner):
    with pytest.raises(CommandError, match="exited with 1"):
        runner(_uncaught())


def _stubborn():
    yield Command(("sh", "-c", "trap '' TERM; exec sleep 30"), timeout=0.2)


@pytest.mark.parametrize("runner", [run_steps_blocking, lambda steps: trio.run(system.run_steps, steps)])
def test_a_command_that_ignores_sigterm_is_killed_after_the_grace(runner):
    """Both runners: SIGTERM at the timeout, SIGKILL TERM_GRACE seconds later, then the timeout error."""
    started = time.monotonic()
    with pytest.raises(CommandError, match="no answer after 0.2 s"):
        runner(_stubborn())
    assert 0.2 + TERM_GRACE - 0.1 < time.monotonic() - started < 0.2 + TERM_GRACE + 3
