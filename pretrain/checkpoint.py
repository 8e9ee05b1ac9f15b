"""Checkpoints that a run killed at any moment continues from exactly.

Layout of ``<out>/checkpoints``::

    step-00000200/              one per save, the last ``keep`` complete ones are kept
        ...                     DeepSpeed's model + optimizer files (every rank its part)
        trainer-rank00000.json  trainer state: step, counters, sampler position, run id
        tensors-rank00000.safetensors  EMA shadow and RNG state of that rank
        config.yaml             the resolved training config
        COMPLETE                written last, after every rank finished: JSON world size
                                and the size of every file of the checkpoint
    latest                      the tag of the newest complete checkpoint (atomic rename)

Durability: every rank fsyncs the files it wrote, then rank 0 fsyncs the folder and
writes ``COMPLETE`` and ``latest`` atomically (``common.atomic``), so a power cut
never leaves a ``COMPLETE`` that names data still in a page cache. A save is written
under ``.saving-step-N`` and renamed to ``step-N`` once complete; a complete checkpoint of
the same step is moved aside and deleted only after the new one is in place. A save interrupted by
a crash leaves a folder without ``COMPLETE``; a checkpoint whose ``COMPLETE`` is missing,
empty or damaged, or one of whose files is missing or has another size than saved, is
passed over for the previous complete one with a warning naming it; the next save of
that step replaces it. The trainer state is JSON and the tensors are safetensors; only
DeepSpeed's own files are pickles (see ``pretrain/engine.py``).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common.atomic import fsync_path, fsync_tree, write_atomic
from common.config import save_config
from common.errors import UserError

COMPLETE, LATEST = "COMPLETE", "latest"
STAGING, REPLACED = ".saving-", ".replaced-"  # prefixes of a save in progress and of the copy it replaces


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group of several)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def trainer_state(path: str | Path, rank: int = 0) -> dict:
    """The trainer state rank ``rank`` saved in checkpoint folder ``path``: step, counters,
    the sampler's state under ``stream``, the MLflow run id (ZeRO 0-2: rank 0's is every
    rank's position)."""
    return json.loads((Path(path) / _trainer_file(rank)).read_text())


def atoms_seen(state: dict) -> dict[str, int]:
    """Atoms seen per fidelity in a :func:`trainer_state` (the sampler's, over all ranks)."""
    return state["stream"].get("atoms_seen", {})


def _trainer_file(rank: int) -> str:
    return f"trainer-rank{rank:05d}.json"


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used to resume; the message names it and what to do."""


class Checkpointer:
    """Saves and finds checkpoints under ``folder`` for one rank of a ``world_size`` group."""

    def __init__(self, folder: str | Path, keep: int, rank: int, world_size: int):
        self.folder = Path(folder)
        self.keep, self.rank, self.world_size = keep, rank, world_size

    def save(self, engine, step: int, state: dict, tensors: dict[str, torch.Tensor], config,
             records: dict[str, dict] | None = None) -> Path:
        """Every rank calls this at the same step; returns the checkpoint folder.
        ``records``: ``{file name: JSON data}`` rank 0 writes beside the config (model.json).

        The checkpoint is written under a staging name and swapped in only once complete:
        a save of a step that already has a complete checkpoint (a preemption right after
        a periodic save, a run restarted before it) never deletes the good one first."""
        from safetensors.torch import save  # noqa: PLC0415

        tag = tag_of(step)
        path, staging = self.folder / tag, self.folder / f"{STAGING}{tag}"
        if self.rank == 0 and staging.exists():
            shutil.rmtree(staging)  # an interrupted save of this step
        barrier()
        engine.save(self.folder, staging.name)
        write_atomic(staging / _trainer_file(self.rank), json.dumps(state, indent=1))
        write_atomic(staging / f"tensors-rank{self.rank:05d}.safetensors",
                     save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
        fsync_tree(staging, include=lambda name: written_by(name, self.rank))
        barrier()
        if self.rank == 0:
            save_config(config, staging / "config.yaml")  # atomic, durable
            for name, data in (records or {}).items():
                write_atomic(staging / name, json.dumps(data, indent=1))
            files = {str(f.relative_to(staging)): f.stat().st_size for f in sorted(staging.rglob("*"))
                     if f.is_file() and f.name != COMPLETE}
            write_atomic(staging / COMPLETE, json.dumps({"world_size": self.world_size, "files": files},
                                                        indent=1) + "\n")
            _swap_in(staging, path)
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
        for p in [*self.folder.glob(f"{STAGING}step-*"), *self.folder.glob(f"{REPLACED}step-*")]:
            shutil.rmtree(p, ignore_errors=True)  # leftovers of saves a crash interrupted

    def complete_tags(self) -> list[str]:
        """Tags of complete, intact checkpoints (:func:`check_complete`), oldest first."""
        if not self.folder.is_dir():
            return []
        tags = []
        for p in sorted(self.folder.glob("step-*")):
            try:
                check_complete(p)
                tags.append(p.name)
            except CheckpointError:
                continue
        return tags

    def latest(self) -> str | None:
        """The newest complete, intact checkpoint's tag, or None when there is none. Newer
        folders that fail :func:`check_complete` are passed over with a warning naming them
        (rank 0 prints it) -- resuming goes on from the previous complete one."""
        if not self.folder.is_dir():
            return None
        for p in sorted(self.folder.glob("step-*"), reverse=True):
            try:
                check_complete(p)
                return p.name
            except CheckpointError as err:
                if self.rank == 0:
                    print(f"[checkpoint] warning: passing over {p}: {err}; using the previous "
                          "complete checkpoint", file=sys.stderr, flush=True)
        return None

    def load(self, engine, tag: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """Load ``tag`` into ``engine``; returns this rank's (trainer state, tensors)."""
        from safetensors.torch import load_file  # noqa: PLC0415

        path = self.folder / tag
        saved_world = check_complete(path)["world_size"]
        own = self.rank if self.rank < saved_world else 0  # ZeRO 0-2: every rank's copy is the same
        if saved_world != self.world_size:
            check_elastic(path, engine, saved_world, self.world_size)
        try:
            if saved_world != self.world_size:  # elastic: re-partitioned (pretrain/engine.py)
                engine.load_resharded(self.folder, tag, saved_world)
            else:
                engine.load(self.folder, tag)
            state = trainer_state(path, own)
            tensors = load_file(str(path / f"tensors-rank{own:05d}.safetensors"))
        except (RuntimeError, KeyError, OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{path}: cannot resume this run from it ({first[:300]}); it was saved by another "
                f"model, optimizer or code version: resume with the config it was saved with "
                f"({path / 'config.yaml'}), or start a new run (another out, or init_from for "
                "the weights)") from None
        return state, tensors


