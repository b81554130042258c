"""Progress of long work, readable on a terminal and in a log file.

On a terminal (stderr is a TTY) a tqdm bar. Anywhere else (a SLURM log, CI, ``| tee``) a bar's carriage
returns turn the log into one unreadable line, so instead one plain line every ``every_s`` seconds
(``RELBERT_DS_PROGRESS_EVERY``, default 30) with done/total, the rate and the time left, and one when
the work ends::

    encode (2 ranks): 41,200/143,059 pairs (28.8%), 112 pairs/s, about 15 min left
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, TextIO

DEFAULT_EVERY_S = 30.0


def plain_interval() -> float:
    """Seconds between plain progress lines (``RELBERT_DS_PROGRESS_EVERY``)."""
    try:
        return max(0.0, float(os.environ.get("RELBERT_DS_PROGRESS_EVERY", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """``total`` items of work called ``desc``; :meth:`update` / :meth:`advance_to` as it goes, :meth:`close`
    at the end. ``enabled`` False makes every call a no-op (the ranks that do not report)."""

    def __init__(self, total: int, desc: str, unit: str = "item", enabled: bool = True, initial: int = 0,
                 stream: Optional[TextIO] = None, every_s: Optional[float] = None, bar: Optional[bool] = None,
                 **tqdm_options: Any) -> None:
        self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, enabled
        self.stream = stream or sys.stderr
        self.n = self.start_n = int(initial)
        self.every_s = plain_interval() if every_s is None else every_s
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.bar = None
        if not enabled:
            return
        use_bar = self.stream.isatty() if bar is None else bar
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, **tqdm_options)

    def update(self, n: int = 1, postfix: Optional[dict[str, Any]] = None) -> None:
        self.advance_to(self.n + n, postfix)

    def advance_to(self, n: int, postfix: Optional[dict[str, Any]] = None) -> None:
        """Set the count of items done (the work queue's position, say)."""
        if not self.enabled or n <= self.n:
            return
        step, self.n = n - self.n, n
        if postfix:
            self.postfix = ", ".join(f"{k} {v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.update(step)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def write(self, message: str) -> None:
        """A line of its own, above the bar where there is one."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        else:
            elapsed = time.monotonic() - self.start
            print(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}s done in {_duration(elapsed)}"
                  + (f" ({self.postfix})" if self.postfix else ""), file=self.stream, flush=True)
        self.enabled = False

    def _line(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        left = (self.total - self.n) / rate if rate > 0 else float("inf")
        share = f" ({100 * self.n / self.total:.1f}%)" if self.total else ""
        eta = f", about {_duration(left)} left" if left != float("inf") else ""
        print(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}s{share}, {rate:,.1f} {self.unit}s/s{eta}"
              + (f", {self.postfix}" if self.postfix else ""), file=self.stream, flush=True)
