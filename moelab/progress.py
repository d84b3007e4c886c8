"""Progress for the long phases of a command: rich bars on a terminal, plain lines in a pipe.

A phase that takes more than a couple of seconds must show it is alive. On a terminal each stage
is a transient rich bar (a spinner for phases without a count). In a pipe or a log file a bar
would be noise, so a stage that has run for ``delay`` seconds gets a line, and then another at
least every ``every`` seconds while it runs (its count, or its name and elapsed time), from a
background thread, so a single long step (one forward pass over many tokens, a plot) still gets
its line. Quick stages, and errors found in the first seconds, print nothing extra.

    with Progress("inspect") as progress:
        with progress.phase("reading the run and its held-out tokens"):
            ...
        advance = progress.stage("routing", total=16384)     # the inspect_run(progress=...) shape
        advance(512)
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional


def no_progress(stage: str, total: int) -> Callable[[int], None]:
    """A stage factory that shows nothing (the default of functions that take ``progress``)."""
    return lambda n: None


class Progress:
    """``with Progress(name) as p``: ``p.stage(title, total)`` returns an advance callable;
    ``with p.phase(title)`` marks an uncounted phase. ``enabled=False`` (``--quiet``) shows
    nothing; ``log`` receives the pipe lines (default: stderr)."""

    def __init__(self, name: str, *, enabled: bool = True, every: float = 10.0, delay: float = 2.0,
                 log: Optional[Callable[[str], None]] = None, console=None):
        from rich.console import Console
        self.name, self.enabled, self.every, self.delay = name, enabled, every, delay
        self.console = console or Console(stderr=True)
        self.terminal = self.enabled and self.console.is_terminal
        self._log = log or (lambda m: print(m, file=self.console.file, flush=True))
        self._lock = threading.Lock()
        self._current: Optional[dict] = None      # {"title", "total", "done", "start"}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bar = None
        self._task = None

    # ---- lifetime ----------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        if self.terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bars, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)
            self._bar = Bars(SpinnerColumn(), TextColumn(f"[bold]{self.name}[/]: {{task.description}}"),
                             BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                             console=self.console, transient=True)
            self._bar.start()
        elif self.enabled:
            self._thread = threading.Thread(target=self._heartbeat, name=f"{self.name}-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.stop()

    # ---- stages and phases ------------------------------------------------------------------------
    def stage(self, title: str, total: Optional[int]) -> Callable[[int], None]:
        """Start a counted stage (ending the previous one); returns ``advance(n)``."""
        with self._lock:
            self._current = {"title": title, "total": total, "done": 0, "start": time.monotonic(),
                             "said": None}       # when the pipe last got a line for this stage
            current = self._current
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(title, total=total)

        def advance(n: int = 1) -> None:
            current["done"] += n
            if self._bar is not None and self._current is current:
                self._bar.advance(self._task, n)
        return advance

    @contextmanager
    def phase(self, title: str) -> Iterator[None]:
        """An uncounted phase: a spinner on a terminal, the elapsed time in a pipe."""
        self.stage(title, None)
        try:
            yield
        finally:
            with self._lock:
                self._current = None
            if self._bar is not None and self._task is not None:
                self._bar.remove_task(self._task)
                self._task = None

    def line(self) -> Optional[str]:
        """What the pipe line says now, or None between stages."""
        with self._lock:
            c = dict(self._current) if self._current else None
        if c is None:
            return None
        elapsed = time.monotonic() - c["start"]
        if c["total"]:
            return (f"{self.name}: {c['title']} {c['done']:,}/{c['total']:,} "
                    f"({100 * c['done'] / c['total']:.0f}%), {elapsed:.0f} s")
        return f"{self.name}: {c['title']}, {elapsed:.0f} s"

    def _heartbeat(self) -> None:
        tick = min(0.25, self.delay, self.every)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                c = self._current
                due = c is not None and (now - c["start"] >= self.delay if c["said"] is None
                                         else now - c["said"] >= self.every)
                if due:
                    c["said"] = now
            if due:
                text = self.line()
                if text is not None:
                    self._log(text)
