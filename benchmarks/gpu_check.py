"""GPU check: one prepared run of every GPU measurement the project needs, under 8 minutes.

Run from the repository root (any interpreter with torch; the script itself imports no torch,
so wheels can be installed first)::

    python -m benchmarks.gpu_check [--quick] [--out FILE.json] [--budget 450]
        [--wheelhouse DIR] [--peer-python PY | --peer-wheelhouse DIR] [--install]

Parts, each in fresh subprocesses with a time guard (its own cap and what is left of
``--budget``); a part that cannot run is recorded as skipped with the exact reason:

0. ``setup``: ``--wheelhouse DIR`` installs its wheels (``--no-index --no-deps``) into
   ``<work>/site``, put first on the children's path (a machine without network gets
   ase, vesin, cuequivariance this way); ``--peer-wheelhouse`` does the same for mace-torch
   and its e3nn 0.4.4 in ``<work>/peer-site``. ``--install`` (network, CUDA machine only)
   runs ``pip install -e .[cuda]``. Then ``probe``: torch build, CUDA device, cuEquivariance.
1. ``gpu_tests``: the GPU-only tests of ``tests/models/test_cueq.py`` (cuEquivariance
   kernels vs the torch path, whole model), by pytest.
2. ``physics_cuda``: ``tests/models/test_physics.py`` with ``MLIP_TEST_DEVICE=cuda``
   (float64, tiny/xs/s sizes).
3. ``bf16_forces``: the same weights evaluated in fp32 and bf16 (runs on CPU too).
4. ``throughput``: training atoms/s (``bench_models.py``'s children and structures) of the
   ``--models`` in fp32 and bf16, MACE-style with the torch and cuEquivariance kernels, and
   mace-torch at equal size with and without its cuEquivariance backend; per row FLOPs,
   host syncs per step, GPU busy fraction and peak memory (``device_measures.py``).

One JSON (default ``benchmarks/results/gpu_check-<host>-<date>.json``) and a table.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_models import CHILD_MACE, CHILD_OURS, peer_args, size_peer, write_structures
from benchmarks.gpu_report import evaluate_targets, print_report
from benchmarks.harness import (
    REPO, RESULTS, WORK, child_script, header, log, parser, peer_env, run_child, write_result)

CHILD = child_script("gpu_check_child")
# seconds per part at most at the default --budget of 450 s (scaled with it; never past it)
CAPS = {"probe": 120, "gpu_tests": 90, "physics_cuda": 150, "bf16_forces": 150, "throughput": 400}
NO_CUDA = "no CUDA device: torch {torch} (CUDA build: {torch_cuda}), cuda available False"


class Guard:
    """The whole run's deadline and each part's cap (scaled up by ``budget`` / 450 s)."""

    def __init__(self, budget: float):
        self.deadline, self.scale = time.monotonic() + budget, max(1.0, budget / 450)

    def left(self, cap: float) -> float:
        return max(0.0, min(cap * self.scale, self.deadline - time.monotonic()))


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def why(e: BaseException) -> str:
    """A child's failure in one line: the time guard's kill, or its exit and last error line."""
    if isinstance(e, subprocess.TimeoutExpired):
        return f"time guard: killed after {e.timeout:.0f} s"
    return str(e)


def child(mode: str, ctx: dict, timeout: float, **args) -> dict:
    """One :mod:`gpu_check_child` call with our interpreter and ``ctx``'s path."""
    return run_child(CHILD, {"mode": mode, "repo": str(REPO)} | args, REPO, mode,
                     timeout=timeout, env=ctx["env"])


