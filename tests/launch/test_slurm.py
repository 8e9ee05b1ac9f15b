"""The rendered sbatch script on a real single-node SLURM (tests/launch/slurm_cluster.py):
a 2-rank CPU training that gets SIGUSR1 from ``scancel --signal`` mid-run checkpoints,
requeues itself and ends with the losses and weights of an uninterrupted run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import _free_port
from tests.launch.conftest import STEPS, launch_config
from tests.launch.slurm_cluster import LocalSlurm, why_not
from tests.pretrain.test_train import final_weights, losses

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def test_render_names_every_part(built, tmp_path, capsys):
    from launch.cli import main

    config = launch_config(tmp_path, built[1], "r")
    assert main(["launch", "slurm", str(config), "--nodes", "4", "--gpus-per-node", "8", "--time",
                 "2-00:00:00", "--partition", "gpu", "--account", "chem", "optim.lr=0.0003"]) == 0
    script = capsys.readouterr().out
    for part in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@120", "#SBATCH --time=2-00:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=chem", "--nnodes=4 --nproc-per-node=8", "--rdzv-backend=c10d",
                 "DS_ACCELERATOR=cuda", "optim.lr=0.0003", "--resume", "scontrol requeue",
                 f"out={tmp_path / 'r'}", "--redirects=3"):
        assert part in script, part
    assert main(["launch", "slurm", str(config), "--nodes", "0"]) == 2
    assert main(["launch", "slurm", str(config), "model.channelz=3"]) == 2
    assert "unknown key" in capsys.readouterr().err


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as err:
        cluster.stop()
        pytest.skip(f"a local SLURM does not start here: {str(err)[:2000]}")
    yield cluster
    cluster.stop()


def _wait(cluster: LocalSlurm, job: str, until, timeout: float, what: str, final: bool = True) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.job(job)
        if until(info):
            return info
        # while a requeue is under way the old attempt may show FAILED for a moment
        assert not final or info["JobState"] not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), info
        assert time.monotonic() < deadline, f"{what} within {timeout} s: {info}"
        time.sleep(0.5)


@pytest.mark.slow
def test_sbatch_signal_requeue_resume_is_exact(slurm, built, tmp_path, uninterrupted):
    """``launch slurm --submit`` (1 node, 2 CPU ranks, gloo); after step 3 ``scancel
    --signal=USR1``: checkpoint, exit 75, ``scontrol requeue``; the requeued attempt resumes
    and the job completes with the uninterrupted run's losses and weights, bit for bit."""
    import subprocess
    import sys

    config = launch_config(tmp_path, built[1], "job")
    out = tmp_path / "job"
    done = subprocess.run([sys.executable, "-m", "launch.cli", "launch", "slurm", str(config),
                           "--procs-per-node", "2", "--port", str(_free_port()), "--submit"], env=slurm.env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    job = done.stdout.split("submitted job ")[1].split(":")[0]
    metrics = out / "metrics.jsonl"
    _wait(slurm, job, lambda _: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3,
          400, "step 3 logged")
    slurm.run("scancel", "--signal=USR1", job)
    info = _wait(slurm, job, lambda j: int(j.get("Restarts", 0)) >= 1, 300, "a requeue", final=False)
    if info["JobState"] == "PENDING":  # a requeued job is held ~2 min by default: release it now
        slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    info = _wait(slurm, job, lambda j: j["JobState"] == "COMPLETED", 600, "completion")
    log = (out / "slurm" / f"job-{job}.out").read_text()
    assert "requeueing job" in log and "attempt 1" in log, log[-3000:]
    assert info["ExitCode"] == "0:0", log[-3000:]
    stopped = json.loads(log.split("preempted with a checkpoint (")[1].split(")")[0])["step"]
    assert 3 <= stopped < STEPS
    assert list((out / "slurm").glob(f"{job}-0/*/attempt_0/1/stdout.log"))  # per-rank logs
    assert losses(out) == losses(uninterrupted)
    a, b = final_weights(out), final_weights(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
