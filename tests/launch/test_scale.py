"""``scale run``: study configs and grids, the SLURM array script, and for real (slow): a
tiny study killed mid-way resumes without rerunning finished points, a failing point is
reported and retried, then ``scale fit`` and a release whose card carries the exponents."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError
from launch.scale import DONE, FAILED, run_study, write_sbatch
from pretrain.scaling.study import expand, load_study, point_config, steps_for_atoms
from tests.pretrain.test_train import write_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folders(built, tmp_path_factory) -> tuple[Path, Path]:
    """(training shards, a held-out copy): real shards from the session's build."""
    heldout = tmp_path_factory.mktemp("heldout") / "shards"
    shutil.copytree(built[1], heldout)
    return built[1], heldout


def write_study(tmp: Path, folders, grid: dict, **extra) -> Path:
    train, heldout = folders
    base = write_config(tmp / "base.yaml", train, tmp / "unused", steps=2, log_every=1,
                        checkpoint={"every": 1, "keep": 1}, tracking={"enabled": True})
    study = {"name": "t", "base": "base.yaml", "out": "study", "grid": grid,
             "overrides": [f"eval.folder={heldout}", "eval.max_atoms=256"], **extra}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_grid_points_configs_and_budgets(folders, tmp_path):
    path = write_study(tmp_path, folders, {"width": [0.5, 1], "depth": [1], "data_fractions": [0.5, 1.0],
                                           "steps": [3], "seeds": [0, 1]})
    study = load_study(path)
    points = expand(study)
    assert len(points) == 8 and len({p.name for p in points}) == 8
    assert points[0].name == "w0.5-d1_f0.5_3st_s0"
    cfg = point_config(study, points[1])
    assert (cfg.model.channels, cfg.steps, cfg.seed, cfg.data.sampler.seed) == (4, 3, 1, 1)
    assert cfg.data.sampler.subset_fraction == 0.5 and cfg.tracking.experiment == "t"
    assert Path(cfg.out) == tmp_path / "study" / "points" / points[1].name
    # an atoms budget becomes the steps that first see that many atoms
    study = load_study(path, ["grid.steps=null", "grid.atoms=[500]"])
    cfg = point_config(study, expand(study)[0])
    assert cfg.steps == steps_for_atoms(cfg, 1, 500) and cfg.steps * 48 >= 500


@pytest.mark.parametrize("change, message", [
    (["grid.atoms=[10]"], "exactly one budget axis"),
    (["grid.data_fractions=[0]"], "data_fractions"),
    (["grid.models=[{name: a}]"], "models or width/depth"),
    (["grid.colour=1"], "unknown key"),
    (["overrides=[]"], "no eval.folder"),
])
def test_bad_studies_fail_with_the_key(folders, tmp_path, change, message):
    path = write_study(tmp_path, folders, {"width": [1], "steps": [2]})
    with pytest.raises(ConfigError, match=message):
        expand(load_study(path, change))


def test_eval_on_training_data_is_refused(folders, tmp_path):
    path = write_study(tmp_path, folders, {"width": [1], "steps": [2]})
    with pytest.raises(ConfigError, match="is the training data"):
        expand(load_study(path, [f"overrides=[eval.folder={folders[0]}]"]))


def test_slurm_array_script_has_one_task_per_pending_point(folders, tmp_path, capsys):
    path = write_study(tmp_path, folders, {"width": [0.5, 1], "steps": [2]},
                       slurm={"partition": "gpu", "gpus_per_task": 1, "max_parallel": 4,
                              "setup": ["source .venv/bin/activate"]})
    study = load_study(path)
    done = Path(study.out) / "points" / expand(study)[0].name
    done.mkdir(parents=True)  # point 0 finished: only point 1 is submitted
    from pretrain.scaling.study import config_hash

    (done / DONE).write_text(json.dumps({"config_hash": config_hash(point_config(study, expand(study)[0]))}))
    assert run_study(str(path), "slurm") == 0
    script = (Path(study.out) / "slurm" / "t.sbatch").read_text()
    assert "#SBATCH --array=1%4" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-task=1" in script and "source .venv/bin/activate" in script
    assert "scale run" in script and "--point $SLURM_ARRAY_TASK_ID" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=1%4" in out
    # the "held-out" folder is a copy of the training shards: every structure is a leak, and
    # the study says so once, before any point runs
    leak = json.loads((Path(study.out) / "leakage.json").read_text())
    assert leak["leaked_same_fidelity"] == leak["eval"]["records"] > 0
    assert "held-out structures are in the training data" in out
    # a finished point whose config changed since is an error, not a silent skip
    from launch.scale import StudyError

    with pytest.raises(StudyError, match="finished with another config"):
        run_study(str(path), "slurm", ["overrides=[eval.folder=" + str(folders[1]) + ",optim.lr=0.5]"])
    assert write_sbatch(str(path), study, [], []).is_file()


