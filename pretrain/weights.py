"""The trained model inside a checkpoint: its record, its consolidated weights, its EMA.

Every checkpoint holds ``model.json`` beside DeepSpeed's files: the model config, the
fidelity table fixed when the run started (``common/fidelities.py``), how forces were
trained (``engine.forces``), a summary of the training data's manifest and the training
FLOPs per atom measured on the run's own batches (``pretrain/flops.py``). From it and
DeepSpeed's files :func:`load_checkpoint_model` rebuilds the model: DeepSpeed's shards
are consolidated from any ZeRO stage (``pretrain.engine.consolidated_weights``), and the
EMA shadow the trainer saved per rank (safetensors) replaces the raw weights when
present. DeepSpeed's files are pickles: load checkpoints of your own runs only (a
release, ``pretrain/release/``, is what you share).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from common.config import from_dict, load_yaml, to_dict
from common.fidelities import FidelityTable
from models.build import ModelConfig, build_model
from pretrain.checkpoint import COMPLETE, Checkpointer, CheckpointError, trainer_state

MODEL_JSON = "model.json"


@dataclasses.dataclass
class TrainedModel:
    """A trained Potential (eval mode, fp32 weights, float64 references, CPU) and what it is."""

    potential: torch.nn.Module
    table: FidelityTable
    model_cfg: ModelConfig
    #: how the model serves forces: "conservative" (-dE/dr) or "direct" (its trained head)
    forces: str
    kind: str  # "release" or "checkpoint"
    path: Path  # the release folder or the checkpoint's step folder
    ema: bool  # the weights are the EMA shadow
    train_config: dict | None = None  # resolved training config (checkpoints)
    release_config: dict | None = None  # config.json (releases)

    @property
    def direct(self) -> bool:
        """Whether forces come from the direct head (what the run trained)."""
        return self.forces == "direct"

    @property
    def step(self) -> int | None:
        """The optimizer step of a checkpoint (None for a release)."""
        if self.kind != "checkpoint":
            return None
        return trainer_state(self.path)["step"]


def model_record(model_cfg: ModelConfig, table: FidelityTable, manifest: dict, forces: str,
                 flops: dict | None = None) -> dict:
    """What ``model.json`` of a checkpoint holds: the model config, its fidelity table, how
    forces are trained, a summary of the training data's manifest (a release's card is made
    from it: groups and coverage) and the measured training FLOPs (:func:`pretrain.flops.training_flops`)."""
    groups = [{k: g.get(k) for k in ("dataset", "fidelity", "structures", "atoms", "elements",
                                      "force_rms")} for g in manifest.get("groups", [])]
    data = {"content_hash": manifest.get("content_hash"), "records": manifest.get("records"),
            "atoms": manifest.get("atoms"), "groups": groups, "coverage": manifest.get("coverage")}
    return {"model": to_dict(model_cfg), "fidelities": table.to_json(), "forces": forces,
            "data": data, "flops": flops}


def checkpoint_record(step: Path) -> dict:
    """``model.json`` of a checkpoint ({} for one that predates it)."""
    path = step / MODEL_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def find_checkpoint(path: str | Path) -> Path:
    """The step folder ``path`` names: itself, or the newest complete checkpoint of a
    ``checkpoints`` folder or of a run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run, checkpoint or release folder")
    if (path / COMPLETE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        tag = Checkpointer(folder, 1, 0, 1).latest()
        if tag is not None:
            return folder / tag
    raise CheckpointError(f"{path}: no complete checkpoint (step-*/COMPLETE) and no release "
                          "(config.json) there; point it at a run folder, its checkpoints "
                          "folder, one step-* folder or a release folder")


def run_folder(step: Path) -> Path:
    """The run folder of checkpoint ``step`` as it is on disk now (``<run>/checkpoints/step-N``),
    wherever the run was when it trained: a moved run folder is found where it is."""
    return Path(step).resolve().parent.parent


def load_checkpoint_model(path: str | Path, ema: bool = True) -> TrainedModel:
    """The trained model of the checkpoint ``path`` names (run, checkpoints folder or step
    folder); ``ema``: its EMA weights when it has them."""
    step = find_checkpoint(path)
    if not (step / "config.yaml").is_file():
        raise CheckpointError(f"{step}: not a DeepSpeed checkpoint of this project (no config.yaml "
                              "beside COMPLETE); point at a checkpoint written by mlip-pretrain train")
    train_cfg = load_yaml(step / "config.yaml")
    model_cfg, table, forces = _model_of(step, train_cfg)
    torch.manual_seed(0)
    potential = build_model(model_cfg, table)
    from pretrain.engine import consolidated_weights  # noqa: PLC0415 - DeepSpeed only here

    state = consolidated_weights(step.parent, step.name)
    used_ema = False
    if ema:
        shadow = ema_weights(step, potential, train_cfg)
        if shadow is not None:
            state.update(shadow)
            used_ema = True
    own = potential.state_dict()
    # the uncertainty's buffers (precisions, calibration) are fitted at release time, never
    # trained: a checkpoint written before one of them existed keeps the fresh (unfitted) one
    fitted_later = {k for k, _ in potential.named_buffers() if k.startswith("uncertainty.")}
    missing = sorted(set(own) - set(state) - fitted_later)
    if missing:
        raise CheckpointError(f"{step}: checkpoint lacks {missing[:5]} of its model.json model")
    potential.load_state_dict({k: state.get(k, own[k]).to(own[k].dtype) for k in own})
    # the references buffer exactly, in float64, from the table (DeepSpeed's copy may be rounded)
    from models.potential import reference_table  # noqa: PLC0415

    potential.references.copy_(reference_table(table.names, table.references))
    return TrainedModel(potential.eval(), table, model_cfg, forces, "checkpoint", step, used_ema,
                        train_config=train_cfg)


def _model_of(step: Path, train_cfg: dict) -> tuple[ModelConfig, FidelityTable, str]:
    """Model config, fidelity table and force mode of a checkpoint (``model.json``;
    checkpoints that predate it fall back to the manifest of the training data the config
    names)."""
    forces = train_cfg.get("engine", {}).get("forces", "conservative")
    record = step / MODEL_JSON
    if record.is_file():
        data = json.loads(record.read_text())
        return (from_dict(ModelConfig, {**data["model"], "kernels": "auto"}),
                FidelityTable.from_json(data["fidelities"], str(record)), data.get("forces", forces))
    from data_pipeline.manifest import read_manifest  # noqa: PLC0415

    folder = train_cfg.get("data", {}).get("folder")
    print(f"[load] {step}: no {MODEL_JSON} (an older checkpoint); fidelity table from the "
          f"manifest of its training data {folder}", flush=True)
    return (from_dict(ModelConfig, {**train_cfg["model"], "kernels": "auto"}),
            FidelityTable.from_manifest(read_manifest(folder)), forces)


def ema_weights(step: Path, potential: torch.nn.Module, train_cfg: dict) -> dict | None:
    """The EMA shadow of every parameter of ``potential`` saved in ``step`` (whole
    parameters on every rank under ZeRO 0-2; under ZeRO-3 each rank's flat partition,
    concatenated in rank order), in each parameter's dtype, or None when the run had no EMA."""
    from safetensors.torch import load_file  # noqa: PLC0415

    files = sorted(step.glob("tensors-rank*.safetensors"))
    if not files:
        return None
    ranks = [load_file(str(f)) for f in files]
    if "ema.updates" not in ranks[0]:
        return None
    names = [n for n, _ in potential.named_parameters()]
    if len([k for k in ranks[0] if k.startswith("ema.") and k != "ema.updates"]) != len(names):
        raise CheckpointError(f"{step}: its EMA state has another number of tensors than the "
                              "model of model.json; the checkpoint is from another model")
    zero3 = int(train_cfg.get("engine", {}).get("zero_stage", 0)) == 3
    out = {}
    for k, (name, p) in enumerate(potential.named_parameters()):
        parts = [r[f"ema.{k}"] for r in ranks] if zero3 else [ranks[0][f"ema.{k}"]]
        flat = torch.cat([t.reshape(-1) for t in parts])
        if flat.numel() < p.numel():
            raise CheckpointError(f"{step}: EMA tensor {k} ({name}) has {flat.numel()} values, the "
                                  f"parameter {p.numel()}; the checkpoint is from another model")
        out[name] = flat[:p.numel()].view_as(p).to(p.dtype)
    return out
