"""Checkpoints that a run killed at any moment continues from exactly.

Layout of ``<out>/checkpoints``::

    step-00000200/              one per save, the last ``keep`` complete ones are kept
        ...                     DeepSpeed's model + optimizer files (every rank its part)
        trainer-rank00000.json  trainer state: step, counters, sampler position, run id
        tensors-rank00000.safetensors  EMA shadow and RNG state of that rank
        config.yaml             the resolved training config
        COMPLETE                written last, after every rank finished
    latest                      the tag of the newest complete checkpoint (atomic rename)

A save interrupted by a crash leaves a folder without ``COMPLETE``: it is never loaded,
``latest`` still names the previous one, and the next save of that step replaces it. The
trainer state is JSON and the tensors are safetensors; only DeepSpeed's own files are
pickles (see ``pretrain/engine.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.config import save_config, write_atomic

COMPLETE, LATEST = "COMPLETE", "latest"


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group of several)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume; the message names it and what to do."""


class Checkpointer:
    """Saves and finds checkpoints under ``folder`` for one rank of a ``world_size`` group."""

    def __init__(self, folder: str | Path, keep: int, rank: int, world_size: int):
        self.folder = Path(folder)
        self.keep, self.rank, self.world_size = keep, rank, world_size

    def save(self, engine, step: int, state: dict, tensors: dict[str, torch.Tensor], config,
             records: dict[str, dict] | None = None) -> Path:
        """Every rank calls this at the same step; returns the checkpoint folder.
        ``records``: ``{file name: JSON data}`` rank 0 writes beside the config (model.json)."""
        from safetensors.torch import save_file  # noqa: PLC0415

        tag = tag_of(step)
        path = self.folder / tag
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an interrupted save of this step, or a run restarted before it
        barrier()
        engine.save(self.folder, tag)
        write_atomic(path / f"trainer-rank{self.rank:05d}.json", json.dumps(state, indent=1))
        tmp = path / f".tensors-rank{self.rank:05d}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path / f"tensors-rank{self.rank:05d}.safetensors")
        barrier()
        if self.rank == 0:
            save_config(config, path / "config.yaml")
            for name, data in (records or {}).items():
                write_atomic(path / name, json.dumps(data, indent=1))
            (path / COMPLETE).write_text(f"{self.world_size}\n")
            write_atomic(self.folder / LATEST, tag + "\n")
            self._prune(keep_tag=tag)
        barrier()
        return path

    def _prune(self, keep_tag: str) -> None:
        complete = self.complete_tags()
        keep = set(complete[-self.keep:]) | {keep_tag}
        for p in self.folder.glob("step-*"):
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def complete_tags(self) -> list[str]:
        """Tags of complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.glob("step-*") if (p / COMPLETE).is_file())

    def latest(self) -> str | None:
        """The newest complete checkpoint's tag, or None when there is none."""
        named = self.folder / LATEST
        if named.is_file():
            tag = named.read_text().strip()
            if (self.folder / tag / COMPLETE).is_file():
                return tag
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def load(self, engine, tag: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """Load ``tag`` into ``engine``; returns this rank's (trainer state, tensors)."""
        from safetensors.torch import load_file  # noqa: PLC0415

        path = self.folder / tag
        saved_world = int((path / COMPLETE).read_text().split()[0])
        if saved_world != self.world_size:  # elastic: re-partitioned (pretrain/engine.py)
            check_elastic(path, engine, saved_world, self.world_size)
            engine.load_resharded(self.folder, tag, saved_world)
        else:
            engine.load(self.folder, tag)
        own = self.rank if self.rank < saved_world else 0  # ZeRO 0-2: every rank's copy is the same
        state = json.loads((path / f"trainer-rank{own:05d}.json").read_text())
        tensors = load_file(str(path / f"tensors-rank{own:05d}.safetensors"))
        return state, tensors


def check_elastic(path: Path, engine, saved_world: int, world: int) -> None:
    """Raise unless ``path`` (saved by ``saved_world`` ranks) can resume on ``world`` ranks:
    ZeRO 0-2 can; ZeRO 3's EMA and parameters are per-rank partitions, which no
    re-partitioning here covers."""
    if engine.cfg.zero_stage == 3:
        raise CheckpointError(f"{path}: saved by {saved_world} ranks under ZeRO-3, this run has "
                              f"{world}; resume ZeRO-3 runs on {saved_world} ranks, or start a new "
                              "run with init_from (consolidated weights)")


def initial_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """fp32 Potential weights of the newest complete checkpoint under ``folder`` (a run's
    ``checkpoints`` folder, or one ``step-*`` folder), consolidated from any ZeRO stage;
    for ``init_from`` (e.g. conservative fine-tuning of a direct-force pretraining run)."""
    from pretrain.engine import consolidated_weights  # noqa: PLC0415

    folder = Path(folder)
    if (folder / COMPLETE).is_file():
        folder, tag = folder.parent, folder.name
    else:
        tag = Checkpointer(folder, 1, 0, 1).latest()
        if tag is None:
            raise CheckpointError(f"init_from {folder}: no complete checkpoint (step-*/COMPLETE) "
                                  "there; point it at a run's checkpoints folder")
    return consolidated_weights(folder, tag)
