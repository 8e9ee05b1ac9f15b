"""EMA as evaluated: the same numbers as the EMA weights loaded into a fresh model, and under
ZeRO-3 the weights the forward pass reads are the EMA of every parameter (persistent ones,
which DeepSpeed never re-gathers from their partitions, included)."""

from __future__ import annotations

import os

import numpy as np
import torch

from tests.distributed import run_distributed
from tests.pretrain.test_train import TINY_MODEL, write_config


def _trainer(rank: int, world: int, config: str):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from pretrain.config import load_train_config
    from pretrain.engine import init_distributed
    from pretrain.trainer import Trainer

    init_distributed()
    return Trainer(load_train_config(config, []), rank, world, progress=False)


def _ema_eval(rank: int, world: int, config: str) -> dict:
    from models.build import build_model, references_from_manifest
    from pretrain.loss import error_metrics
    from pretrain.trainer import _epochs

    trainer = _trainer(rank, world, config)
    batches = _epochs(trainer.stream)
    for _ in range(3):
        trainer.train_step([next(batches)])
    with_ema = trainer.evaluate()
    trainer.cfg.eval.ema = False
    raw = trainer.evaluate()
    names = [n for n, _ in trainer.engine.potential.named_parameters()]
    fresh = build_model(trainer.cfg.model, trainer.fidelities, references_from_manifest(trainer.manifest))
    missing, _ = fresh.load_state_dict(dict(zip(names, trainer.ema.shadow)), strict=False)
    assert not [k for k in missing if k in names]
    fresh.eval()
    total = None
    for batch in trainer.eval_stream:  # the same evaluation batches, in order
        out = fresh(batch, forces=trainer.loss.needs_forces, stress=trainer.loss.needs_stress,
                    create_graph=False)
        errors = trainer.loss.errors(out, batch)
        total = errors if total is None else total + errors
    return {"ema": with_ema, "raw": raw, "fresh": error_metrics(total, trainer.fidelities, "val")}


def test_ema_evaluation_equals_a_fresh_model_with_the_ema_weights(built, tmp_path):
    cfg = write_config(tmp_path / "ema.yaml", built[1], tmp_path / "ema", ema_decay=0.5,
                       eval={"folder": str(built[1]), "max_atoms": 256})
    (r,) = run_distributed(_ema_eval, 1, str(cfg), timeout=300)
    assert r["ema"].keys() == r["fresh"].keys() and r["ema"]
    for k, v in r["ema"].items():
        assert abs(v - r["fresh"][k]) <= 1e-6 * max(1.0, abs(v)), (k, v, r["fresh"][k])
    assert any(abs(v - r["raw"][k]) > 1e-4 * max(1.0, abs(v)) for k, v in r["ema"].items())


def _zero3_ema(rank: int, world: int, config: str) -> dict:
    from pretrain.trainer import _epochs

    trainer = _trainer(rank, world, config)
    potential = trainer.engine.potential
    names = [n for n, _ in potential.named_parameters()]
    ref = {k: v for k, v in trainer.engine.state_dict().items() if k in names}
    batches = _epochs(trainer.stream)
    for n in range(3):  # the EMA rule applied to the whole gathered weights, by the test
        trainer.train_step([next(batches)])
        d = min(trainer.cfg.ema_decay, (1 + n) / (10 + n))
        full = trainer.engine.state_dict()
        ref = {k: v.lerp(full[k], 1.0 - d) for k, v in ref.items()}
    seen: dict[str, torch.Tensor] = {}

    def record(module, args):  # own parameters, and those of ParameterLists it reads
        owned = list(module.named_parameters(recurse=False))
        owned += [(f"{c}.{n}", p) for c, child in module.named_children()
                  if isinstance(child, torch.nn.ParameterList) for n, p in child.named_parameters()]
        for name, p in owned:
            seen.setdefault(f"{prefix[module]}{name}", p.data.detach().clone())

    prefix = {m: (f"{n}." if n else "") for n, m in potential.named_modules()}
    hooks = [m.register_forward_pre_hook(record) for m in potential.modules()]
    try:
        trainer.evaluate()
    finally:
        for h in hooks:
            h.remove()
    persistent = sum(bool(getattr(p, "ds_persist", False)) for p in potential.parameters())
    # after the evaluation the gathered copies hold the live weights again: the next step
    # trains them, not the EMA (DeepSpeed never re-gathers persistent parameters itself)
    stale = []
    for name, p in potential.named_parameters():
        if p.data.numel() == p.ds_numel:
            parts = [torch.empty_like(p.ds_tensor.data) for _ in range(world)]
            torch.distributed.all_gather(parts, p.ds_tensor.data.contiguous())
            if not torch.equal(torch.cat(parts)[:p.ds_numel].view(p.ds_shape), p.data):
                stale.append(name)
    def arrays(d):  # numpy: tensors would go back through shared memory the worker frees
        return {k: v.numpy() for k, v in d.items()}

    return {"seen": arrays(seen), "ref": arrays(ref), "raw": arrays({k: full[k] for k in names}),
            "persistent": persistent, "parameters": len(names), "stale": stale}


def test_zero3_evaluates_the_ema_of_every_parameter(built, tmp_path):
    model = dict(TINY_MODEL, direct_forces=True, direct_stress=True)
    cfg = write_config(tmp_path / "z3.yaml", built[1], tmp_path / "z3", model=model, ema_decay=0.5,
                       engine={"zero_stage": 3, "forces": "direct"},
                       eval={"folder": str(built[1]), "max_atoms": 256})
    for r in run_distributed(_zero3_ema, 2, str(cfg), timeout=300):
        assert r["persistent"] > 0  # the tiny model's parameters stay gathered under ZeRO-3
        used = [k for k in r["ref"] if k in r["seen"]]
        assert len(used) == r["parameters"], sorted(set(r["ref"]) - set(r["seen"]))
        for k in used:
            np.testing.assert_allclose(r["seen"][k], r["ref"][k], rtol=1e-6, atol=1e-7, err_msg=k)
        assert any(not np.allclose(r["seen"][k], r["raw"][k]) for k in used)
        assert not r["stale"], f"gathered parameters left with EMA values after evaluation: {r['stale']}"
