"""A trained model from wherever it lives: a run folder, one checkpoint, or a release.

``eval``, ``release create`` and ``init_from`` all read models through
:func:`load_trained`, so a run, a checkpoint and a release are interchangeable wherever a
trained model is expected:

* a **release** folder (``config.json`` + ``model.safetensors``): JSON and safetensors
  only, safe to load from anyone (``models/release_format.py``);
* a **checkpoint** (``<run>/checkpoints/step-N``), a run's ``checkpoints`` folder or the
  run folder itself (its newest complete checkpoint): DeepSpeed's files are consolidated
  to fp32 from any ZeRO stage (``pretrain.engine.consolidated_weights``), and the EMA
  shadow the trainer saved per rank (safetensors) replaces the raw weights when present.
  DeepSpeed's files are pickles: load checkpoints of your own runs only.

Every checkpoint also holds ``model.json``: the model config and the fidelity table fixed
when the run started (``models/fidelities.py``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from data_pipeline.config import from_dict, load_yaml
from models.build import ModelConfig, build_model
from models.fidelities import FidelityTable
from models.release_format import CONFIG, FORMAT, load_release
from pretrain.checkpoint import COMPLETE, Checkpointer, CheckpointError, trainer_state

MODEL_JSON = "model.json"


@dataclasses.dataclass
class Trained:
    """A Potential (eval mode, fp32, CPU) and what it is."""

    potential: torch.nn.Module
    table: FidelityTable
    model_cfg: ModelConfig
    kind: str  # "release" or "checkpoint"
    path: Path  # the release folder or the checkpoint's step folder
    ema: bool  # the weights are the EMA shadow
    train_config: dict | None = None  # resolved training config (checkpoints)
    release_config: dict | None = None  # config.json (releases)

    @property
    def step(self) -> int | None:
        """The optimizer step of a checkpoint (None for a release)."""
        if self.kind != "checkpoint":
            return None
        return trainer_state(self.path)["step"]


def model_record(model_cfg: ModelConfig, table: FidelityTable, manifest: dict) -> dict:
    """What ``model.json`` of a checkpoint holds: the model config, its fidelity table and
    a summary of the training data's manifest (a release's card is made from it)."""
    from data_pipeline.config import to_dict  # noqa: PLC0415

    groups = [{k: g.get(k) for k in ("dataset", "fidelity", "structures", "atoms", "elements",
                                      "force_rms")} for g in manifest.get("groups", [])]
    data = {"content_hash": manifest.get("content_hash"), "records": manifest.get("records"),
            "atoms": manifest.get("atoms"), "groups": groups}
    return {"model": to_dict(model_cfg), "fidelities": table.to_json(), "data": data}


def checkpoint_record(step: Path) -> dict:
    """``model.json`` of a checkpoint ({} for one that predates it)."""
    path = step / MODEL_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def is_release(path: str | Path) -> bool:
    path = Path(path) / CONFIG
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True  # a damaged release config: let the release reader name the problem


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


def load_trained(path: str | Path, ema: bool = True, verify: bool = True) -> Trained:
    """The trained model at ``path`` (run, checkpoints folder, step folder or release);
    ``ema``: use a checkpoint's EMA weights when it has them (a release's weights are
    whatever it was made with); ``verify``: check a release's SHA256SUMS."""
    if is_release(path):
        potential, config = load_release(path, verify=verify)
        table = FidelityTable.from_json(config["fidelities"], str(Path(path) / CONFIG))
        model_cfg = from_dict(ModelConfig, {**config["model"], "kernels": "auto"})
        return Trained(potential, table, model_cfg, "release", Path(path),
                       bool(config.get("weights", {}).get("ema")), release_config=config)
    step = find_checkpoint(path)
    if not (step / "config.yaml").is_file():
        raise CheckpointError(f"{step}: not a DeepSpeed checkpoint of this project (no config.yaml "
                              "beside COMPLETE); point at a checkpoint written by mlip-pretrain train")
    train_cfg = load_yaml(step / "config.yaml")
    model_cfg, table = _model_of(step, train_cfg)
    torch.manual_seed(0)
    potential = build_model(model_cfg, table.names, table.references)
    from pretrain.engine import consolidated_weights  # noqa: PLC0415 - DeepSpeed only here

    state = consolidated_weights(step.parent, step.name)
    used_ema = False
    if ema:
        shadow = ema_weights(step, potential, train_cfg)
        if shadow is not None:
            state.update(shadow)
            used_ema = True
    own = potential.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{step}: checkpoint lacks {missing[:5]} of its model.json model")
    potential.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
    if "references" not in dict(potential.named_parameters()):  # frozen: exact float64 from the table
        potential.references.copy_(_reference_buffer(potential, table))
    return Trained(potential.eval(), table, model_cfg,
                   "checkpoint", step, used_ema, train_config=train_cfg)


def _reference_buffer(potential, table: FidelityTable) -> torch.Tensor:
    from models.potential import reference_table  # noqa: PLC0415

    return reference_table(table.names, table.references).to(potential.references.dtype)


def _model_of(step: Path, train_cfg: dict) -> tuple[ModelConfig, FidelityTable]:
    """Model config and fidelity table of a checkpoint (``model.json``; checkpoints that
    predate it fall back to the manifest of the training data the config names)."""
    record = step / MODEL_JSON
    if record.is_file():
        data = json.loads(record.read_text())
        return (from_dict(ModelConfig, {**data["model"], "kernels": "auto"}),
                FidelityTable.from_json(data["fidelities"], str(record)))
    from data_pipeline.manifest import read_manifest  # noqa: PLC0415

    folder = train_cfg.get("data", {}).get("folder")
    print(f"[load] {step}: no {MODEL_JSON} (an older checkpoint); fidelity table from the "
          f"manifest of its training data {folder}", flush=True)
    return (from_dict(ModelConfig, {**train_cfg["model"], "kernels": "auto"}),
            FidelityTable.from_manifest(read_manifest(folder)))


def ema_weights(step: Path, potential: torch.nn.Module, train_cfg: dict) -> dict | None:
    """The EMA shadow of every parameter of ``potential`` saved in ``step`` (whole
    parameters on every rank under ZeRO 0-2; under ZeRO-3 each rank's flat partition,
    concatenated in rank order), or None when the run had no EMA."""
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
        out[name] = flat[:p.numel()].view_as(p).float()
    return out
