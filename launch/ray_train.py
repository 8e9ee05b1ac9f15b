"""``mlip-pretrain launch ray``: the training ranks as Ray Train workers on a Ray cluster.

A ``TorchTrainer`` starts ``--workers`` workers (``--gpus-per-worker`` GPUs each) and joins
them in a torch process group (NCCL on GPUs, gloo on CPUs); each runs
:func:`launch.train.run_training` with ``--resume`` semantics, so DeepSpeed, the trainer and
its checkpoints are the same as under torchrun. With ``data.stream.backend=ray`` the
streaming stage's batch actors are started from inside the workers, on the same cluster
(CPU-only nodes can host them).

Checkpoints are the trainer's own, under the config's ``out``, which must be storage every
node sees (a shared file system); Ray's ``storage_path`` points there too. When a worker
dies (its process, or its node), Ray Train ends the group and starts it again, up to
``--max-failures`` times; the new workers resume from the newest complete checkpoint.
The steps after it are trained again, with exactly the batches of the uninterrupted run.
Preemption signals are handled by Ray (a restart), not by the trainer: Ray Train runs the
training loop outside the main thread, where no signal handler can be installed.
"""

from __future__ import annotations

import os
from pathlib import Path


def _worker(config: dict) -> None:
    """One training rank inside a Ray Train worker (the process group is Ray's)."""
    import ray.train  # noqa: PLC0415

    from launch.train import run_training  # noqa: PLC0415

    context = ray.train.get_context()
    os.environ.setdefault("LOCAL_RANK", str(context.get_local_rank()))
    os.environ["DS_ACCELERATOR"] = config["accelerator"]
    os.environ["RANK"] = str(context.get_world_rank())
    os.environ["WORLD_SIZE"] = str(context.get_world_size())
    metrics = run_training(config["config"], config["overrides"], resume=True, progress=False)
    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def run(config: str, overrides: list[str], workers: int, gpus_per_worker: float = 0,
        address: str | None = None, max_failures: int = 3) -> dict:
    """Train ``config`` on ``workers`` Ray Train workers; returns the last reported metrics."""
    import ray  # noqa: PLC0415
    from ray.train import FailureConfig, RunConfig, ScalingConfig  # noqa: PLC0415
    from ray.train.torch import TorchTrainer  # noqa: PLC0415

    from pretrain.config import load_train_config  # noqa: PLC0415

    out = Path(load_train_config(config, overrides).out).resolve()  # a bad key fails here
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 configure_logging=False, log_to_driver=True)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": str(Path(config).resolve()), "overrides": [*overrides, f"out={out}"],
                           "accelerator": "cuda" if use_gpu else "cpu"},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="mlip-pretrain", storage_path=str(out / "ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})


def launch_command(args) -> int:
    """``mlip-pretrain launch ray``: run and print the final losses."""
    import json  # noqa: PLC0415

    metrics = run(args.config, args.overrides, args.workers, args.gpus_per_worker, args.address,
                  args.max_failures)
    shown = {k: round(v, 5) for k, v in metrics.items() if k.startswith(("train/loss", "val/"))}
    print(f"[ray] done: {json.dumps(shown)}")
    return 0
