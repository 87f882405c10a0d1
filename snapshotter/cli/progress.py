"""Progress of long commands (``index REF --push``, ``record``, ``profile push``) on stderr.

On a terminal: a ``tqdm`` bar with bytes and steps done, rate and ETA. Otherwise one plain
line per finished step, so logs stay readable. Never anything on stdout: scripts parse it.
The commands only call the hook (``advance`` bytes, ``step`` done, ``close``); what is
drawn is decided here. ``LAZYSNAP_PROGRESS=0`` turns it off, ``=1`` forces the bar.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Protocol, TextIO

from snapshotter.cli.units import human_bytes

__all__ = ["Progress", "progress"]


class Progress(Protocol):
    def advance(self, nbytes: int) -> None:
        """``nbytes`` more of ``total_bytes`` are done."""
        ...

    def step(self, what: str) -> None:
        """One of ``steps`` is done (``what`` says which)."""
        ...

    def close(self) -> None:
        ...


class _Silent:
    def advance(self, nbytes: int) -> None:
        pass

    def step(self, what: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """tqdm on the terminal; imported only here (the daemon never draws bars)."""

    def __init__(self, command: str, unit: str, steps: int, total_bytes: int | None, stream: TextIO) -> None:
        from tqdm import tqdm

        self.command, self.unit, self.steps, self.done = command, unit, steps, 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, file=stream,
                        desc=self._desc(), ncols=_columns(stream), leave=True, mininterval=0.2,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "[{elapsed}<{remaining}, {rate_fmt}]" if total_bytes else None)

    def _desc(self) -> str:
        return f"lazysnap {self.command} {self.done}/{self.steps} {self.unit}"

    def advance(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def step(self, what: str) -> None:
        self.done += 1
        self.bar.set_description_str(self._desc(), refresh=False)
        self.bar.write(f"lazysnap {self.command}: {what}", file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """One line per finished step: ``lazysnap index: 2/3 layers: <what> (bytes, rate)``."""

    def __init__(self, command: str, unit: str, steps: int, total_bytes: int | None, stream: TextIO) -> None:
        self.command, self.unit, self.steps, self.total = command, unit, steps, total_bytes
        self.stream = stream
        self.done = 0
        self.nbytes = 0
        self.started = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.nbytes += nbytes

    def step(self, what: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        amount = ""
        if self.total:
            rate = self.nbytes / elapsed if elapsed > 0 else 0.0
            amount = (f" ({human_bytes(self.nbytes)} of {human_bytes(self.total)}, "
                      f"{human_bytes(int(rate))}/s, {elapsed:.1f} s)")
        print(f"lazysnap {self.command}: {self.done}/{self.steps} {self.unit}: {what}{amount}", file=self.stream,
              flush=True)

    def close(self) -> None:
        pass


def _columns(stream: TextIO) -> int:
    """The terminal's width; a terminal that reports none (a fresh pty) gets 100."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 100
    except (OSError, ValueError):
        return 100


def progress(command: str, *, steps: int, unit: str = "steps", total_bytes: int | None = None,
             stream: TextIO | None = None) -> Progress:
    """The progress display for ``command`` on ``stream`` (stderr): a bar on a terminal."""
    out = stream or sys.stderr
    mode = os.environ.get("LAZYSNAP_PROGRESS", "")
    if mode == "0":
        return _Silent()
    if mode == "1" or out.isatty():
        return _Bar(command, unit, steps, total_bytes, out)
    return _Lines(command, unit, steps, total_bytes, out)
