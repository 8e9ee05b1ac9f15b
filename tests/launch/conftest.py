"""What the launcher tests share: one training config and its uninterrupted 2-rank run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import _free_port
from tests.pretrain.test_train import write_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 24  # long enough that a signal sent after step 3 arrives before the end (8 steps ran in 0.5 s here)


def launch_config(tmp: Path, folder: Path, name: str) -> Path:
    """The launcher tests' run: STEPS steps, a checkpoint every 2, one log line per step."""
    return write_config(tmp / f"{name}.yaml", folder, tmp / name, steps=STEPS)


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1")


def start_ranks(config: Path, world: int = 2, *extra: str) -> list[subprocess.Popen]:
    """``world`` processes of ``mlip-pretrain train config`` joined by the environment
    (what torchrun sets), without torchrun in between: each exit status is the trainer's."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config), *extra],
                             cwd=REPO, env=rank_env(r, world, port), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for r in range(world)]


def finish(procs: list[subprocess.Popen], timeout: float = 400) -> list[tuple[int, str]]:
    """``(exit status, output)`` of every process, in rank order."""
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


@pytest.fixture(scope="session")
def uninterrupted(built, tmp_path_factory) -> Path:
    """Output folder of the launch config run on 2 ranks without interruption."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = launch_config(tmp, built[1], "whole")
    for code, out in finish(start_ranks(config)):
        assert code == 0, out[-4000:]
    return tmp / "whole"
