"""bf16 as documented: geometry in fp32, bf16 only in the heavy ops, and a trained model's
bf16 predictions within 1% of its fp32 ones (the old bf16-weights path was ~10% off)."""

from __future__ import annotations

import copy

import pytest
import torch

from data_pipeline import keys as K
from tests.models.test_physics import tiny_model

TRAIN_MODEL = {"family": "mace", "cutoff": 4.0, "channels": 8, "hidden": 8, "lmax": 2,
               "hidden_lmax": 1, "correlation": 2, "layers": 2, "num_basis": 6,
               "avg_neighbors": 10.0}


def _dtypes_seen(model, batch) -> dict[str, set]:
    """Output dtypes of the geometry modules and of the linear layers in one forward."""
    seen: dict[str, set] = {"geometry": set(), "linear": set()}
    geometry = (model.backbone.radial, model.backbone.radial.envelope,
                getattr(model.backbone, "sh", None), getattr(model.backbone, "wigner", None))

    def hook(kind):
        return lambda module, args, out: seen[kind].add(out.dtype)

    handles = [m.register_forward_hook(hook("geometry")) for m in geometry if m is not None]
    handles += [m.register_forward_hook(hook("linear")) for m in model.backbone.modules()
                if isinstance(m, torch.nn.Linear)]
    try:
        model(batch, forces=True, create_graph=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["esen", "mace"])
def test_geometry_stays_fp32_under_bf16(family):
    from pretrain.release import physics

    model = tiny_model(family).float()
    batch = physics.batch_of(model, physics.default_probe().structures)
    model.precision = "bf16"
    seen = _dtypes_seen(model, batch)
    assert seen["geometry"] == {torch.float32}, seen
    assert seen["linear"] == {torch.bfloat16}, seen  # bf16 is really on where the FLOPs are
    assert model.references.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_references_stay_float64():
    """Also learned ones, and whatever the model is cast to (a 1e4 eV total in bf16 is off
    by ~30 eV)."""
    model = tiny_model("mace", learn_references=True)
    for cast in (model.float, model.bfloat16, model.half):
        cast()
        assert model.references.dtype == torch.float64 and model.reference_energies().dtype == torch.float64
        assert model.reference_shift.requires_grad and not model.references.requires_grad
    assert float(model.reference_energies()[0, 29]) == -3.5


@pytest.fixture(scope="module")
def trained(built):
    """A tiny MACE-style model trained for real (plain torch, fp32) on the session's shards,
    with the batches it is evaluated on (every record once)."""
    from common.config import from_dict
    from data_pipeline.batch import to_torch
    from data_pipeline.stream.collate import BatchBuilder
    from data_pipeline.stream.sampler import AtomBudgetSampler, SamplerConfig
    from models.build import ModelConfig, build_model, references_from_manifest
    from pretrain.loss import Loss, LossConfig

    folder = built[1]
    builder = BatchBuilder(folder, 4.0)
    manifest = builder.dataset.manifest
    sampler = AtomBudgetSampler.from_dataset(builder.dataset, from_dict(SamplerConfig, {"max_atoms": 96}), 0, 1)
    batches = [to_torch(builder(sampler.batch(k))) for k in range(sampler.steps_per_epoch)]
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TRAIN_MODEL), manifest["fidelities"], references_from_manifest(manifest))
    loss = Loss(from_dict(LossConfig, {"kind": "mse", "energy": 1.0, "forces": 10.0, "stress": 0.0}),
                manifest["fidelities"])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for step in range(40):
        b = batches[step % len(batches)]
        value, _ = loss(model(b, forces=True, create_graph=True), b, loss.counts(b))
        opt.zero_grad()
        value.backward()
        opt.step()
    with torch.no_grad():  # the same bf16-representable weights in every mode below
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model.eval(), batches[:8]


def _forces(model, batches) -> torch.Tensor:
    return torch.cat([model(b, forces=True, create_graph=False)["forces"].detach().double() for b in batches])


def test_trained_model_bf16_matches_fp32(trained):
    model, batches = trained
    labels = torch.cat([b[K.FORCES].double() for b in batches])
    mask = torch.cat([b[K.FORCES_MASK] for b in batches])
    fp32 = _forces(model, batches)
    model.precision = "bf16"
    try:
        bf16 = _forces(model, batches)
    finally:
        model.precision = "fp32"
    rel_rms = float((bf16 - fp32)[mask].norm() / fp32[mask].norm())
    mae32, mae16 = [float((f - labels)[mask].abs().mean()) for f in (fp32, bf16)]
    assert rel_rms < 0.01, f"bf16 forces {100 * rel_rms:.2f}% (relative RMS) from fp32"
    assert abs(mae16 - mae32) < 0.05 * mae32, f"force MAE bf16 {mae16:.4f} vs fp32 {mae32:.4f} eV/A"
    # the path this replaced (every weight and buffer in bf16) is measurably worse: the
    # comparison above can tell the two apart
    old = copy.deepcopy(model).bfloat16()
    rel_old = float((_forces(old, batches) - fp32)[mask].norm() / fp32[mask].norm())
    assert rel_old > 2 * rel_rms, (rel_old, rel_rms)

