"""The harness every benchmark uses: options, fresh processes, load flagging, peers, results.

A benchmark is run from the repository root as ``python -m benchmarks.bench_X``. It builds
its parser with :func:`parser` (the common ``--repeats``, ``--tries``, ``--work``, ``--out``),
runs each measurement in a fresh interpreter (:func:`run_child`; a peer such as mace-torch
in its own virtual environment, :func:`peer_env`), keeps the runs in :class:`Runs` (a run
skewed by other processes is retried, or flagged if kept) and ends with :func:`write_result`
(one JSON file: date, command, machine, code state, parameters and every raw run; then a
markdown table on stdout).

Small machines are shared and noisy, so every timed section also records how much CPU
*other* processes used meanwhile (from /proc): the whole machine's busy CPU seconds minus
those of this process and its descendants (Ray's raylet and workers included). A run
where others took over 10% of a core is skewed.

Standard library only: the children of peers' interpreters import this module too
(``md_timer``, ``step_timer``).
"""

from __future__ import annotations

import argparse
import datetime
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

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"  # git-ignored: data, peers' venvs, runs
RESULTS = REPO / "benchmarks" / "results"  # committed result files


# --------------------------------------------------------------------------- options


def parser(doc: str, *, repeats: int | None = None, tries: int | None = None,
           work: Path | str | None = None, out: Path | str | None = None,
           out_help: str | None = None) -> argparse.ArgumentParser:
    """An argument parser described by ``doc``'s first paragraph, with the common options
    whose default is given: ``--repeats``, ``--tries`` (attempts per run under other load),
    ``--work`` (cached data and runs) and ``--out`` (the result JSON; ``out_help`` says
    where it goes when the default is ``None``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0].strip())
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats,
                       help=f"repetitions: median and min-max (default {repeats})")
    if tries is not None:
        p.add_argument("--tries", type=int, default=tries, help="attempts per run when other "
                       f"processes load the machine meanwhile (default {tries})")
    if work is not None:
        p.add_argument("--work", default=str(work), help=f"cached data and runs (default {work})")
    if out is not None or out_help:
        p.add_argument("--out", default=None if out is None else str(out),
                       help=f"the result JSON ({out_help or f'default {out}'})")
    return p


# --------------------------------------------------------------------------- load


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


def log(msg: str) -> None:
    """A timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- repetitions


def summarise(values: list[float]) -> dict:
    """Median, min, max and the raw values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


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

    def interleaved(self, jobs: dict, describe) -> None:
        """Every ``jobs[key]()`` once per repetition, in turn (so a slow spell of the machine
        hits every measurement alike); ``describe(key)`` gives the progress line's text."""
        for rep in range(self.repeats):
            for key, fn in jobs.items():
                self.measure(key, rep, describe(key), fn)

    def summary(self, value) -> dict:
        """``{key: summarise([value(run) ...])}`` over the kept runs."""
        return {k: summarise([value(r) for r in v]) for k, v in self.runs.items()}

    def skewed(self) -> list[str]:
        """Kept runs that other processes skewed (their last attempt), as ``key run i``."""
        return [f"{k} run {i + 1}" for k, v in self.runs.items() for i, r in enumerate(v)
                if skewed_run(r)]

    def record(self) -> dict:
        """The result file's part: skewed runs kept, attempts discarded, every kept run."""
        return {"skewed_runs": self.skewed(), "discarded_skewed_attempts": self.discarded,
                "runs": self.runs}


def load_note(res: dict) -> str:
    """One line on the runs others skewed (from :meth:`Runs.record`'s keys in ``res``)."""
    skewed = res["skewed_runs"]
    line = (f"runs kept although other processes used > 10% of a core: "
            f"{', '.join(skewed) + ' (rerun on a quiet machine)' if skewed else 'none'}; "
            f"skewed attempts discarded and retried: {len(res['discarded_skewed_attempts'])}")
    if skewed:  # 2 torch threads with one core taken run several times slower
        line += "\nWARNING: skewed runs above: the rates and ratios are not valid; rerun quietly"
    return line


# --------------------------------------------------------------------------- processes


def child_script(name: str) -> str:
    """The text of ``benchmarks/<name>.py``, a child script run with :func:`run_child`."""
    return (REPO / "benchmarks" / f"{name}.py").read_text()