def pip_target(wheelhouses: list[str], target: Path) -> dict:
    """Install every wheel of ``wheelhouses`` into ``target`` without network or resolver."""
    wheels = sorted(str(w) for d in wheelhouses for w in Path(d).glob("*.whl"))
    if not wheels:
        return {"status": "failed", "reason": f"no .whl files in {wheelhouses}"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--no-compile", "--upgrade", "--target", str(target), *wheels],
                          capture_output=True, text=True)
    if proc.returncode:
        return {"status": "failed", "reason": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {"status": "ok", "wheels": [Path(w).name for w in wheels], "target": str(target)}


def setup(a, work: Path, guard: Guard) -> tuple[dict, dict]:
    """Installs asked for, then the probe: ``(setup part, ctx)``; ctx holds the children's
    environment, the probe and the peer's interpreter."""
    part, env, site = {"status": "ok"}, {}, Path(a.site or work / "site").resolve()
    if a.wheelhouse:
        part["wheelhouse"] = pip_target(a.wheelhouse, site)
    if site.is_dir() and any(site.iterdir()):  # installed now or by an earlier call
        env["PYTHONPATH"] = part["site"] = str(site)
    ctx = {"env": env}
    ctx["probe"] = probe = child("probe", ctx, guard.left(CAPS["probe"]), configs=configs(a.models))
    if a.install:
        if not probe["cuda_available"]:
            part["install"] = skipped("--install is for a CUDA machine (torch here has no CUDA "
                                      "device; the cuda extra would pull CUDA packages)")
        else:
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", ".[cuda]"],
                                  cwd=REPO, capture_output=True, text=True)
            part["install"] = {"status": "ok" if proc.returncode == 0 else "failed",
                               "reason": (proc.stderr.strip().splitlines() or [""])[-1]}
            ctx["probe"] = probe = child("probe", ctx, guard.left(CAPS["probe"]),
                                         configs=configs(a.models))
    if "cannot open shared object" in probe.get("ops_lib_error", ""):
        # libcue_ops.so has no RPATH: point the loader at pip's CUDA libraries, then re-probe
        dirs = cuda_lib_dirs()
        if dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [os.environ.get("LD_LIBRARY_PATH",
                                                                            "")])
            part["ld_library_path"] = dirs
            ctx["probe"] = probe = child("probe", ctx, guard.left(CAPS["probe"]),
                                         configs=configs(a.models))
    if probe["missing_imports"]:
        part = {"status": "failed", "reason": f"missing imports {probe['missing_imports']}: "
                "pass --wheelhouse with their wheels"} | part
    part["peer"] = ctx["peer"] = peer_setup(a, work, probe, env)
    if any(isinstance(v, dict) and v.get("status") == "failed" for v in part.values()):
        part["status"] = "failed"
        part.setdefault("reason", "; ".join(f"{k}: {v['reason']}" for k, v in part.items()
                                            if isinstance(v, dict) and v.get("status") == "failed"))
    return part, ctx


