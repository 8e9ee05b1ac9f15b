"""Every user mistake in ``train`` and ``data`` commands exits with status 2 and one message
naming the file, key or value at fault and what to do, never a traceback (through the CLI)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.pretrain.test_train import write_config


def _cli(argv: list[str]) -> tuple[int, str]:
    from launch.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _assert_clean(code: int, err: str, expected: str) -> None:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    message = [ln for ln in err.splitlines() if ln.startswith("mlip-pretrain: error")]
    assert len(message) == 1 and expected in message[0], err[-2000:]


@pytest.fixture
def damaged(built, tmp_path) -> dict[str, Path]:
    """Copies of the session's shard folder: a truncated shard, a manifest that is not JSON."""
    folder = built[1]
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    shard = sorted(truncated.glob("shard-*.lmdb"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    garbage = tmp_path / "garbage"
    shutil.copytree(folder, garbage)
    (garbage / "manifest.json").write_text("{not json")
    return {"truncated": truncated, "garbage": garbage, "shard": shard}


def test_data_command_errors(built, damaged, tmp_path):
    folder = str(built[1])
    cases = [
        (["data", "build", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")], "nope.yaml: config file not found"),
        (["data", "inspect", str(tmp_path / "nope")], "no manifest; is"),
        (["data", "verify", str(tmp_path / "nope")], "no manifest; is"),
        (["data", "inspect", str(damaged["garbage"])], "manifest.json"),
        (["data", "stream", str(damaged["truncated"])], damaged["shard"].name),
        (["data", "stream", folder, "sampler.max_atoms=abc"], "sampler.max_atoms: got 'abc', expected int"),
        (["data", "stream", folder, "cutoff=-1"], "cutoff: got -1.0"),
        (["data", "stream", folder, "sampler.max_atoms=4", "sampler.oversize=error"], "exceed the batch budget"),
    ]
    for argv, expected in cases:
        _assert_clean(*_cli(argv), expected)


def _train_errors(rank: int, world: int, config: str, cases: list) -> list[tuple[int, str]]:
    """One process group for every case (DeepSpeed joins it once per process)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from pretrain.engine import init_distributed

    init_distributed()
    assert _cli(["train", config])[0] == 0  # the run the resume cases continue
    return [_cli(["train", config, *argv]) for argv, _ in cases]


def test_train_command_errors(built, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", built[1], out, steps=2)
    foreign = tmp_path / "foreign" / "step-00000001"  # a COMPLETE beside files of something else
    foreign.mkdir(parents=True)
    (foreign / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    (foreign / "COMPLETE").write_text(json.dumps({"world_size": 1, "files": {"mp_rank_00_model_states.pt": 16}}))
    cases = [
        (["data.folder=" + str(tmp_path / "nope")], "no manifest; is"),
        (["eval.folder=" + str(tmp_path / "nope")], "no manifest; is"),
        (["init_from=" + str(tmp_path / "nope")], "no such run, checkpoint or release folder"),
        (["init_from=" + str(foreign)], "not a DeepSpeed checkpoint of this project"),
        (["--resume", "steps=4", "model.channels=4"], "cannot resume this run from it"),
        (["--resume", "steps=4", "ema_decay=0"], "this run has ema_decay: 0"),
        (["data.sampler.max_atoms=4", "data.sampler.oversize=error"], "exceed the batch budget"),
        (["optim.warmup_steps=-1"], "warmup_steps must be >= 0"),
    ]
    results = run_distributed(_train_errors, 1, str(cfg), cases, timeout=600)[0]
    for (argv, expected), (code, err) in zip(cases, results):
        _assert_clean(code, err, expected)
    _assert_clean(*_cli(["train", str(tmp_path / "nope.yaml")]), "nope.yaml: config file not found")
