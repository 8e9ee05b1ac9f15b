"""Training for real: DeepSpeed on 1- and 2-process gloo groups, torchrun, SIGKILL + resume.

Every run trains a tiny MACE-style model on the session's shards (``conftest.built``) and
writes ``metrics.jsonl`` (one line per step here) and checkpoints under its own folder.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed import _free_port, run_distributed

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

TINY_MODEL = {"family": "mace", "cutoff": 4.0, "channels": 8, "hidden": 8, "lmax": 1,
              "hidden_lmax": 1, "correlation": 2, "layers": 2, "num_basis": 4,
              "avg_neighbors": 10.0}


def write_config(path: Path, folder: Path, out: Path, **sections) -> Path:
    """A training config over ``folder``; ``sections`` replace or extend the defaults."""
    cfg = {
        "out": str(out), "steps": 4, "log_every": 1, "ema_decay": 0.9, "seed": 3,
        "data": {"folder": str(folder), "cutoff": 4.0,
                 "sampler": {"max_atoms": 48, "seed": 5}, "stream": {"workers": 0}},
        "model": dict(TINY_MODEL),
        "loss": {"kind": "mse", "energy": 1.0, "forces": 10.0, "stress": 1.0},
        "optim": {"lr": 0.01, "warmup_steps": 1},
        "engine": {"zero_stage": 1, "grad_accum": 1},
        "checkpoint": {"every": 2, "keep": 2},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(out: Path) -> list[float]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [ln["train/loss"] for ln in lines if "train/loss" in ln]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import initial_weights

    return initial_weights(out / "checkpoints")


def _train(rank: int, world: int, config: str, overrides: list[str], resume: bool = False) -> dict:
    """Run ``mlip-pretrain train`` in a process of a run_distributed group."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from launch.train import run_training

    return run_training(config, overrides, resume=resume, progress=False)


@pytest.fixture(scope="module")
def folder(built) -> Path:
    return built[1]


def first_step_grad_norm(config: Path) -> float:
    """Plain torch, no DeepSpeed: the norm of the gradient of the first step's loss, the sum
    over its two global batches normalised by their labelled atoms (``pretrain.loss``)."""
    from data_pipeline.batch import to_torch
    from data_pipeline.stream.collate import BatchBuilder
    from data_pipeline.stream.sampler import AtomBudgetSampler
    from models.build import build_model, references_from_manifest
    from pretrain.config import load_train_config
    from pretrain.loss import Loss

    cfg = load_train_config(config)
    builder = BatchBuilder(cfg.data.folder, cfg.data.cutoff)
    manifest = builder.dataset.manifest
    sampler = AtomBudgetSampler.from_dataset(builder.dataset, cfg.data.sampler, 0, 1)
    batches = [to_torch(builder(sampler.batch(k))) for k in (0, 1)]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, manifest["fidelities"], references_from_manifest(manifest))
    loss = Loss(cfg.loss, manifest["fidelities"])
    counts = sum(loss.counts(b) for b in batches)
    total = sum(loss(model(b, forces=True, stress=True, create_graph=True), b, counts)[0] for b in batches)
    total.backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                       if p.grad is not None])))


def grad_norms(out: Path) -> list[float]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [ln["train/grad_norm"] for ln in lines if "train/grad_norm" in ln]


