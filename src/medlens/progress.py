"""Progress bars on stderr (rich) for stages that can take more than a second; silent when disabled."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

Update = Callable[[int, int], None]
"""update(done, total)"""


class Reporter:
    """Hands out progress callbacks per stage. ``Reporter(False)`` is a no-op."""

    def __init__(self, enabled: bool = False) -> None:
        import sys

        self.enabled = enabled and sys.stderr.isatty()

    @contextlib.contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Update]:
        if not self.enabled:
            yield lambda done, total: None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(description, total=total, rate="")

            def update(done: int, new_total: int) -> None:
                bar.update(task, completed=done, total=new_total)
                speed = next(t.speed for t in bar.tasks if t.id == task)
                bar.update(task, rate=f"{speed:.2f}/s" if speed else "")

            yield update


class Timer:
    """Collects wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)