def _swap_in(staging: Path, path: Path) -> None:
    """Rename the complete ``staging`` folder to ``path``; an existing ``path`` is moved
    aside first and deleted only after the new one is in place."""
    old = path.with_name(f"{REPLACED}{path.name}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    staging.rename(path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def check_elastic(path: Path, engine, saved_world: int, world: int) -> None:
    """Raise unless ``path`` (saved by ``saved_world`` ranks) can resume on ``world`` ranks:
    ZeRO 0-2 can; ZeRO 3's EMA and parameters are per-rank partitions, which no
    re-partitioning here covers."""
    if engine.cfg.zero_stage == 3:
        raise CheckpointError(f"{path}: saved by {saved_world} ranks under ZeRO-3, this run has "
                              f"{world}; resume ZeRO-3 runs on {saved_world} ranks, or start a new "
                              "run with init_from (consolidated weights)")


def written_by(name: str, rank: int) -> bool:
    """Whether rank ``rank`` wrote the checkpoint file ``name``: ours name the rank
    (``trainer-rank00001.json``), DeepSpeed's too (``zero_pp_rank_1_mp_rank_00_...``);
    files naming no rank (the model states of ZeRO 0-2, the config) are rank 0's. Each
    rank fsyncs its own files (on a shared file system a flush from another client would
    not write them), in O(files / ranks) calls per rank."""
    if re.search(rf"rank_?0*{rank}(?!\d)", name):
        return True
    return rank == 0 and not re.search(r"rank_?\d", name)


def check_complete(path: Path) -> dict:
    """``{"world_size": W, "files": {name: bytes}}`` of checkpoint folder ``path``; raises
    :class:`CheckpointError` saying what is wrong when ``COMPLETE`` is missing, empty or
    damaged, or a file it lists is missing or has another size (a truncated copy)."""
    marker = Path(path) / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{marker} is missing (a save that did not finish)")
    text = marker.read_bytes().decode(errors="replace").strip()
    if not text:
        raise CheckpointError(f"{marker} is empty (a save that did not finish)")
    if text.isdigit():  # the format before file sizes were recorded: world size only
        return {"world_size": int(text), "files": {}}
    try:
        record = json.loads(text)
        record = {"world_size": int(record["world_size"]),
                  "files": {str(k): int(v) for k, v in dict(record["files"]).items()}}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{marker} is damaged (not the JSON record a save writes)") from None
    for name, size in record["files"].items():
        f = Path(path) / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f} has {f.stat().st_size} bytes, {size} when saved "
                                  "(truncated or overwritten)")
    return record


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
