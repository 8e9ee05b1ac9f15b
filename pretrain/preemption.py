"""Preemption: a signal or a wall-time limit becomes a checkpoint and a distinct exit status.

Schedulers warn a job before they stop it: SLURM sends the signal of ``sbatch --signal``
(``launch/slurm.py`` asks for SIGUSR1) some time before the time limit, and SIGTERM when
it preempts or cancels a job; Kubernetes and Ray send SIGTERM. Any rank may get it first,
or alone. So the handler only sets a flag; at the end of every step the ranks all-reduce
the flag together with the step's non-finite-loss count (the collective the step makes
anyway: no extra synchronisation), and if any rank has it set, every rank saves a
checkpoint of that step, rank 0 writes ``<out>/PREEMPTED``, and the command exits with
:data:`EXIT_PREEMPTED`. ``--resume`` (or the requeued job) continues exactly from it.

``--time-limit`` does the same without a scheduler: the flag is set when the time left
(counted from the process's start) would not fit two more of the longest loop iteration
seen (a whole iteration: the step, and the logging, evaluation and checkpoint that fall
in it) plus one checkpoint save: the longest seen, or before the first one an estimate
from the bytes a save writes (:func:`estimate_save_seconds`).

A stale ``<out>/PREEMPTED`` from an earlier job is removed when a run starts
(:func:`clear_marker`), so a later crash never reads as a preemption.

Exit status: 0 finished, 2 user error (one line naming the fault), **75 preempted**
(EX_TEMPFAIL of sysexits.h: "try again later"; a checkpoint of the last step exists),
anything else a crash (resume goes on from the newest complete checkpoint).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from common.atomic import write_atomic

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MARKER = "PREEMPTED"


class Preempted(Exception):
    """Training stopped early with a checkpoint (a signal or the time limit); resumable."""

    def __init__(self, step: int, reason: str, checkpoint: Path):
        super().__init__(f"stopped at step {step} ({reason}); checkpoint {checkpoint}; "
                         "continue with --resume (a requeued SLURM job does so by itself)")
        self.step, self.reason, self.checkpoint = step, reason, checkpoint


def parse_duration(text: str | float | None) -> float | None:
    """Seconds of ``text``: a number of seconds, or SLURM's ``MM:SS``, ``HH:MM:SS`` or
    ``D-HH:MM:SS``; None stays None. Raises ValueError naming the value otherwise."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    try:
        if text.strip().startswith("-"):
            raise ValueError
        if not days and len(parts) == 1:
            seconds = float(parts[0])
        elif len(parts) in (2, 3):
            h, m, s = ([0] * (3 - len(parts))) + [int(x) for x in parts]
            seconds = float(((int(days or 0) * 24 + h) * 60 + m) * 60 + s)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"time {text!r}: expected seconds or [D-]HH:MM:SS "
                         "(e.g. 3600, 1:00:00, 2-00:00:00)") from None
    if seconds <= 0:
        raise ValueError(f"time {text!r}: expected a positive duration")
    return seconds


class StopFlag:
    """This rank's wish to stop: set by SIGTERM/SIGUSR1 or by the approaching time limit.

    Handlers are installed only from the main thread (a Ray Train worker runs its loop in
    another thread; Ray restarts workers itself) and restored by :meth:`close`.
    """

    def __init__(self, time_limit: float | None = None, save_estimate: float = 0.0):
        import psutil  # noqa: PLC0415 - a deepspeed dependency

        # the limit counts from the process's start: imports and set-up are part of the job
        self.start = time.monotonic() - max(0.0, time.time() - psutil.Process().create_time())
        self.time_limit = time_limit
        self.reason: str | None = None
        self.longest_iteration = self.longest_save = 0.0
        self.save_estimate = save_estimate
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.reason is None:  # the first reason is the one reported
            self.reason = f"{signal.Signals(signum).name} received"

    def wanted(self, iteration_seconds: float) -> float:
        """1.0 when this rank wants to stop after the step just taken, else 0.0.
        ``iteration_seconds``: the last whole loop iteration (or, in the first, the time
        since it began)."""
        self.longest_iteration = max(self.longest_iteration, iteration_seconds)
        if self.reason is None and self.time_limit is not None:
            left = self.time_limit - (time.monotonic() - self.start)
            if left < 2 * self.longest_iteration + (self.longest_save or self.save_estimate):
                self.reason = f"time limit {self.time_limit:.0f} s: {left:.0f} s left"
        return 1.0 if self.reason is not None else 0.0

    def saved(self, seconds: float) -> None:
        """Record how long a checkpoint save took (the time limit keeps room for one)."""
        self.longest_save = max(self.longest_save, seconds)

    def close(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def estimate_save_seconds(parameters: int, ranks: int, zero_stage: int, ema: bool,
                          write_bytes_per_s: float = 200e6, fixed_s: float = 2.0) -> float:
    """Seconds the first checkpoint save may take, before one was timed: the bytes each
    rank writes (fp32 weights, AdamW's two moments, the EMA shadow; sharded over the ranks
    by ZeRO 1-3 as each stage shards them) at ``write_bytes_per_s`` (a conservative local
    or parallel file system), plus ``fixed_s`` for the files, fsyncs and barriers."""
    weights, moments, shadow = 4.0 * parameters, 8.0 * parameters, (4.0 * parameters if ema else 0.0)
    if zero_stage >= 1:
        moments /= ranks
    if zero_stage >= 3:
        weights, shadow = weights / ranks, shadow / ranks
    return fixed_s + (weights + moments + shadow) / write_bytes_per_s


def clear_marker(out: Path) -> None:
    """Remove a ``PREEMPTED`` marker an earlier job left (rank 0, when a run starts)."""
    (Path(out) / MARKER).unlink(missing_ok=True)


def write_marker(out: Path, step: int, reason: str, checkpoint: Path) -> None:
    """``<out>/PREEMPTED``: what a batch script checks to requeue (torchrun reports any
    worker's non-zero exit as 1, so the status alone does not reach it)."""
    write_atomic(out / MARKER, json.dumps({"step": step, "reason": reason,
                                           "checkpoint": str(checkpoint)}) + "\n")
