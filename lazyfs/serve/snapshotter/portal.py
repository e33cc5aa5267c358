"""The snapshotter's one trio event loop: a thread of its own that gRPC worker threads enter.

gRPC answers each request in a worker thread of its pool. Registry lookups and host commands
are trio code, and starting a ``trio.run`` (and a new HTTP client) per request threw away
connections, TLS sessions and tokens every time and made each call pay for a new loop. Here
one loop runs for the life of the process, with one `ImageOpener` (one HTTP client) that every
call shares; a worker thread runs a coroutine on it with `TrioPortal.run`
(``trio.from_thread.run``) and blocks only itself while it waits.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from lazyfs.config import Config
from lazyfs.errors import LazyfsError
from lazyfs.image.remote import ImageOpener

T = TypeVar("T")
START_SECONDS = 30.0


class TrioPortal:
    """A trio loop in a dedicated thread, with ``opener``: the registry client all calls share.

    ``run(fn, *args)`` runs ``await fn(*args)`` on the loop from any other thread and returns
    its result (its exception is raised in the caller). ``close()`` stops the loop (calls still
    running are cancelled), closes the client and joins the thread. Never call ``run`` from the
    loop's own thread.
    """

    def __init__(self, config: Config, *, name: str = "lazyfs-trio") -> None:
        self.config = config
        self.opener: ImageOpener | None = None  # made on the loop, at start
        self.calls = 0  # coroutines run through the portal (a count for tests and statistics)
        self._count = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(START_SECONDS) or self._token is None:
            raise LazyfsError(f"the snapshotter's event loop did not start: {self._failed!r}")

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported by __init__ (or lost at shutdown: nothing waits)
            self._failed = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        self.opener = ImageOpener(self.config)
        try:
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self.opener.aclose()

    def run(self, fn: Callable[..., Awaitable[T]], *args) -> T:
        """``await fn(*args)`` on the loop; blocks the calling (non-trio) thread until it is done."""
        if self._closed:
            raise LazyfsError("the snapshotter is stopping")
        with self._count:
            self.calls += 1
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        self._thread.join(START_SECONDS)
