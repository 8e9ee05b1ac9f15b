"""How far bf16 moves a trained model's predictions: the same bf16-representable weights
evaluated in fp32, with bf16 autocast (``precision = "bf16"``: geometry, heads and
references in fp32/fp64) and, for comparison, with every weight and buffer of the model
cast to bf16 (what DeepSpeed's ``bf16`` mode did to the model before).

    python -m benchmarks.bf16_accuracy RUN_OUT [--data FOLDER]

``RUN_OUT`` is a training run's ``out`` folder (its newest checkpoint and config are
read); ``--data`` defaults to the run's ``data.folder``. Prints, per mode: force relative
RMS difference to fp32, force MAE against the labels, mean |energy difference| per atom.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from data_pipeline import keys as K


def batches_of(folder: str, cutoff: float, max_atoms: int = 512) -> list[dict]:
    """Every record of ``folder`` once, in order, as collated batches (float32)."""
    from data_pipeline.stream import LoaderConfig, build_loader  # noqa: PLC0415

    cfg = LoaderConfig(folder=folder, cutoff=cutoff)
    cfg.sampler.max_atoms, cfg.sampler.shuffle, cfg.stream.workers = max_atoms, False, 0
    stream = build_loader(cfg, progress=False)
    try:
        return list(stream)
    finally:
        stream.close()


def predictions(model, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(forces [N, 3] float64, energy per atom [G] float64) over ``batches``."""
    forces, energies = [], []
    for b in batches:
        out = model(b, forces=True, create_graph=False)
        forces.append(out["forces"].detach().double())
        energies.append(out["energy"].detach() / b[K.N_ATOMS])
    return torch.cat(forces), torch.cat(energies)


def report(model, batches: list[dict]) -> dict[str, dict[str, float]]:
    """The three modes' figures for ``model`` (fp32; its weights are rounded to bf16 first)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())  # the same bf16-representable weights in every mode
    model.eval()
    labels = torch.cat([b[K.FORCES].double() for b in batches])
    mask = torch.cat([b[K.FORCES_MASK] for b in batches])
    modes = {}
    model.precision = "fp32"
    modes["fp32"] = predictions(model, batches)
    model.precision = "bf16"
    modes["bf16 autocast"] = predictions(model, batches)
    model.precision = "fp32"
    model.bfloat16()  # the references stay float64 (Potential._apply), as they did before
    modes["bf16 weights"] = predictions(model, batches)
    model.float()
    f32, e32 = modes["fp32"]
    out = {}
    for name, (f, e) in modes.items():
        out[name] = {
            "force_rel_rms_vs_fp32": float((f - f32)[mask].norm() / f32[mask].norm()),
            "force_mae_meV_per_A": 1000 * float((f - labels)[mask].abs().mean()),
            "energy_shift_meV_per_atom": 1000 * float((e - e32).abs().mean()),
        }
    return out


def main() -> None:
    from models.build import build_model, references_from_manifest  # noqa: PLC0415
    from pretrain.checkpoint import initial_weights  # noqa: PLC0415
    from pretrain.config import load_train_config  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", default=None)
    args = p.parse_args()
    tag = (args.run / "checkpoints" / "latest").read_text().strip()
    cfg = load_train_config(args.run / "checkpoints" / tag / "config.yaml")
    folder = args.data or cfg.data.folder
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    model = build_model(cfg.model, manifest["fidelities"], references_from_manifest(manifest))
    model.load_state_dict(initial_weights(args.run / "checkpoints"), strict=False)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, checkpoint {tag}, data {folder}")
    for mode, figures in report(model, batches_of(folder, cfg.model.cutoff)).items():
        print(f"{mode:14s} " + "  ".join(f"{k} {v:.4g}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