def cuda_lib_dirs() -> list[str]:
    """Folders holding the CUDA libraries of this interpreter's ``nvidia-*`` wheels and of
    ``/usr/local/cuda``, for libraries that find theirs by name only."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("nvidia")
    roots = [Path(r) for r in (spec.submodule_search_locations or [])] if spec else []
    dirs = {str(f.parent) for r in roots for f in r.rglob("lib*.so*")}
    return sorted(dirs) + [d for d in ("/usr/local/cuda/lib64",) if Path(d).is_dir()]


def peer_setup(a, work: Path, probe: dict, ours: dict) -> dict:
    """mace-torch's interpreter (and PYTHONPATH): given, from a wheelhouse, or (CPU) a venv.
    It shares our ``LD_LIBRARY_PATH`` (``ours``), if one was needed for the ops library."""
    lib = {k: v for k, v in ours.items() if k == "LD_LIBRARY_PATH"}
    if a.no_peer:
        return skipped("--no-peer")
    if a.peer_python:
        return {"status": "ok", "python": a.peer_python, "env": lib}
    if a.peer_wheelhouse:  # its site first: its e3nn 0.4.4 shadows ours; ase etc. from ours
        r = pip_target(a.peer_wheelhouse, work / "peer-site")
        path = [str(work / "peer-site")] + ([str(Path(a.site or work / "site").resolve())])
        return r | {"python": sys.executable, "env": {"PYTHONPATH": os.pathsep.join(path)} | lib}
    if probe["cuda_available"]:
        return skipped("no mace-torch on this GPU machine: pass --peer-python (a venv with "
                       "mace-torch and a CUDA torch) or --peer-wheelhouse (harness.peer_env "
                       "makes CPU-torch venvs only)")
    try:  # CPU: harness.peer_env's venv (network needed once; reused after)
        info = peer_env(work / "mace-venv", "mace-torch", ("mace-torch", "e3nn", "torch"))
    except (SystemExit, OSError, subprocess.CalledProcessError) as e:
        return {"status": "failed", "reason": f"peer venv: {e}"}
    return {"status": "ok", "python": info["python"], "env": {}, "versions": info["versions"]}


def run_pytest(args: list[str], ctx: dict, timeout: float, env: dict | None = None) -> dict:
    """pytest in a subprocess: counts from its summary line, exit status, the tail."""
    path = os.pathsep.join([str(REPO), *filter(None, [ctx["env"].get("PYTHONPATH")])])
    full_env = os.environ | ctx["env"] | {"PYTHONPATH": path} | (env or {})
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p",
                               "no:cacheprovider", *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"time guard: pytest killed after {timeout:.0f} s"}
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    ok = proc.returncode == 0 and counts.get("passed", 0) > 0
    return {"status": "ok" if ok else "failed", "exit": proc.returncode, "counts": counts,
            "tail": proc.stdout.strip().splitlines()[-12:]}


def gpu_part(name: str, ctx: dict, guard: Guard) -> dict:
    """``gpu_tests`` or ``physics_cuda``, or why not."""
    p = ctx["probe"]
    if not p["cuda_available"]:
        return skipped(NO_CUDA.format(**p))
    if name == "gpu_tests" and not p.get("cueq_available_cuda"):
        return skipped("cuEquivariance kernels not importable (cuequivariance-torch "
                       f"{p['packages']['cuequivariance-torch']}, ops importable "
                       f"{p['ops_importable']}{', ' + p['ops_error'] if 'ops_error' in p else ''})"
                       ": pass their wheels with --wheelhouse (benchmarks/gpu_wheels.sh)")
    t = guard.left(CAPS[name])
    if t < 10:
        return skipped("time guard: the run's budget is spent")
    if name == "gpu_tests":
        return run_pytest(["tests/models/test_cueq.py", "-k", "kernels"], ctx, t)
    return run_pytest(["tests/models/test_physics.py"], ctx, t, {"MLIP_TEST_DEVICE": "cuda"})


def bf16_part(a, ctx: dict, data: dict, guard: Guard) -> dict:
    """fp32 vs bf16 forces, one child per model, until the part's time is spent."""
    end, rows, failed = time.monotonic() + guard.left(CAPS["bf16_forces"]), {}, {}
    for name, path in configs(a.models).items():
        t = min(end - time.monotonic(), guard.left(CAPS["bf16_forces"]))
        try:
            if t < 10:
                raise subprocess.TimeoutExpired(name, 0)
            rows |= child("bf16", ctx, t, structures=data["path"], configs={name: path},
                          device=ctx["device"], threads=a.threads)["models"]
        except (subprocess.TimeoutExpired, SystemExit) as e:
            failed[name] = why(e) if t >= 10 else "time guard: the part's time is spent"
    out = {"status": "ok" if rows else "failed", "device": ctx["device"], "models": rows}
    return out | ({"reason": "; ".join(f"{k}: {v}" for k, v in failed.items())} if failed else {})


def configs(names: list[str]) -> dict:
    """``{name: config path}``: a name of ``configs/model/`` or a YAML path (named by its stem)."""
    return {Path(n).stem: str(Path(n).resolve()) if n.endswith(".yaml") else
            str(REPO / "configs" / "model" / f"{n}.yaml") for n in names}


