"""``mlip-pretrain train``: the same entry point for every launch form.

* one process: ``mlip-pretrain train CONFIG`` (a process group of one, gloo or NCCL);
* several processes on one node, same config::

      torchrun --nproc-per-node 4 -m launch.cli train CONFIG
      deepspeed --num_gpus 4 --module launch.cli train CONFIG   # CPU: --num_accelerators N

  Both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which
  :func:`pretrain.engine.init_distributed` reads; nothing here knows which launcher ran it.

The config is loaded and validated before the process group is joined, so a bad key fails
in a second on every rank with the same message.
"""

from __future__ import annotations

import os
from pathlib import Path


def run_training(config: str | None, overrides: list[str], resume: bool = False,
                 progress: bool = True, stop_at: int | None = None,
                 time_limit: float | None = None) -> dict:
    """Train ``config`` (+ overrides) on this process's rank; returns the last metrics.
    ``stop_at``: pause at that step with a checkpoint (``resume`` continues); SIGTERM,
    SIGUSR1 or ``time_limit`` seconds raise :class:`pretrain.preemption.Preempted` after
    a checkpoint."""
    from pretrain.config import load_train_config

    cfg = load_train_config(config, overrides)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    import torch.distributed as dist

    from pretrain.engine import LOG_FILE, init_distributed
    from pretrain.trainer import Trainer

    owned = not dist.is_initialized()  # a caller's group (tests, notebooks) stays theirs
    rank, world, local_rank = init_distributed(log=Path(cfg.out) / LOG_FILE)
    try:
        trainer = Trainer(cfg, rank, world, local_rank, resume=resume, progress=progress,
                          time_limit=time_limit, init=initial_model(cfg, resume))
        metrics = trainer.run(stop_at)
        dist.barrier()  # every rank done before the group goes (spawned ranks aborted without it)
        return metrics
    finally:
        if owned:
            dist.destroy_process_group()


def initial_model(cfg, resume: bool):
    """The trained model ``init_from`` names (a run, a checkpoint or a release), or None: no
    ``init_from``, or a resume that continues from the run's own checkpoint."""
    if not cfg.init_from:
        return None
    from pretrain.checkpoint import Checkpointer
    from pretrain.release.loader import load_model

    if resume and Checkpointer(Path(cfg.out) / "checkpoints", 1, 0, 1).latest() is not None:
        return None
    return load_model(cfg.init_from, ema=True)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
