"""lazyfs.nursery: a nursery fails with the error that happened, never with an exception group."""

from __future__ import annotations

import errno
import traceback

import pytest
import trio

from lazyfs.errors import FetchError, IntegrityError, LazyfsError, ManyErrors, NotFoundError, describe, one_line
from lazyfs.nursery import open_nursery, single_error


async def _fail(exc: BaseException, delay: float = 0) -> None:
    await trio.sleep(delay)
    raise exc


async def _raise_at_once(exc: BaseException) -> None:
    raise exc  # no checkpoint first: two of these both fail before either can be cancelled


async def _forever() -> None:
    await trio.sleep_forever()


def test_a_failing_task_surfaces_as_its_own_error_with_its_traceback():
    error = IntegrityError("layer metadata", "sha256:aa", "sha256:bb")

    async def main():
        async with open_nursery() as nursery:
            nursery.start_soon(_forever)  # cancelled by the failure: an echo, not a second error
            nursery.start_soon(_fail, error)

    with pytest.raises(IntegrityError) as caught:
        trio.run(main)
    assert caught.value is error
    assert "_fail" in "".join(traceback.format_tb(caught.value.__traceback__))
    assert not isinstance(caught.value.__context__, BaseExceptionGroup)


def test_the_body_error_surfaces_as_itself():
    async def main():
        async with open_nursery() as nursery:
            nursery.start_soon(_forever)
            raise NotFoundError("no such tag")

    with pytest.raises(NotFoundError, match="no such tag"):
        trio.run(main)


def test_several_different_errors_become_one_summary_naming_the_first():
    first, second = NotFoundError("tag v9 of 127.0.0.1:1/a"), FetchError("HTTP 503 from 127.0.0.1:1")

    async def main():
        async with open_nursery() as nursery:
            nursery.start_soon(_raise_at_once, first)
            nursery.start_soon(_raise_at_once, second)

    with pytest.raises(ManyErrors) as caught:
        trio.run(main)
    summary = caught.value
    assert isinstance(summary, LazyfsError)
    assert set(summary.errors) == {first, second}
    assert str(summary).startswith(describe(summary.errors[0])) and "and 1 more error" in str(summary)
    assert summary.errno == summary.errors[0].errno
    assert summary.__cause__ is summary.errors[0]


def test_equal_errors_are_one_error():
    group = ExceptionGroup("", [FetchError("cannot connect"), FetchError("cannot connect")])
    assert single_error(group) is group.exceptions[0]


def test_a_bug_is_never_hidden_behind_an_expected_error():
    bug = TypeError("unsupported operand")
    group = ExceptionGroup("", [FetchError("x"), ExceptionGroup("", [bug])])
    assert single_error(group) is bug


def test_an_interrupt_wins_and_pure_cancellation_stays_cancellation():
    interrupt = KeyboardInterrupt()
    assert single_error(BaseExceptionGroup("", [FetchError("x"), interrupt])) is interrupt

    async def main():
        with trio.CancelScope() as scope:
            async with open_nursery() as nursery:
                nursery.start_soon(_forever)
                nursery.start_soon(_forever)
                scope.cancel()
        return scope.cancelled_caught

    assert trio.run(main)


def test_an_error_next_to_cancellations_is_that_error():
    group = BaseExceptionGroup("", [trio.Cancelled._create(), FetchError("x"), trio.Cancelled._create()])
    assert isinstance(single_error(group), FetchError)


def test_describe_falls_back_to_the_cause_and_then_the_type_name():
    class Quiet(Exception):
        def __str__(self) -> str:
            return ""

    try:
        try:
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        except OSError as inner:
            raise Quiet() from inner
    except Quiet as exc:
        assert describe(exc) == "[Errno 111] Connection refused"
    try:
        try:
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        except OSError:
            raise Quiet() from None  # as httpcore does: the reason is only in the suppressed context
    except Quiet as exc:
        assert describe(exc) == "[Errno 111] Connection refused"
    assert describe(Quiet()) == "Quiet"


def test_one_line_is_one_line_and_says_a_bug_is_a_bug():
    assert one_line(LazyfsError("mkfs failed:\n  line one\n\n  line two")) == "mkfs failed:; line one; line two"
    assert one_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")) == "No such file or directory: /x"
    assert one_line(KeyError("k")).startswith("internal error: KeyError: 'k'")