def run_child(code: str, args: dict, repo: Path, what: str, python: str | Path | None = None,
              timeout: float | None = None, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter with ``args`` as JSON in ``argv[1]``; return the
    JSON of its last ``RESULT `` line, or exit naming ``what``, its exit status and its last
    line of error output (its output goes to stderr).

    The child runs ``python -c code`` in ``repo``, so ``sys.path[0]`` is the repository
    root in every interpreter, ours or a peer's: a child imports ``benchmarks.*`` (and the
    project) without editing ``sys.path``. This is the one place that puts the repository
    on a child's path.

    ``timeout`` seconds: the child is killed after them (``subprocess.TimeoutExpired``).
    ``env``: extra environment variables for the child.

    ``python`` None: this interpreter, with ``repo`` also on ``PYTHONPATH`` (for the Ray
    workers a child starts, which do not inherit its working directory). Otherwise another
    environment's interpreter (a peer's venv), with no ``PYTHONPATH`` from here (it would
    shadow the peer's own packages) and ``repo`` passed as ``args["repo"]``. Never
    ``RAY_ADDRESS``: any Ray the child starts is a fresh local one.
    """
    drop = ("PYTHONPATH", "RAY_ADDRESS", "PYTHONSAFEPATH")  # safe-path would drop sys.path[0]
    extra, env = env or {}, {k: v for k, v in os.environ.items() if k not in drop}
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


def peer_env(venv: Path, spec: str, packages: tuple[str, ...], repo: Path = REPO) -> dict:
    """A peer's venv (made if missing): its python, the versions of ``packages``, install time.

    A peer is never a dependency of the project: ``spec`` is installed with pip into its
    own ``venv``, torch held to the CPU build by ``PIP_CONSTRAINT=constraints/cpu.txt`` (an
    unpinned torch would pull gigabytes of CUDA packages). A stamp file keeps the install
    time and the versions; a later call with the same spec reuses the environment. Run code
    in it with ``run_child(..., python=info["python"])``.
    """
    stamp, python = venv / "bench-install.json", venv / "bin" / "python"
    if stamp.exists() and python.exists() and json.loads(stamp.read_text())["spec"] == spec:
        info = json.loads(stamp.read_text())
        log(f"peer venv: reusing {venv} (installed {info['date']} in {info['install_s']:.0f} s)")
        return info | {"python": str(python), "reused": True}
    log(f"peer venv: creating {venv} and installing {spec} (torch held to the CPU build)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = dict(os.environ, PIP_CONSTRAINT=str(repo / "constraints" / "cpu.txt"))
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", spec], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"pip install {spec} failed in {venv}")
    install_s = time.perf_counter() - t0
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))")
    out = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True,
                         check=True).stdout
    info = {"spec": spec, "versions": json.loads(out), "install_s": install_s,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    stamp.write_text(json.dumps(info, indent=1))
    log(f"peer venv: installed in {install_s:.0f} s: {info['versions']}")
    return info | {"python": str(python), "reused": False}


# --------------------------------------------------------------------------- results


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


def code_state(repo: Path = REPO) -> dict:
    """The commit, uncommitted files and a hash of their diff: the code being measured."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--untracked-files=no").splitlines(),
            "diff_sha1": hashlib.sha1(git("diff", "HEAD").encode()).hexdigest()}


def header(packages: tuple[str, ...] = ()) -> dict:
    """The first keys of every result file: date (UTC), command, machine (with the versions of
    ``packages``) and the code measured. Take it before the runs: :func:`write_result`
    warns if the checkout changed meanwhile."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"date": now.isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(packages), "code": code_state(REPO)}


def markdown(head: list[str], rows: list[list], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column (``l`` or ``r``; default: the
    first column left, the others right)."""
    align = align or "l" + "r" * (len(head) - 1)
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return "\n".join(["| " + " | ".join(head) + " |", rule]
                     + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_result(path: Path | str, res: dict, table: str = "") -> Path:
    """Write ``res`` as JSON to ``path`` (folders made), print ``table`` (markdown) and where
    the file is; warn if the checkout changed since :func:`header` took ``res["code"]``."""
    path = Path(path)
    if "code" in res and code_state(REPO) != res["code"]:
        print("WARNING: the checkout changed during the run: runs may have measured different code")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    if table:
        print("\n" + table)
    total = f"  (total {res['total_seconds']:.0f} s)" if "total_seconds" in res else ""
    print(f"results: {path}{total}", flush=True)
    return path