def _scale(*args: str, env: dict | None = None) -> subprocess.Popen:
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "scale", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_tiny_study_interrupted_resumed_fitted_and_released(folders, tmp_path):
    """Three sizes, 2 steps each: killed after point 0, rerun skips it; fit; release card."""
    path = write_study(tmp_path, folders, {"models": [{"name": f"c{c}", "set": {"channels": c, "hidden": c}}
                                                      for c in (2, 4, 8)], "steps": [2]})
    study = load_study(path)
    points = [Path(study.out) / "points" / p.name for p in expand(study)]
    run = _scale("run", str(path))
    while not (points[0] / DONE).is_file():
        assert run.poll() is None, run.stdout.read()
        time.sleep(0.5)
    os.killpg(run.pid, signal.SIGKILL)  # the study dies while point 1 starts
    run.wait()
    first = (points[0] / DONE).read_text()
    log0 = (points[0] / "train.log").read_text()
    again = _scale("run", str(path))
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    assert "3 point(s), 1 finished, 2 to run" in out
    assert (points[0] / DONE).read_text() == first and (points[0] / "train.log").read_text() == log0
    done = [json.loads((p / DONE).read_text()) for p in points]
    assert [d["N"] for d in done] == sorted(d["N"] for d in done) and all(d["steps"] == 2 for d in done)
    assert all(d["C"] == d["flops_per_atom"] * d["atoms_seen"] > 0 for d in done)
    fit = _scale("fit", str(path), "--bootstrap", "20")
    out, _ = fit.communicate(timeout=600)
    assert fit.returncode == 0, out
    assert "L(N)" in out and "3 points for 3 parameters" in out
    doc = json.loads((Path(study.out) / "fit" / "fit.json").read_text())
    assert doc["source"]["points"] == 3 and set(doc["fidelities"]) == {"EMT", "EMT-asap"}
    assert (Path(study.out) / "fit" / "scaling.png").stat().st_size > 20_000
    from pretrain.release.create import create

    card = (create(points[2], tmp_path / "release", evaluate_held_out=False, progress=False)
            / "MODEL_CARD.md").read_text()
    alpha = doc["fidelities"]["EMT"]["fits"]["L(N)"]["params"]["alpha"]
    assert "## Scaling study" in card and f"alpha {alpha:.3g}" in card and "point `c8_f1_2st_s0`" in card


@pytest.mark.slow
def test_failing_point_is_reported_and_retried(folders, tmp_path):
    path = write_study(tmp_path, folders, {"width": [1], "steps": [3]}, max_attempts=2)
    bad = _scale("run", str(path), "overrides=[eval.folder=" + str(folders[1]) + ",optim.lr=1e30,max_nonfinite=1]")
    out, _ = bad.communicate(timeout=600)
    assert bad.returncode == 1 and "attempt 2/2" in out and "1 point(s) failed" in out, out
    point = Path(load_study(path).out) / "points" / expand(load_study(path))[0].name
    assert json.loads((point / FAILED).read_text())["attempt"] == 2 and not (point / DONE).exists()
    good = _scale("run", str(path))
    out, _ = good.communicate(timeout=600)
    assert good.returncode == 0 and (point / DONE).is_file() and not (point / FAILED).exists(), out
    # the fix changed the point's config: the failed attempt was set aside, not resumed
    assert "config changed since the last attempt" in out
    assert (point / "attempts" / "1" / FAILED).is_file() and (point / "attempts" / "1" / "checkpoints").is_dir()


@pytest.mark.slow
def test_ray_launcher_runs_points_as_ray_tasks(folders, tmp_path):
    path = write_study(tmp_path, folders, {"width": [0.5, 1], "steps": [2]})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    run = _scale("run", str(path), "--launcher", "ray", env=env)
    out, _ = run.communicate(timeout=900)
    assert run.returncode == 0, out
    study = load_study(path)
    assert all((Path(study.out) / "points" / p.name / DONE).is_file() for p in expand(study))
