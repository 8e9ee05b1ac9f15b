"""Peers in their own virtual environments: a peer is never a dependency of the project.

``peer_env(venv, spec, packages, repo)`` creates ``venv`` (once) and installs ``spec``
there with pip, torch held to the CPU build by ``PIP_CONSTRAINT=constraints/cpu.txt``
(an unpinned torch would pull gigabytes of CUDA packages). A stamp file keeps the
install time and the versions of ``packages``; a later call with the same spec reuses
the environment. Run code in it with ``harness.run_child(..., python=info["python"])``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import log


def peer_env(venv: Path, spec: str, packages: tuple[str, ...], repo: Path) -> dict:
    """The peer's venv (made if missing): its python, the versions of ``packages``, install time."""
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
