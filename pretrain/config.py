"""The training config: one YAML file (``configs/train/*.yaml``) plus dotted overrides.

``model`` is a mapping of :class:`~models.build.ModelConfig` fields, or the path of a
named size (``model: configs/model/mace-s.yaml``, relative to the config file, then to
the working directory) whose keys dotted overrides can still change (``model.layers=3``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.config import ConfigError, load_config
from data_pipeline.stream import LoaderConfig
from models.build import ModelConfig
from pretrain.engine import EngineConfig, check_combination
from pretrain.loss import LossConfig
from pretrain.tracking import TrackingConfig


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr: got {self.lr}, expected > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: got {self.betas}, expected two numbers in [0, 1)")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("warmup_steps must be >= 0 and min_lr_ratio within [0, 1]")


@dataclasses.dataclass
class EvalConfig:
    """Periodic evaluation on held-out shards, per fidelity."""

    #: shard folder of the held-out data (null: no evaluation)
    folder: str | None = None
    #: evaluate every this many optimizer steps (0: only at the end)
    every: int = 0
    #: atoms per evaluation batch
    max_atoms: int = 2048
    #: evaluate the EMA weights (when EMA is on)
    ema: bool = True
    #: held-out data of the fidelities a run replays (``data.replay``): evaluated before the
    #: first step and after the last, so the release card shows what the old heads forgot
    replay_folder: str | None = None


@dataclasses.dataclass
class CheckpointConfig:
    """Where and how often to save."""

    #: save every this many optimizer steps (0: only at the end)
    every: int = 100
    #: complete checkpoints kept on disk
    keep: int = 3

    def validate(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ConfigError("every must be >= 0 and keep >= 1")


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs (``mlip-pretrain train CONFIG``)."""

    #: shard folder and batching of the training data (``data.folder`` is required)
    data: LoaderConfig
    #: the model (``model.family`` is required: mace or esen)
    model: ModelConfig
    #: run folder: checkpoints, metrics log, MLflow store by default
    out: str = "runs/train"
    #: optimizer steps to run
    steps: int = 1000
    #: seed of the weight initialisation (the data order has ``data.sampler.seed``)
    seed: int = 0
    #: EMA decay of the weights (0: no EMA)
    ema_decay: float = 0.999
    #: log train metrics every this many steps
    log_every: int = 10
    #: stop after this many non-finite losses in a row (each skips its step)
    max_nonfinite: int = 5
    #: start from the weights of another run's newest checkpoint (fresh optimizer, step 0)
    init_from: str | None = None
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def validate(self) -> None:
        """Combinations of sections that cannot train, each with what to do instead."""
        if self.steps < 1 or self.log_every < 1 or self.max_nonfinite < 1:
            raise ConfigError("steps, log_every and max_nonfinite must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: got {self.ema_decay}, expected within [0, 1)")
        if self.data.cutoff != self.model.cutoff:
            raise ConfigError(f"data.cutoff ({self.data.cutoff}) differs from model.cutoff "
                              f"({self.model.cutoff}): the graphs must use the model's cutoff")
        if self.eval.replay_folder and not self.init_from:
            raise ConfigError("eval.replay_folder measures what a run started from a trained model forgets; "
                              "set init_from (a run, checkpoint or release) or drop eval.replay_folder")
        needs = self.loss.forces > 0 or self.loss.stress > 0
        check_combination(self.engine, needs, self.model.direct_forces, self.model.direct_stress,
                          self.loss.stress > 0)


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a training config (``model: <file>`` read relative to it, then overrides):
    :func:`common.config.load_config` of :class:`TrainConfig`."""
    return load_config(TrainConfig, path, overrides)
