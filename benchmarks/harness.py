"""Measurement harness shared by the benchmark scripts: timing, load detection, summaries.

Small machines are shared and noisy, so every timed section also records how much CPU
*other* processes used meanwhile (from /proc): the whole machine's busy CPU seconds minus
those of this process and its descendants (Ray's raylet and workers included). A run
where others took over 10% of a core is skewed; scripts retry or flag it.
Public tools only: ``time.perf_counter``, ``statistics``, /proc.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

def cpu_snapshot():
    """(machine busy CPU s, {pid: CPU s} of this process tree), or None off Linux."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            j = [int(x) for x in f.readline().split()[1:]]
        machine = sum(j[:3] + j[5:7]) / tick  # user nice system irq softirq (not steal)
        parent, cpu = {}, {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(pid)] = int(fields[1])
                cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
        mine, todo = set(), [os.getpid()]
        while todo:
            p = todo.pop()
            mine.add(p)
            todo += [c for c, pp in parent.items() if pp == p and c not in mine]
        return machine, {p: cpu[p] for p in mine}
    except (OSError, ValueError, IndexError):
        return None


def other_cpu(before, after):
    """CPU seconds used by processes not ours between two snapshots (None if unknown)."""
    if before is None or after is None:
        return None
    ours = sum(t - before[1].get(p, 0.0) for p, t in after[1].items())
    return round(max(0.0, (after[0] - before[0]) - ours), 2)


def log(msg: str) -> None:
    """A timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, *args) -> dict:
    """``fn(*args)`` (returning a dict with ``seconds``), plus the CPU others used meanwhile."""
    before = cpu_snapshot()
    result = fn(*args)
    result.setdefault("other_cpu_s", other_cpu(before, cpu_snapshot()))
    return result


def skewed_run(r: dict) -> bool:
    """Other processes took > 10% of a core over the run (and > 0.2 CPU s: /proc counts ticks)."""
    o = r.get("other_cpu_s") or 0.0
    return o > max(0.1 * r["seconds"], 0.2)


def interference(r: dict) -> str:
    """A note on the CPU other processes used during run ``r``, with a warning if skewed."""
    o = r.get("other_cpu_s")
    if o is None:
        return ""
    warn = "  WARNING: other processes were busy; this run is skewed" if skewed_run(r) else ""
    return f" [other processes: {o:.2f} CPU s]{warn}"


def summarise(values: list[float]) -> dict:
    """Median, min, max and the raw values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def machine(packages: tuple[str, ...] = ()) -> dict:
    """Python, platform, CPU model, core counts and the versions of ``packages``."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nproc = str(os.cpu_count())
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "nproc": nproc, "os_cpu_count": os.cpu_count()}
    info.update({name: importlib.metadata.version(name) for name in packages})
    return info


def run_child(code: str, args: dict, repo: Path, what: str, python: str | Path | None = None,
              timeout: float | None = None, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter with ``args`` as JSON in ``argv[1]``; return the
    JSON of its last ``RESULT `` line, or exit naming ``what``, its exit status and its last
    line of error output (its output goes to stderr).

    ``timeout`` seconds: the child is killed after them (``subprocess.TimeoutExpired``).
    ``env``: extra environment variables for the child.

    ``python`` None: this interpreter, with ``repo`` on its path. Otherwise another
    environment's interpreter (a peer's venv), with no ``PYTHONPATH`` from here (it would
    shadow the peer's own packages) and ``repo`` passed as ``args["repo"]``. Never
    ``RAY_ADDRESS``: any Ray the child starts is a fresh local one.
    """
    extra, env = env or {}, {k: v for k, v in os.environ.items()
                             if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    if python is None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(repo)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    else:
        args = args | {"repo": str(repo)}
    proc = subprocess.run([str(python or sys.executable), "-c", code, json.dumps(args)],
                          cwd=repo, env=env | extra, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-8000:] + "\n")
        last = (proc.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {last}")
    return json.loads(lines[-1][len("RESULT "):])


class Runs:
    """Kept runs per measurement, and the attempts discarded because others loaded the machine.

    ``measure(key, rep, describe, fn, *args)`` runs ``fn(*args)`` (a dict with ``seconds``
    and ``other_cpu_s``), logs ``describe(r)``, and retries a skewed run up to ``tries``
    times; the last attempt is kept even if skewed (then flagged in :meth:`skewed`).
    """

    def __init__(self, keys, repeats: int, tries: int):
        self.runs: dict[str, list[dict]] = {k: [] for k in keys}
        self.discarded: list[dict] = []
        self.repeats, self.tries = repeats, tries

    def measure(self, key: str, rep: int, describe, fn, *args) -> dict:
        """One kept run of ``key`` for repetition ``rep`` (0-based)."""
        for attempt in range(1, self.tries + 1):
            r = fn(*args) | {"attempt": attempt}
            log(f"rep {rep + 1}/{self.repeats}: {describe(r)}" + interference(r))
            if not skewed_run(r) or attempt == self.tries:
                self.runs.setdefault(key, []).append(r)
                return r
            self.discarded.append({"measurement": key, "rep": rep + 1, **r})
            log("  retrying after 5 s (other load)")
            time.sleep(5)
        raise ValueError(f"tries must be >= 1, got {self.tries}")

    def skewed(self) -> list[str]:
        """Kept runs that other processes skewed (their last attempt), as ``key run i``."""
        return [f"{k} run {i + 1}" for k, v in self.runs.items() for i, r in enumerate(v)
                if skewed_run(r)]


def code_state(repo: Path) -> dict:
    """The commit, uncommitted files and a hash of their diff: the code being measured."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--untracked-files=no").splitlines(),
            "diff_sha1": hashlib.sha1(git("diff", "HEAD").encode()).hexdigest()}