def plan_rows(a, ctx: dict, params: dict, guard: Guard) -> dict:
    """``{row: (who, args) or skipped(...)}``: ours per model x precision x kernels, then
    mace-torch at each MACE-style model's equal size x precision x cuEquivariance."""
    p, cuda = ctx["probe"], ctx["device"] == "cuda"
    base = {"structures": ctx["data"]["path"], "threads": a.threads, "steps": a.steps,
            "warmup": a.warmup, "device": ctx["device"], "measures": True}
    rows, peers = {}, {}
    for name, path in configs(a.models).items():
        for prec in ("fp32", "bf16"):
            for kern in ("torch", "cueq") if name.startswith("mace") else ("torch",):
                key = f"{name} {prec} {kern}"
                if prec == "bf16" and not cuda and not a.cpu_bf16:
                    rows[key] = skipped("bf16 training on CPU: no bf16 matrix units here (a "
                                        "mace-xs step took 43 s vs ~1 s in fp32); --cpu-bf16 "
                                        "runs it")
                elif kern == "cueq" and not (cuda and p.get("cueq_available_cuda")):
                    rows[key] = skipped("cuEquivariance kernels need CUDA and "
                                        "cuequivariance_ops_torch" + ("" if cuda else ": no CUDA"))
                else:
                    rows[key] = ("ours", base | {"config": path, "precision": prec,
                                                 "kernels": kern})
        if name.startswith("mace"):
            # sized and run after all of ours: sizing mace-torch on a CPU takes minutes
            peers[name] = (params[name], base)
    return rows | {f"peer {n}": ("defer", v) for n, v in peers.items()}


def peer_rows(a, ctx: dict, name: str, ours: dict, base: dict, guard: Guard) -> dict:
    """mace-torch rows at ``name``'s equal size (channels sized by bench_models.size_peer)."""
    peer, size, out, cuda = ctx["peer"], name.split("-")[1], {}, ctx["device"] == "cuda"
    keys = [f"mace-torch-{size} {prec} {'cueq' if q else 'e3nn'}"
            for prec in ("fp32", "bf16") for q in (False, True)]
    if peer["status"] != "ok":
        return {k: skipped(f"peer: {peer['reason']}") for k in keys}
    hp = peer_args(ours["config"], base)
    try:
        s = size_peer(hp, ours["params"], peer["python"], f"sizing {size}",
                      timeout=max(1.0, guard.left(CAPS["throughput"])), env=peer["env"])
    except (SystemExit, subprocess.TimeoutExpired) as e:
        return {k: {"status": "failed", "reason": f"sizing mace-torch: {why(e)}"} for k in keys}
    ctx.setdefault("sizing", {})[size] = s
    for k in keys:
        prec, q = k.split()[1], k.endswith("cueq")
        if prec == "bf16" and not cuda and not a.cpu_bf16:
            out[k] = skipped("bf16 training on CPU: not a measurement (see our bf16 rows)")
        elif q and not cuda:
            out[k] = skipped("mace-torch's cuEquivariance backend needs CUDA: no CUDA")
        else:
            out[k] = ("peer", hp | {"channels": s["equal_size_channels"], "precision": prec,
                                    "cueq": q} | {x: base[x] for x in ("steps", "warmup",
                                                                       "device", "measures")})
    return out


def throughput(a, ctx: dict, guard: Guard) -> dict:
    """Every planned row in its own subprocess, until the part's time is spent."""
    cap = time.monotonic() + guard.left(CAPS["throughput"])
    if "params" not in ctx["probe"]:
        return {"status": "failed", "reason": f"probe: {ctx['probe'].get('project_import_error')}"}
    queue, out = list(plan_rows(a, ctx, ctx["probe"]["params"], guard).items()), {}
    queue.sort(key=lambda item: isinstance(item[1], tuple) and item[1][0] == "defer")
    while queue:
        key, job = queue.pop(0)
        if isinstance(job, tuple) and job[0] == "defer":  # mace-torch: size it now
            queue += list(peer_rows(a, ctx, key.split()[1], *job[1], guard).items())
            continue
        if isinstance(job, dict):
            out[key] = job
            continue
        left = min(cap - time.monotonic(), guard.left(CAPS["throughput"]))
        if left < 15:
            out[key] = skipped("time guard: the throughput part's time is spent")
            continue
        who, args = job
        code, py, env = ((CHILD_OURS, None, ctx["env"]) if who == "ours" else
                         (CHILD_MACE, ctx["peer"]["python"], ctx["peer"]["env"]))
        try:
            r = run_child(code, args, REPO, key, python=py, timeout=left, env=env)
            out[key] = {"status": "ok"} | r
            log(f"{key:28s} {r['atoms_per_s']:9.1f} atoms/s ({r['params']:,} parameters)")
        except (subprocess.TimeoutExpired, SystemExit) as e:
            out[key] = {"status": "failed", "reason": why(e)}
        if out[key]["status"] != "ok":
            log(f"{key:28s} {out[key]['status']}: {out[key]['reason']}")
    return {"status": "ok", "rows": out, "peer_sizing": ctx.get("sizing", {})}


