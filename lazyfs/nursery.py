"""Nurseries that fail with the error that happened, not with an exception group.

Every nursery in lazyfs is ``lazyfs.nursery.open_nursery()``. Where a group can still arrive
from a library's own nursery, the boundary that reports errors (the CLI, the control socket,
the snapshotter's gRPC service) reduces it with ``single_error``. docs/errors.md has the rule.

trio is imported by ``open_nursery`` only: ``single_error`` also serves the CLI's mount path,
which runs without trio (its import is most of a cold `lazyfs mount`'s start, BENCHMARKS.md).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from lazyfs.errors import LazyfsError, ManyErrors

if TYPE_CHECKING:
    import trio


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _expected(exc: BaseException) -> bool:
    """An error lazyfs reports to its user as such (anything else is a bug)."""
    return isinstance(exc, (LazyfsError, OSError))


def single_error(exc: BaseException) -> BaseException:
    """The one exception that *exc* is about; *exc* itself unless it is an exception group.

    Of a group's leaves, in this order:

    1. an interpreter exit (KeyboardInterrupt, SystemExit, GeneratorExit) wins;
    2. a bug (neither a LazyfsError nor an OSError) comes next, so it is never disguised;
    3. one error (or several equal ones) is that error itself;
    4. several different errors become one ``ManyErrors`` that names the first cause;
    5. a group of nothing but trio.Cancelled is one of them: the cancellation goes on.

    trio.Cancelled next to an error is the echo of that error cancelling its siblings.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = list(_leaves(exc))
    loaded_trio = sys.modules.get("trio")  # without trio loaded, no trio.Cancelled can exist
    cancelled = (loaded_trio.Cancelled,) if loaded_trio is not None else ()
    for leaf in leaves:
        if not isinstance(leaf, (Exception, *cancelled)):
            return leaf
    errors = [leaf for leaf in leaves if isinstance(leaf, Exception)]
    if not errors:
        return leaves[0]
    bugs = [error for error in errors if not _expected(error)]
    if bugs:
        return bugs[0]
    distinct = list({(type(error), str(error)): error for error in errors}.values())
    if len(distinct) == 1:
        return errors[0]
    summary = ManyErrors(distinct)
    summary.__cause__ = distinct[0]
    return summary


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """``trio.open_nursery()`` that raises ``single_error`` of its exception group.

    A failing child task (or the body) surfaces as its own exception, so callers catch
    ``LazyfsError`` as if there were no tasks; the traceback of that exception is kept.
    """
    import trio  # here, not at the top: see the module's docstring

    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        error = single_error(group)
    else:
        return
    raise error  # outside the except block, so the group does not become its __context__
