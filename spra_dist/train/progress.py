"""The step counter of a run: tqdm's bar on a terminal, a plain line now and then otherwise.

    bar = progress(range(start, end), desc="train", enabled=rank == 0)
    for step in bar:
        ...
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
    bar.close()

Written to a file or a pipe, a bar's carriage returns pile up into one line tens of kB long. There the run
prints one line per tenth of its steps or per ``every_s`` seconds, whichever comes first, and one after the
last step: ``train step 40/400 (10%) loss=2.3012 tok_s=5120 elapsed 0:00:12 eta 0:01:48``.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import IO, Any

from tqdm import tqdm


def progress(steps: range, *, desc: str, enabled: bool = True, stream: IO[str] | None = None,
             every_s: float = 30.0):
    """A bar when ``stream`` (default stderr) is a terminal, else a ``LineProgress``; silent unless ``enabled``."""
    stream = stream or sys.stderr
    if enabled and not _is_terminal(stream):
        return LineProgress(steps, desc=desc, stream=stream, every_s=every_s)
    return tqdm(steps, desc=desc, dynamic_ncols=True, disable=not enabled, file=stream)


def quiet_library_bars(stream: IO[str] | None = None) -> None:
    """Off a terminal, turn off the bars of transformers and the hub (loading and writing weights): in a log
    file their carriage returns garble the lines around them. On a terminal they stay."""
    if not _is_terminal(stream or sys.stderr):
        from transformers.utils import logging

        logging.disable_progress_bar()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """Iterates over ``steps`` like tqdm, printing one plain line every tenth of them or ``every_s`` seconds."""

    def __init__(self, steps: range, *, desc: str, stream: IO[str], every_s: float = 30.0, parts: int = 10):
        self.steps, self.desc, self.stream, self.every_s = steps, desc, stream, every_s
        self.every = max(1, math.ceil(len(steps) / parts))
        self.postfix: dict[str, Any] = {}

    def __iter__(self):
        started = last = time.monotonic()
        for done, step in enumerate(self.steps, start=1):
            yield step
            now = time.monotonic()
            if done % self.every == 0 or done == len(self.steps) or now - last >= self.every_s:
                self._line(step + 1, done, now - started)
                last = now

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        pass

    def _line(self, step: int, done: int, elapsed: float) -> None:
        end = self.steps.stop
        left = elapsed / done * (len(self.steps) - done)
        values = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc} step {step}/{end} ({100 * step // max(end, 1)}%){values} elapsed {_clock(elapsed)} "
              f"eta {_clock(left)}", file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
