"""Progress bars (rich, on stderr) for conversion: download, convert and push, with bytes and rate."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from lazyfs.image.convert import ConvertProgress

_LABELS = {"download": "download", "convert": "convert ", "push": "push    ", "verify": "verify  "}


class RichProgress(ConvertProgress):
    """One bar per phase, created when the phase first learns how many bytes it has."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
        self.tasks: dict[str, TaskID] = {}
        self.totals: dict[str, int] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> "RichProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def _task(self, phase: str) -> TaskID:
        with self.lock:
            if phase not in self.tasks:
                self.tasks[phase] = self.bars.add_task(_LABELS.get(phase, phase), total=0)
            return self.tasks[phase]

    def add_total(self, phase: str, n: int) -> None:
        task = self._task(phase)
        with self.lock:
            self.totals[phase] = self.totals.get(phase, 0) + n
            self.bars.update(task, total=self.totals[phase])

    def advance(self, phase: str, n: int) -> None:
        if n:
            self.bars.advance(self._task(phase), n)

    def note(self, text: str) -> None:
        self.console.log(text)
