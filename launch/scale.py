"""``mlip-pretrain scale run | fit``: the points of a scaling study as runs, then the fits.

Each point trains in its own subprocess (``mlip-pretrain train <point>/point.yaml
--resume``), so a crash stays in that point: it is reported, retried up to
``max_attempts`` times from its last checkpoint, and the study goes on. A failed point
whose config has changed since (a fix: another learning rate, say) cannot continue its
checkpoints (another run, and MLflow params cannot change): its outputs move to
``<point>/attempts/<n>/`` and it starts afresh. A point that
finished writes ``<point>/DONE.json`` (N, D, atoms seen, C, held-out metrics, the MLflow
run id, the hash of its config) and is skipped on every rerun; a finished point whose
config has changed since is an error (rename the study or delete the point's folder).

Launchers: ``local`` runs the pending points in sequence; ``slurm`` writes an sbatch
array script with one task per pending point (each task runs this command for its point
with ``--point $SLURM_ARRAY_TASK_ID``) and submits it with ``--submit``; ``ray`` runs
the points as Ray tasks on ``RAY_ADDRESS`` (or a local Ray), one CPU each, so the
study folder must be on a file system every node sees.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common.atomic import write_atomic
from common.config import parse_yaml, save_config, to_dict
from common.errors import UserError
from pretrain.scaling.study import (Point, StudyConfig, config_hash, expand, load_study, measure,
                                    point_config, point_folder, tracking_uri)

REPO = Path(__file__).resolve().parent.parent
DONE, FAILED = "DONE.json", "FAILED.json"


class StudyError(UserError, RuntimeError):
    """A study cannot go on as asked; the message names the point and what to do."""


def run_study(path: str, launcher: str = "local", overrides: list[str] = (), only: int | None = None,
              submit: bool = False) -> int:
    """Run (or render) the study ``path``; returns 0 when every selected point is done."""
    study = load_study(path, overrides)
    points = expand(study)
    if only is not None:
        if not 0 <= only < len(points):
            raise StudyError(f"--point {only}: the study has points 0..{len(points) - 1}")
        points = [points[only]]
    Path(study.out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(study.out) / "points.json",
                 json.dumps([{"index": p.index, "name": p.name} for p in expand(study)], indent=1) + "\n")
    _check_overlap(study, points[0])
    pending = [p for p in points if not _finished(study, p)]
    print(f"[scale] study {study.name}: {len(points)} point(s), {len(points) - len(pending)} finished, "
          f"{len(pending)} to run ({launcher}); outputs in {study.out}", flush=True)
    if pending and launcher in ("slurm", "ray"):  # points that start together share the store
        from pretrain.tracking import prepare_store  # noqa: PLC0415

        prepare_store(tracking_uri(study))
    if launcher == "slurm":
        script = write_sbatch(path, study, pending, list(overrides))
        print(script.read_text())
        if submit and pending:
            subprocess.run(["sbatch", str(script)], check=True)
        return 0
    if launcher == "ray":
        results = _run_ray(path, list(overrides), pending)
    else:
        results = [run_point(study, p) for p in pending]
    return _report(study, points, results)


def _finished(study: StudyConfig, point: Point) -> bool:
    done = point_folder(study, point) / DONE
    if not done.is_file():
        return False
    record = json.loads(done.read_text())
    current = config_hash(point_config(study, point))
    if record["config_hash"] != current:
        raise StudyError(f"point {point.name} finished with another config ({done}); its config has "
                         "changed since: rename the study (name, out) or delete that point's folder")
    return True


def run_point(study: StudyConfig, point: Point) -> dict:
    """Train ``point`` (resuming its last checkpoint), up to ``max_attempts`` tries; returns its
    result (``status`` ``finished`` or ``failed``)."""
    folder = point_folder(study, point)
    cfg = point_config(study, point)
    size = measure(cfg)
    cfg.tracking.tags = {"scale.study": study.name, "scale.point": point.name, "scale.index": point.index,
                         "scale.model": point.model, "scale.fraction": point.fraction,
                         "scale.budget": f"{point.amount} {point.budget}", "scale.seed": point.seed,
                         "scale.N": size["N"], "scale.D": size["D"],
                         "scale.flops_per_atom": f"{size['flops_per_atom']:.6g}",
                         "scale.fit": str(Path(study.out).resolve() / "fit" / "fit.json"),
                         **{f"scale.D.{k}": v for k, v in size["D_per_fidelity"].items()}}
    cfg.tracking.tags = {k: str(v) for k, v in cfg.tracking.tags.items()}
    folder.mkdir(parents=True, exist_ok=True)
    _set_aside_if_changed(folder, cfg)
    save_config(cfg, folder / "point.yaml")
    cmd = _train_command(folder / "point.yaml", study.procs_per_point)
    for attempt in range(1, study.max_attempts + 1):
        print(f"[scale] point {point.index} {point.name}: N={size['N']:,} D={size['D']:,} steps={cfg.steps} "
              f"(attempt {attempt}/{study.max_attempts}; log {folder / 'train.log'})", flush=True)
        t0 = time.time()
        with open(folder / "train.log", "a") as log:
            rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
        if rc == 0:
            break
        tail = (folder / "train.log").read_text().splitlines()[-15:]
        write_atomic(folder / FAILED, json.dumps({"attempt": attempt, "returncode": rc, "log_tail": tail}, indent=1))
        print(f"[scale] point {point.name} failed (exit {rc}); last lines of its log:\n  "
              + "\n  ".join(tail[-5:]), flush=True)
    else:
        return {"point": point.name, "status": "failed", "returncode": rc}
    result = finish_point(study, point, cfg, size, time.time() - t0)
    (folder / FAILED).unlink(missing_ok=True)
    return result


def _train_command(config: Path, procs: int) -> list[str]:
    train = ["-m", "launch.cli", "train", str(config), "--resume"]
    if procs == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *train]


def _set_aside_if_changed(folder: Path, cfg) -> None:
    """Move an earlier attempt's outputs to ``attempts/<n>/`` when its ``point.yaml`` differs
    from ``cfg``: its checkpoints belong to another run (nothing is deleted)."""
    old = folder / "point.yaml"
    if not old.is_file() or parse_yaml(old.read_text()) == to_dict(cfg):
        return
    attempts = folder / "attempts"
    n = 1 + sum(1 for _ in attempts.iterdir()) if attempts.is_dir() else 1
    dest = attempts / str(n)
    dest.mkdir(parents=True)
    for item in sorted(folder.iterdir()):
        if item.name != "attempts":
            item.rename(dest / item.name)
    print(f"[scale] point {folder.name}: its config changed since the last attempt; starting afresh "
          f"(the earlier attempt's checkpoints and logs are in {dest})", flush=True)


def finish_point(study: StudyConfig, point: Point, cfg, size: dict, seconds: float) -> dict:
    """Read a trained point back (checkpoint state, metrics log), tag its MLflow run with
    atoms seen and C, and write ``DONE.json``."""
    from pretrain.checkpoint import Checkpointer, atoms_seen, trainer_state  # noqa: PLC0415
    from pretrain.tracking import tag_run  # noqa: PLC0415

    folder = point_folder(study, point)
    tag = Checkpointer(folder / "checkpoints", 1, 0, 1).latest()
    state = trainer_state(folder / "checkpoints" / tag)
    seen = atoms_seen(state)
    atoms = sum(seen.values())
    metrics: dict[str, float] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        metrics.update({k: v for k, v in json.loads(line).items() if k.startswith("val/")})
    result = {"point": point.name, "index": point.index, "status": "finished", "model": point.model,
              "fraction": point.fraction, "seed": point.seed, "steps": state["step"], "N": size["N"],
              "D": size["D"], "D_per_fidelity": size["D_per_fidelity"], "atoms_seen": atoms,
              "atoms_seen_per_fidelity": seen, "flops_per_atom": size["flops_per_atom"],
              "C": size["flops_per_atom"] * atoms, "metrics": metrics, "run_id": state["run_id"],
              "seconds": round(seconds, 1), "config_hash": config_hash(cfg)}
    if state["run_id"]:
        tag_run(tracking_uri(study), state["run_id"],
                {"scale.atoms_seen": atoms, "scale.C": f"{result['C']:.6g}", "scale.status": "finished"},
                {"scale/N": size["N"], "scale/D": size["D"], "scale/atoms_seen": atoms, "scale/C": result["C"]},
                step=state["step"])
    write_atomic(folder / DONE, json.dumps(result, indent=1) + "\n")
    return result


def _check_overlap(study: StudyConfig, point: Point) -> None:
    """Count the study's held-out structures that are in its training folder (once per
    study: every point evaluates on the same folder and trains on a subset of the same
    data, so the counts bound each point's); ``<out>/leakage.json`` and a printed table."""
    from data_pipeline.leakage import leakage, leakage_table, write_leakage  # noqa: PLC0415
    from data_pipeline.manifest import read_manifest  # noqa: PLC0415

    cfg = point_config(study, point)
    if not cfg.eval.folder:
        return
    path = Path(study.out) / "leakage.json"
    hashes = [read_manifest(f)["content_hash"] for f in (cfg.eval.folder, cfg.data.folder)]
    if path.is_file():
        old = json.loads(path.read_text())
        if [old["eval"]["content_hash"], old["train"]["content_hash"]] == hashes:
            print(leakage_table(old), flush=True)
            return
    report = leakage(cfg.eval.folder, cfg.data.folder)
    write_leakage(report, path)
    print(leakage_table(report), flush=True)
    if report["leaked_same_fidelity"]:
        print(f"[scale] WARNING: {report['leaked_same_fidelity']} held-out structures are in the training "
              f"data at their fidelity ({path}); the study's held-out metrics include them", flush=True)