def test_two_ranks_match_one_rank(folder, tmp_path):
    """ZeRO 1 and 2 on 2 processes (1 micro-batch each) follow the loss curve of 1 process
    with 2 accumulated micro-batches: the same global batches, the same normalisation; the
    first step's gradient equals a plain-torch gradient of the summed loss."""
    ref = write_config(tmp_path / "ref.yaml", folder, tmp_path / "ref",
                       engine={"zero_stage": 0, "grad_accum": 2})
    run_distributed(_train, 1, str(ref), [], timeout=300)
    expected, w_ref = losses(tmp_path / "ref"), final_weights(tmp_path / "ref")
    assert len(expected) == 4 and min(expected[1:]) < expected[0]  # per-batch losses: one hard batch may stand out
    norm = first_step_grad_norm(ref)
    assert grad_norms(tmp_path / "ref")[0] == pytest.approx(norm, rel=1e-4)
    for stage in (1, 2):
        out = tmp_path / f"zero{stage}"
        cfg = write_config(tmp_path / f"z{stage}.yaml", folder, out,
                           engine={"zero_stage": stage, "grad_accum": 1,
                                   "activation_checkpointing": stage == 2})
        run_distributed(_train, 2, str(cfg), [], timeout=300)
        assert losses(out) == pytest.approx(expected, rel=2e-5), f"ZeRO-{stage}"
        assert grad_norms(out)[0] == pytest.approx(norm, rel=1e-4), f"ZeRO-{stage}"
        weights = final_weights(out)
        for k, v in w_ref.items():
            torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-6, msg=f"ZeRO-{stage} {k}")


def _torchrun(config: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone",  # torchrun binds a free port itself: no race with other processes
           "-m", "launch.cli", "train", str(config), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its workers in their own sessions)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_sigkill_and_resume_is_exact(folder, tmp_path):
    """torchrun, 2 ranks: a run killed with SIGKILL after its step-2 checkpoint and resumed
    ends with the losses, weights and EMA weights of the uninterrupted run; MLflow holds
    one run."""
    steps = ["steps=12"]
    tracking = {"enabled": True, "experiment": "resume"}
    whole = write_config(tmp_path / "whole.yaml", folder, tmp_path / "whole", tracking=tracking)
    _finish(_torchrun(whole, *steps))
    killed_out = tmp_path / "killed"
    killed = write_config(tmp_path / "killed.yaml", folder, killed_out, tracking=tracking)
    proc = _torchrun(killed, *steps)
    latest = killed_out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() >= "step-00000002"):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and both ranks, mid-run
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    assert not (killed_out / "checkpoints" / "step-00000012").exists(), "finished before the kill"
    _finish(_torchrun(killed, *steps, "--resume"))

    assert losses(killed_out) == losses(tmp_path / "whole")  # bit for bit
    a, b = final_weights(killed_out), final_weights(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    for rank in (0, 1):  # the EMA weights too (what evaluation and releases use), every rank
        name = f"checkpoints/step-00000012/tensors-rank{rank:05d}.safetensors"
        ema_a, ema_b = load_file(str(killed_out / name)), load_file(str(tmp_path / "whole" / name))
        keys = [k for k in ema_a if k.startswith("ema.")]
        assert len(keys) > 1 and ema_a.keys() == ema_b.keys()
        assert all(torch.equal(ema_a[k], ema_b[k]) for k in keys), f"rank {rank} EMA differs"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{killed_out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.content_hash"] == json.loads((folder / "manifest.json").read_text())["content_hash"]
    assert int(run.data.params["parameters"]) > 0 and run.data.params["model.channels"] == "8"
    assert run.data.params["world_size"] == "2"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 13))
    assert {m.key for m in client.get_metric_history(run.info.run_id, "lr")} == {"lr"}
    assert any(k.startswith("train/EMT/forces_mae") for k in run.data.metrics)
    assert "system/rss_gib" in run.data.metrics and "train/atoms_per_s" in run.data.metrics
    assert "config.yaml" in [f.path for f in client.list_artifacts(run.info.run_id)]


