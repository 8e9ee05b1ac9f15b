"""Progress for long steps: a tqdm bar on a terminal, a periodic log line elsewhere.

Batch jobs (SLURM, Ray job logs) are not terminals: carriage-return bars turn into
megabytes of noise there, so off a TTY we print one line every ``interval`` seconds with
the count, the rate and the ETA instead.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Count work done towards ``total`` and show it; use as a context manager."""

    def __init__(self, total: int, desc: str, unit: str = "it", interval: float = 10.0,
                 enabled: bool = True, stream=None):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = stream or sys.stderr
        self.done = 0
        self.extra: dict[str, str] = {}
        self._start = self._last = time.monotonic()
        self._bar = None
        self.enabled = enabled
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **extra) -> None:
        """Advance by ``n``; ``extra`` key=value pairs are shown beside the count."""
        self.done += n
        self.extra.update({k: str(v) for k, v in extra.items()})
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if extra:
                self._bar.set_postfix(self.extra, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        """One status line: count, rate and ETA."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} "
                f"[{elapsed:.0f}s, {rate:.2f} {self.unit}/s, ETA {eta}] {extra}").rstrip()

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