def _report(study: StudyConfig, points: list[Point], results: list[dict]) -> int:
    failed = [r["point"] for r in results if r["status"] != "finished"]
    for p in points:
        done = point_folder(study, p) / DONE
        if done.is_file():
            r = json.loads(done.read_text())
            shown = ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items() if k.endswith("forces_mae"))
            print(f"[scale] {p.index:3d} {p.name}: N={r['N']:,} D={r['D']:,} C={r['C']:.3g} ({shown})")
        else:
            print(f"[scale] {p.index:3d} {p.name}: {'FAILED' if p.name in failed else 'not run'}")
    if failed:
        print(f"[scale] {len(failed)} point(s) failed: {', '.join(failed)}; rerun the same command to "
              f"retry them (finished points are skipped)", file=sys.stderr)
        return 1
    return 0


def write_sbatch(path: str, study: StudyConfig, pending: list[Point], overrides: list[str]) -> Path:
    """``<out>/slurm/<name>.sbatch``: one array task per pending point, each running the
    local launcher on its point (so retries, skipping and tagging are the same code)."""
    s = study.slurm
    indices = ",".join(str(p.index) for p in pending) or "0"
    lines = ["#!/bin/bash", f"#SBATCH --job-name=scale-{study.name}",
             f"#SBATCH --array={indices}" + (f"%{s.max_parallel}" if s.max_parallel else ""),
             f"#SBATCH --time={s.time}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={s.cpus_per_task}",
             f"#SBATCH --output={Path(study.out).resolve()}/slurm/%x-%A_%a.out"]
    lines += [f"#SBATCH --partition={s.partition}"] * bool(s.partition)
    lines += [f"#SBATCH --account={s.account}"] * bool(s.account)
    lines += [f"#SBATCH --gpus-per-task={s.gpus_per_task}"] * bool(s.gpus_per_task)
    lines += [f"#SBATCH {x}" for x in s.extra]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(REPO))}", *s.setup,
              " ".join([shlex.quote(sys.executable), "-m", "launch.cli", "scale", "run",
                        shlex.quote(str(Path(path).resolve())), "--launcher", "local",
                        "--point", "$SLURM_ARRAY_TASK_ID", *map(shlex.quote, overrides)])]
    out = Path(study.out) / "slurm" / f"{study.name}.sbatch"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "\n".join(lines) + "\n")
    return out