def _nonfinite(rank: int, world: int, config: str) -> dict:
    """Trainer with a loss that returns NaN at chosen steps (a fault injected by the test)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from pretrain.config import load_train_config
    from pretrain.engine import init_distributed
    from pretrain.trainer import Trainer, TrainingError, _epochs

    init_distributed()
    cfg = load_train_config(config, [])
    trainer = Trainer(cfg, rank, world, progress=False)
    real, bad_steps = trainer.loss, {1, 3, 4, 5}

    class Poisoned:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, out, batch, counts):
            loss, parts = real(out, batch, counts)
            return (loss * float("nan"), parts) if trainer.step in bad_steps else (loss, parts)

    result = {}
    trainer.loss = Poisoned()
    batches = _epochs(trainer.stream)
    trainer.train_step([next(batches)])  # step 0: fine
    before = trainer.engine.state_dict()
    ema_before = [s.clone() for s in trainer.ema.shadow]
    trainer.train_step([next(batches)])  # step 1: NaN, skipped
    after = trainer.engine.state_dict()
    result["untouched"] = all(torch.equal(before[k], after[k]) for k in before)
    result["ema_untouched"] = all(torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.shadow))
    result["skipped"] = trainer.skipped
    trainer.train_step([next(batches)])  # step 2: fine again, weights move
    result["moved"] = not all(torch.equal(after[k], v) for k, v in trainer.engine.state_dict().items())
    try:
        for _ in range(3):  # steps 3, 4, 5: three in a row stops the run
            trainer.train_step([next(batches)])
        result["error"] = None
    except TrainingError as err:
        result["error"] = str(err)
    result["skipped_total"] = trainer.skipped
    return result


def test_nonfinite_loss_skips_then_stops(folder, tmp_path):
    cfg = write_config(tmp_path / "nan.yaml", folder, tmp_path / "nan", max_nonfinite=3)
    (r,) = run_distributed(_nonfinite, 1, str(cfg), timeout=300)
    assert r["untouched"] and r["ema_untouched"] and r["skipped"] == 1 and r["moved"]
    assert r["skipped_total"] == 4
    assert "3 non-finite steps in a row" in r["error"] and "records" in r["error"]


def _optimizer_state(trainer) -> list[torch.Tensor]:
    return [v.clone() for st in trainer.engine.optimizer.state.values() for v in st.values()
            if torch.is_tensor(v)]


def _nonfinite_grad(rank: int, world: int, config: str) -> dict:
    """2 ranks, ZeRO-1: at step 1 rank 1's gradient of one weight becomes inf/NaN in
    backward while every loss stays finite (a hook injected by the test)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from pretrain.config import load_train_config
    from pretrain.engine import init_distributed
    from pretrain.trainer import Trainer, _epochs

    init_distributed()
    trainer = Trainer(load_train_config(config, []), rank, world, progress=False)
    weight = next(p for p in trainer.engine.potential.parameters() if p.requires_grad)
    weight.register_hook(lambda g: g * float("inf") if trainer.step == 1 and rank == 1 else g)
    batches = _epochs(trainer.stream)
    lrs = [trainer.train_step([next(batches)])[3]]  # step 0: fine
    before, moments = trainer.engine.state_dict(), _optimizer_state(trainer)
    ema = [s.clone() for s in trainer.ema.shadow]
    terms, _, _, lr = trainer.train_step([next(batches)])  # step 1: finite loss, inf gradient
    lrs.append(lr)
    after = trainer.engine.state_dict()
    result = {
        "norm": trainer.engine.grad_norm(), "skipped": trainer.skipped, "terms": terms,
        "untouched": all(torch.equal(before[k], after[k]) for k in before),
        "moments_untouched": all(torch.equal(a, b) for a, b in zip(moments, _optimizer_state(trainer))),
        "ema_untouched": all(torch.equal(a, b) for a, b in zip(ema, trainer.ema.shadow)),
    }
    lrs.append(trainer.train_step([next(batches)])[3])  # step 2: takes step 1's learning rate
    result["lrs"] = lrs
    result["moved"] = not all(torch.equal(after[k], v) for k, v in trainer.engine.state_dict().items())
    result["skipped_after"] = trainer.skipped
    return result


def test_nonfinite_gradient_skips_on_every_rank(folder, tmp_path):
    cfg = write_config(tmp_path / "inf.yaml", folder, tmp_path / "inf", optim={"lr": 0.01, "warmup_steps": 3})
    for r in run_distributed(_nonfinite_grad, 2, str(cfg), timeout=300):
        assert r["norm"] is not None and not math.isfinite(r["norm"])
        assert r["skipped"] == 1 and r["terms"] is None
        assert r["untouched"] and r["moments_untouched"] and r["ema_untouched"]
        assert r["lrs"][2] == r["lrs"][1] != r["lrs"][0]  # the schedule did not advance
        assert r["moved"] and r["skipped_after"] == 1


