"""Durable checkpoints: a damaged newest checkpoint is passed over, with a warning naming it,
for the previous complete one, and a run resumed from there ends where the intact run did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.pretrain.test_train import _train, final_weights, losses, write_config

STEP2, STEP4 = "step-00000002", "step-00000004"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "COMPLETE missing": lambda ck: (ck / "COMPLETE").unlink(),
    "COMPLETE empty": lambda ck: (ck / "COMPLETE").write_text(""),
    "COMPLETE damaged": lambda ck: (ck / "COMPLETE").write_bytes(b'{"world_size": 1, "fil'),
    "trainer state truncated": lambda ck: _truncate(ck / "trainer-rank00000.json"),
    "tensors truncated": lambda ck: _truncate(ck / "tensors-rank00000.safetensors"),
    "DeepSpeed file truncated": lambda ck: _truncate(next(ck.rglob("*optim_states.pt"))),
    "file missing": lambda ck: (ck / "config.yaml").unlink(),
}


@pytest.fixture(scope="module")
def run(built, tmp_path_factory) -> tuple[Path, Path]:
    """(config, out) of a finished 1-rank run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = write_config(tmp / "run.yaml", built[1], tmp / "run")
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    return cfg, tmp / "run"


def test_complete_records_every_file(run):
    _, out = run
    folder = out / "checkpoints" / STEP4
    record = json.loads((folder / "COMPLETE").read_text())
    assert record["world_size"] == 1
    on_disk = {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*")
               if f.is_file() and f.name != "COMPLETE"}
    assert record["files"] == on_disk and "trainer-rank00000.json" in on_disk
    assert (out / "checkpoints" / "latest").read_text().strip() == STEP4
    assert not list(folder.glob(".*tmp"))  # no temporary left behind


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_passed_over(run, tmp_path, damage, capsys):
    from pretrain.checkpoint import Checkpointer

    _, out = run
    copy = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", copy)
    DAMAGE[damage](copy / STEP4)
    assert Checkpointer(copy, 2, 0, 1).latest() == STEP2
    err = capsys.readouterr().err
    assert f"passing over {copy / STEP4}" in err and "previous complete checkpoint" in err
    assert Checkpointer(copy, 2, 0, 1).complete_tags() == [STEP2]


def test_resume_from_before_a_damaged_checkpoint_is_exact(built, run, tmp_path):
    """Steps 3 and 4 rerun from step 2 give the losses and weights of the intact run."""
    _, out = run
    other = tmp_path / "run"
    shutil.copytree(out, other)
    _truncate(other / "checkpoints" / STEP4 / "tensors-rank00000.safetensors")
    resumed = write_config(tmp_path / "resume.yaml", built[1], other)  # the run's config, other out
    run_distributed(_train, 1, str(resumed), [], True, timeout=300)
    assert losses(other) == losses(out)  # a restart from step 0 would have logged 8 lines
    from pretrain.checkpoint import check_complete

    check_complete(other / "checkpoints" / STEP4)  # rewritten whole
    a, b = final_weights(other), final_weights(out)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def _resave_fails(rank: int, world: int, config: str) -> dict:
    """Train to step 2 (a complete checkpoint), then save step 2 again with a save that
    dies half-way (DeepSpeed's files written, then an error): the complete one must stay."""
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    from pretrain.checkpoint import Checkpointer, check_complete
    from pretrain.config import load_train_config
    from pretrain.trainer import Trainer

    trainer = Trainer(load_train_config(config, []), rank, world, progress=False)
    trainer.run(stop_at=2)
    folder = trainer.checkpoints.folder
    before = check_complete(folder / STEP2)
    save = trainer.engine.save

    def dies(where, tag):
        save(where, tag)
        raise OSError("disk full (injected)")

    trainer.engine.save = dies
    try:
        trainer.save()
    except OSError:
        pass
    after = check_complete(folder / STEP2)  # raises if the good checkpoint was touched
    return {"same": before == after, "latest": Checkpointer(folder, 1, 0, 1).latest(),
            "staging": sorted(p.name for p in folder.iterdir() if p.name.startswith("."))}


def test_resaving_a_step_keeps_the_complete_checkpoint_until_the_new_one_is(built, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", built[1], tmp_path / "run")
    (r,) = run_distributed(_resave_fails, 1, str(cfg), timeout=300)
    assert r["same"] and r["latest"] == STEP2
    assert r["staging"] == [f".saving-{STEP2}"]  # the interrupted save, never a step-* folder
