"""Preemption and elastic resume on real process groups: a signal on one rank stops both
at the same step with a checkpoint (exit 75), the time limit does the same, and a run
saved at one world size continues at another, covering the interrupted epoch once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.launch.conftest import STEPS, finish, launch_config, start_ranks
from tests.pretrain.test_train import final_weights, losses, write_config

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def folder(built) -> Path:
    return built[1]


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_signal_on_one_rank_stops_both_and_resume_is_exact(folder, tmp_path, uninterrupted):
    """SIGUSR1 to rank 1 alone mid-run: both ranks checkpoint the same step and exit 75,
    rank 0 writes PREEMPTED; --resume ends with the uninterrupted run's losses and
    weights, bit for bit."""
    config = launch_config(tmp_path, folder, "signalled")
    out = tmp_path / "signalled"
    procs = start_ranks(config)
    deadline = time.monotonic() + 300
    while _logged_steps(out) < 3:  # step 3 done: past the first checkpoint
        assert all(p.poll() is None for p in procs), finish(procs)
        assert time.monotonic() < deadline, "no third step within 300 s"
        time.sleep(0.02)
    os.kill(procs[1].pid, signal.SIGUSR1)
    results = finish(procs)
    assert [code for code, _ in results] == [75, 75], results[1][1][-3000:]
    marker = json.loads((out / "PREEMPTED").read_text())
    assert 3 <= marker["step"] < STEPS and "another rank" in marker["reason"]
    assert "SIGUSR1" in results[1][1] and "preempted" in results[0][1]
    stopped = out / "checkpoints" / f"step-{marker['step']:08d}"
    assert (stopped / "COMPLETE").is_file() and not (out / "checkpoints" / f"step-{STEPS:08d}").exists()

    for code, text in finish(start_ranks(config, 2, "--resume")):
        assert code == 0, text[-3000:]
    assert losses(out) == losses(uninterrupted)
    a, b = final_weights(out), final_weights(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_time_limit_stops_with_a_checkpoint(folder, tmp_path):
    """--time-limit 1: set-up alone takes longer, so the first step boundary stops the run
    with a checkpoint of step 1 and exit 75; --resume finishes it."""
    config = write_config(tmp_path / "t.yaml", folder, tmp_path / "t", steps=3)
    ((code, text),) = finish(start_ranks(config, 1, "--time-limit", "1"))
    assert code == 75, text[-3000:]
    marker = json.loads((tmp_path / "t" / "PREEMPTED").read_text())
    assert marker["step"] == 1 and marker["reason"].startswith("time limit")
    assert (tmp_path / "t" / "checkpoints" / "step-00000001" / "COMPLETE").is_file()
    ((code, text),) = finish(start_ranks(config, 1, "--resume", "--time-limit", "1:00:00"))
    assert code == 0, text[-3000:]
    assert len(losses(tmp_path / "t")) == 3
    # the marker was the first job's: the job that finished cleared it when it started, so
    # a batch script (or a later crash) never reads this run as preempted
    assert not (tmp_path / "t" / "PREEMPTED").exists()


def _elastic(rank: int, world: int, config: str, resume: bool, end: int | None) -> dict:
    """A Trainer on this group: what it loaded (weights, Adam steps), then its run to ``end``."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from pretrain.config import load_train_config
    from pretrain.engine import init_distributed
    from pretrain.trainer import Trainer

    init_distributed()
    cfg = load_train_config(config, [] if end is None else [f"steps={end}"])
    trainer = Trainer(cfg, rank, world, progress=False, resume=resume)
    loaded = {"weights": {k: v.numpy() for k, v in trainer.engine.state_dict().items()},  # tensors
              "step": trainer.step,  # would go back through a socket that dies with the process
              "adam_steps": sorted({int(s["step"]) for s in trainer.engine.optimizer.state.values()})}
    trainer.run(None if end is None else end)
    return dict(loaded, stream=trainer.stream.state_dict())


def _epoch_atoms(config: Path) -> dict[str, int]:
    """Atoms per fidelity of every pick of epoch 0 (any world size deals the same picks)."""
    from data_pipeline.stream.dataset import ShardedDataset
    from data_pipeline.stream.sampler import AtomBudgetSampler
    from pretrain.config import load_train_config

    cfg = load_train_config(config)
    sampler = AtomBudgetSampler.from_dataset(ShardedDataset(cfg.data.folder), cfg.data.sampler)
    for _ in sampler:
        pass
    return sampler.atoms_seen


def _steps_left(config: Path, state: dict, world: int) -> int:
    from data_pipeline.stream.dataset import ShardedDataset
    from data_pipeline.stream.sampler import AtomBudgetSampler
    from pretrain.config import load_train_config

    cfg = load_train_config(config)
    sampler = AtomBudgetSampler.from_dataset(ShardedDataset(cfg.data.folder), cfg.data.sampler, 0, world)
    sampler.load_state_dict(state)
    assert sampler.epoch == 0
    return sampler.steps_per_epoch - sampler.step


@pytest.mark.parametrize("before, after, stage", [(2, 1, 1), pytest.param(1, 2, 2, marks=pytest.mark.slow)])
def test_elastic_resume_covers_the_epoch_once(folder, tmp_path, before, after, stage):
    """Saved at ``before`` ranks after 2 steps, resumed at ``after``: the weights loaded are
    the checkpoint's bit for bit, the Adam moments come along (their step count is 2, not a
    fresh optimizer's), and training to the end of the epoch sees exactly its atoms."""
    from pretrain.checkpoint import initial_weights

    config = write_config(tmp_path / "e.yaml", folder, tmp_path / "e", steps=100,
                          data={"folder": str(folder), "cutoff": 4.0,
                                "sampler": {"max_atoms": 64, "seed": 5, "samples_per_epoch": 40},
                                "stream": {"workers": 0}},
                          engine={"zero_stage": stage, "grad_accum": 1})
    run_distributed(_elastic, before, str(config), False, 2, timeout=300)
    step2 = tmp_path / "e" / "checkpoints" / "step-00000002"
    saved = json.loads((step2 / "trainer-rank00000.json").read_text())
    end = 2 + _steps_left(config, saved["stream"], after)
    weights = initial_weights(step2)
    results = run_distributed(_elastic, after, str(config), True, end, timeout=300)
    for r in results:
        assert r["step"] == 2 and r["adam_steps"] == [2]
        assert all(np.array_equal(r["weights"][k], v.detach().numpy())
                   for k, v in weights.items() if k != "references")  # (float64 table, float32 here)
        stream = r["stream"]
        assert stream["world_size"] == after and stream["epoch"] == 0
        assert stream["atoms_seen"] == _epoch_atoms(config)
    assert not list((tmp_path / "e" / "checkpoints").glob(".universal-*"))  # the conversion is gone
    assert np.isfinite(losses(tmp_path / "e")).all()
