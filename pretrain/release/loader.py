"""Load a released model from safetensors and JSON alone, or any trained model by its path.

:func:`load_release` needs neither DeepSpeed nor a checkpoint: the model is rebuilt from
``config.json`` (model config, fidelity table) and every tensor of its state must be in
``model.safetensors`` with its shape. :func:`load_model` reads a release, a run folder,
its ``checkpoints`` folder or one checkpoint the same way (``eval``, ``init_from``), so a
run, a checkpoint and a release are interchangeable wherever a trained model is expected.
"""

from __future__ import annotations

from pathlib import Path

from common.config import ConfigError, from_dict
from common.fidelities import FidelityTable
from models.build import ModelConfig, build_model
from pretrain.release.format import CONFIG, WEIGHTS, ReleaseError, check_sums, is_release, read_config, read_weights
from pretrain.weights import TrainedModel, load_checkpoint_model


def load_release(folder: str | Path, verify: bool = True) -> TrainedModel:
    """The model of the release at ``folder`` (eval mode); ``verify`` checks SHA256SUMS first."""
    folder = Path(folder)
    if verify:
        check_sums(folder)
    config = read_config(folder)
    where = str(folder / CONFIG)
    try:
        model_cfg = from_dict(ModelConfig, {**config["model"], "kernels": "auto"})  # cueq where installed
    except ConfigError as err:
        raise ReleaseError(f"{where}: model: {err}") from None
    table = FidelityTable.from_json(config["fidelities"], where)
    model = build_model(model_cfg, table)
    state = read_weights(folder)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        raise ReleaseError(f"{folder / WEIGHTS}: does not fit the model of {CONFIG} (missing "
                           f"{missing[:5]}, other shapes {wrong[:5]}); the files are from different releases")
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
    return TrainedModel(model.eval(), table, model_cfg, config["forces"], "release", folder,
                        bool(config.get("weights", {}).get("ema")), release_config=config)


def load_model(path: str | Path, ema: bool = True, verify: bool = True) -> TrainedModel:
    """The trained model at ``path``: a release (checksums checked unless ``verify=False``),
    or a run, its checkpoints folder or a step folder (``ema``: the checkpoint's EMA
    weights when it has them)."""
    if is_release(path):
        return load_release(path, verify=verify)
    return load_checkpoint_model(path, ema=ema)