def test_zero3_direct_pretraining_then_conservative_finetune(folder, tmp_path):
    """ZeRO-3 trains direct force/stress heads (no double backward) on 2 ranks; a ZeRO-1 run
    then starts from its consolidated weights and trains on autograd forces."""
    model = dict(TINY_MODEL, direct_forces=True, direct_stress=True)
    pre = write_config(tmp_path / "pre.yaml", folder, tmp_path / "pre", model=model, steps=2,
                       engine={"zero_stage": 3, "forces": "direct"})
    run_distributed(_train, 2, str(pre), [], timeout=300)
    assert len(losses(tmp_path / "pre")) == 2
    from pretrain.weights import load_checkpoint_model

    pretrained = load_checkpoint_model(tmp_path / "pre").potential.state_dict()  # EMA, from 2 ZeRO-3 ranks
    fine = write_config(tmp_path / "fine.yaml", folder, tmp_path / "fine", model=model, steps=1,
                        init_from=str(tmp_path / "pre" / "checkpoints"), optim={"lr": 1e-12},
                        engine={"zero_stage": 1, "forces": "conservative"}, ema_decay=0.0)
    run_distributed(_train, 1, str(fine), [], timeout=300)
    tuned = final_weights(tmp_path / "fine")
    for k, v in pretrained.items():  # lr 1e-12: the fine-tune started from exactly these
        if k == "references":  # float64 from the fidelity table, vs float32 consolidated
            continue
        torch.testing.assert_close(tuned[k], v, rtol=0, atol=1e-9)


@pytest.mark.parametrize("overrides, message", [
    (["engine.zero_stage=3"], "needs a double backward, which DeepSpeed ZeRO-3 cannot do"),
    (["engine.forces=direct"], "needs a direct force head"),
    (["data.cutoff=5.0"], "differs from model.cutoff"),
    (["optim.lr=0"], "optim.lr: got 0"),
    (["engine.zero_stag=1"], "unknown key(s) engine.zero_stag"),
    (["loss.fidelity_weights.PBE=-1"], "negative weights"),
])
def test_config_errors_are_clear(folder, tmp_path, overrides, message, capsys):
    from launch.cli import main

    cfg = write_config(tmp_path / "bad.yaml", folder, tmp_path / "bad")
    assert main(["train", str(cfg), *overrides]) == 2
    assert message in capsys.readouterr().err


def test_model_file_reference(folder, tmp_path):
    from pretrain.config import load_train_config

    cfg = write_config(tmp_path / "c.yaml", folder, tmp_path / "o", model="configs/model/mace-xs.yaml",
                       data={"folder": str(folder), "cutoff": 6.0})
    loaded = load_train_config(cfg, ["model.layers=3"])
    assert loaded.model.family == "mace" and loaded.model.layers == 3 and loaded.model.cutoff == 6.0


def test_bf16_follows_fp32(folder, tmp_path):
    """bf16 weights (fp32 master copy in the optimizer, fp32 geometry) train the same curve
    as fp32 within bf16's ~3 significant digits, and every loss stays finite."""
    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = write_config(tmp_path / f"{precision}.yaml", folder, tmp_path / precision, steps=3,
                           engine={"precision": precision})
        run_distributed(_train, 1, str(cfg), [], timeout=300)
        curves[precision] = losses(tmp_path / precision)
    assert all(math.isfinite(x) for x in curves["bf16"])
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=0.05)


def test_deepspeed_launcher(folder, tmp_path):
    """The same config under the ``deepspeed`` launcher (2 local processes, gloo)."""
    cfg = write_config(tmp_path / "ds.yaml", folder, tmp_path / "ds", steps=2)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    launcher = Path(sys.executable).parent / "deepspeed"
    done = subprocess.run([str(launcher), "--num_accelerators", "2", "--master_port", str(_free_port()),
                           "--module", "launch.cli", "train", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert len(losses(tmp_path / "ds")) == 2
    state = json.loads((tmp_path / "ds" / "checkpoints" / "step-00000002" / "trainer-rank00001.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