def parse(argv):
    p = parser(__doc__, work=WORK / "gpu_check",
               out_help="default benchmarks/results/gpu_check-<host>-<date>.json")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole run")
    p.add_argument("--quick", action="store_true", help="xs models, 1 step, no peer (a test)")
    p.add_argument("--models", nargs="+", help="named configs (default mace-s esen-s)")
    p.add_argument("--structures", type=int, help="crystals in the batch (CPU 1, GPU 16)")
    p.add_argument("--steps", type=int, help="timed steps (CPU 2, GPU 10)")
    p.add_argument("--warmup", type=int, help="warm-up steps (CPU 1, GPU 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wheelhouse", nargs="+", help="folders of wheels (ase, vesin, "
                   "cuequivariance: benchmarks/gpu_wheels.sh) to install offline into --site")
    p.add_argument("--site", help="where --wheelhouse installs and children import from "
                   "(default <work>/site; reused when it exists)")
    p.add_argument("--setup-only", action="store_true", help="install and probe, then stop")
    p.add_argument("--peer-python", help="an interpreter with mace-torch (a CUDA torch on GPUs)")
    p.add_argument("--peer-wheelhouse", nargs="+", help="wheels of mace-torch, e3nn 0.4.4, "
                   "its needs")
    p.add_argument("--install", action="store_true", help="pip install -e .[cuda] (CUDA, network)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--cpu-bf16", action="store_true", help="time bf16 training on CPU too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a, t0 = parse(argv), time.monotonic()
    guard, work = Guard(a.budget), Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    res = header() | {"host": platform.node(), "budget_s": a.budget, "parts": {}}
    a.no_peer |= a.quick
    a.models = a.models or (["mace-xs", "esen-xs"] if a.quick else ["mace-s", "esen-s"])
    res["parts"]["setup"], ctx = setup(a, work, guard)
    cuda = ctx["probe"]["cuda_available"]
    ctx["device"] = "cuda" if cuda else "cpu"
    if a.setup_only:
        print(json.dumps(res["parts"]["setup"] | {"probe": ctx["probe"]}, indent=1))
        return 0
    a.structures = a.structures or (16 if cuda else 1)
    a.steps = a.steps or (10 if cuda else (1 if a.quick else 2))
    a.warmup = a.warmup or (3 if cuda else 1)
    ctx["data"] = write_structures(work / f"structures-{a.structures}.extxyz", a.structures)
    res |= {"probe": ctx["probe"], "dataset": ctx["data"], "settings": {
        k: getattr(a, k) for k in ("models", "structures", "steps", "warmup", "threads", "quick")}}
    log(f"device {ctx['device']}: {ctx['probe'].get('device', {}).get('name', 'CPU')}; "
        f"{ctx['data']['atoms']} atoms per batch")
    for name in ("gpu_tests", "physics_cuda"):
        log(f"part {name}")
        res["parts"][name] = gpu_part(name, ctx, guard)
    log("part bf16_forces")
    res["parts"]["bf16_forces"] = bf16_part(a, ctx, ctx["data"], guard)
    log("part throughput")
    res["parts"]["throughput"] = throughput(a, ctx, guard)
    res["targets"] = evaluate_targets(res)
    res["total_s"] = time.monotonic() - t0
    print_report(res)
    write_result(a.out or RESULTS / f"gpu_check-{res['host']}-{res['date'][:10]}.json", res)
    print(f"total {res['total_s']:.0f} s of a {a.budget:.0f} s budget")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