def _ray_point(path: str, overrides: list[str], index: int) -> dict:
    """One point as a Ray task (on any node: the study folder must be shared)."""
    study = load_study(path, overrides)
    return run_point(study, expand(study)[index])


def _run_ray(path: str, overrides: list[str], pending: list[Point]) -> list[dict]:
    """The pending points as Ray tasks, one CPU each, as many at once as the cluster has
    CPUs; the workers import this checkout (``PYTHONPATH``), so it must be on every node."""
    import ray  # noqa: PLC0415

    from data_pipeline.raysession import ray_session  # noqa: PLC0415

    if not pending:
        return []
    with ray_session(None):
        task = ray.remote(num_cpus=1, max_retries=2,
                          runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})(_ray_point)
        refs = {task.remote(str(Path(path).resolve()), overrides, p.index): p for p in pending}
        results = []
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            point = refs.pop(ready[0])
            try:
                results.append(ray.get(ready[0]))
            except ray.exceptions.RayError as err:  # the task itself died: reported like a failed point
                print(f"[scale] point {point.name}: Ray task failed: {err}", file=sys.stderr, flush=True)
                results.append({"point": point.name, "status": "failed"})
        return results


def fit_command(source: str, metric: str, uri: str | None, out: str | None, reps: int) -> int:
    """``scale fit``: read the study's (or experiment's) finished points from MLflow, fit,
    print the table, write ``fit.json``, ``fit.txt`` and the plots, log them to MLflow."""
    from pretrain.scaling import plots, report  # noqa: PLC0415
    from pretrain.tracking import experiment_runs, log_result_run  # noqa: PLC0415

    if source.endswith((".yaml", ".yml")) or Path(source).is_file():
        study = load_study(source)
        uri, experiment = tracking_uri(study), study.name
        folder = Path(out or Path(study.out) / "fit")
        runs = experiment_runs(uri, experiment, "scale.study", study.name)
    else:
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise StudyError(f"scale fit {source}: an experiment name needs --tracking-uri or MLFLOW_TRACKING_URI")
        experiment, folder = source, Path(out or Path("out") / "scale-fit" / source)
        runs = experiment_runs(uri, experiment)
    rows = report.rows_from_runs(runs)
    try:
        results = report.analyse(rows, metric, reps)
    except ValueError as err:
        raise StudyError(f"scale fit {source}: {err}") from None
    folder.mkdir(parents=True, exist_ok=True)
    source_info = {"experiment": experiment, "tracking_uri": uri, "points": len(rows), "metric": metric,
                   "bootstrap": reps}
    write_atomic(folder / "fit.json", json.dumps(report.to_json(results, source_info), indent=1) + "\n")
    text = report.table(results)
    write_atomic(folder / "fit.txt", text + "\n")
    files = [folder / "fit.json", folder / "fit.txt", plots.plot_fits(results, folder)]
    if any(r.get("frontier") for r in results.values()):
        files.append(plots.plot_frontier(results, folder))
    run_id = log_result_run(uri, experiment, f"fit-{experiment}", {"scale.kind": "fit", "scale.study": experiment,
                                                                   "scale.metric": metric},
                            report.metrics_of(results), files)
    print(text)
    print(f"[scale] {len(rows)} point(s) of {experiment}; wrote {', '.join(str(f) for f in files)}; "
          f"MLflow run {run_id}")
    return 0
