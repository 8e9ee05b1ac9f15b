"""The training data of a trained model, and how much of a held-out folder it already holds.

``eval``, ``release create`` and ``scale`` call :func:`held_out_overlap`; the comparison
itself is :mod:`data_pipeline.leakage`.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError
from data_pipeline.manifest import read_manifest


class OverlapError(UserError, ValueError):
    """Training data that cannot be found, or is not the data the model was trained on."""


def training_folder(trained, given: str | Path | None = None) -> Path | None:
    """The shard folder ``trained`` learned from: ``given`` (checked against the content
    hash the checkpoint or release records), else the run's ``data.folder`` where it still
    exists; None when neither is known (a release, with no ``--train-data``)."""
    recorded = _recorded_hash(trained)
    if given is not None:
        found = read_manifest(given)["content_hash"]
        if recorded and found != recorded:
            raise OverlapError(f"{given}: content hash {found[:16]} is not the training data's "
                               f"({recorded[:16]}, as {trained.path} records); pass the folder the model "
                               "was trained on")
        return Path(given)
    folder = ((trained.train_config or {}).get("data") or {}).get("folder")
    if folder and (Path(folder) / "manifest.json").is_file():
        if not recorded or read_manifest(folder)["content_hash"] == recorded:
            return Path(folder)
    return None


def _recorded_hash(trained) -> str | None:
    if getattr(trained, "release_config", None):
        return ((trained.release_config or {}).get("data") or {}).get("content_hash")
    from pretrain.weights import checkpoint_record  # noqa: PLC0415

    try:
        return checkpoint_record(trained.path).get("data", {}).get("content_hash")
    except Exception:  # noqa: BLE001 - a checkpoint without a record: nothing to check against
        return None


def held_out_overlap(trained, eval_folder: str | Path, given: str | Path | None = None,
                     progress: bool = True) -> dict | None:
    """:func:`data_pipeline.leakage.leakage` of ``eval_folder`` against the training data
    (None, with a printed note, when the training data is not known)."""
    from data_pipeline.leakage import leakage  # noqa: PLC0415

    train = training_folder(trained, given)
    if train is None:
        print(f"[overlap] the training data of {trained.path} is not known here (a release records only its "
              "content hash): pass --train-data FOLDER to check the held-out folder against it", flush=True)
        return None
    return leakage(eval_folder, train, progress)
