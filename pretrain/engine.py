"""The DeepSpeed engine: the one module of the project that imports deepspeed.

How DeepSpeed turns our loss into an update (DeepSpeed 0.19, written down once, here):

* ``engine.backward(loss)`` divides ``loss`` by ``gradient_accumulation_steps`` (gas)
  before autograd, so gradients summed over gas micro-batches form their mean.
* At the accumulation boundary the gradients are averaged over the data-parallel ranks
  (all-reduce, or reduce-scatter under ZeRO 2/3, then divided by world_size W).
* ``gradient_clipping`` clips the global norm of that averaged gradient, then the client
  optimizer steps (ZeRO 1/2/3 run it on each rank's fp32 partition).

Our loss (``pretrain.loss``) is already a *partial sum* normalised by the step's global
atom count: the gradient we want is the **sum** over micro-batches and ranks of each
micro-batch's gradient. :meth:`Engine.backward` therefore multiplies the loss by
``gas * W`` so the two divisions above cancel exactly. A step's gradient is then the same
whether its atoms ran in 1 process or 2, in 1 micro-batch or 4.

Forces: a loss on autograd forces needs a double backward through the model, so forces
are computed inside the wrapped module's ``forward`` (:class:`TrainStep`), never on the
engine's output. ZeRO-3 partitions parameters and releases them between the force pass
and the loss backward; a loss on autograd forces failed there in every variant tried
(../shared/DEPENDENCIES.md), so config validation rejects it and points to the direct-
force recipe: pretrain with direct force heads under ZeRO-3, then fine-tune
conservatively under ZeRO 1/2 from that checkpoint (``train.init_from``).

Precision: ``bf16`` is autocast inside the model (``models/layers/precision.py``), not
DeepSpeed's ``bf16`` mode: DeepSpeed sees fp32 weights in every configuration, so the
weights it saves, the optimizer's and EMA's copies are fp32, geometry and elemental
references are never rounded to bf16 (whatever DeepSpeed version casts what), and
gradients are reduced in fp32.

Non-finite gradients: a step whose global gradient norm is not finite is skipped on every
rank (the norm is a global figure, so every rank decides the same), whatever the loss
was: :class:`SkippableAdamW` refuses it and :attr:`Engine.stepped` tells the trainer,
which then leaves the EMA and the learning-rate schedule alone.

Checkpoints written by DeepSpeed are torch pickles: load them only from your own runs
(releases, the files shared with others, are safetensors: ``pretrain/release/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from common.config import ConfigError


@dataclasses.dataclass
class EngineConfig:
    """Parallelism and numerics of the training step."""

    #: ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)
    zero_stage: int = 1
    #: compute precision: bf16 runs the backbone's matmuls and contractions in bf16
    #: (autocast); weights, optimizer state, EMA, geometry, heads and references stay
    #: fp32/fp64 (models/layers/precision.py)
    precision: Literal["fp32", "bf16"] = "fp32"
    #: micro-batches per optimizer step on each rank
    grad_accum: int = 1
    #: clip the global gradient norm to this (0: off)
    clip: float = 10.0
    #: recompute each backbone block in the backward pass instead of storing its activations
    activation_checkpointing: bool = False
    #: forces (and stress) from autograd ("conservative") or from the model's direct heads
    forces: Literal["conservative", "direct"] = "conservative"

    def validate(self) -> None:
        """Ranges here; combinations with the loss and model in ``TrainConfig.validate``."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: got {self.zero_stage}, expected 0, 1, 2 or 3")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum: got {self.grad_accum}, expected >= 1")
        if self.clip < 0:
            raise ConfigError(f"clip: got {self.clip}, expected >= 0 (0 turns clipping off)")


def check_combination(cfg: EngineConfig, needs_derivatives: bool, direct_forces: bool,
                      direct_stress: bool, needs_stress: bool) -> None:
    """Reject what cannot train, saying why and what to use instead."""
    if cfg.forces == "conservative" and cfg.zero_stage == 3 and needs_derivatives:
        raise ConfigError(
            "engine.zero_stage=3 with engine.forces=conservative: a loss on autograd forces or "
            "stress needs a double backward, which DeepSpeed ZeRO-3 cannot do (its partitioned "
            "parameters are released after the force pass). Pretrain with direct heads under "
            "ZeRO-3 (engine.forces=direct, model.direct_forces=true), then fine-tune "
            "conservatively with engine.zero_stage=1 or 2 and init_from=<that run's checkpoints>")
    if cfg.forces == "direct" and not direct_forces and needs_derivatives:
        raise ConfigError("engine.forces=direct needs a direct force head: set model.direct_forces=true")
    if cfg.forces == "direct" and needs_stress and not direct_stress:
        raise ConfigError("engine.forces=direct with a stress loss needs model.direct_stress=true")


LOG_FILE = "deepspeed.log"  # in the run folder: DeepSpeed's own lines, never the terminal
# DeepSpeed guesses its accelerator (and says so on the terminal) unless told
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def deepspeed_output(log: Path | None):
    """DeepSpeed's own output inside the block (its logger, e.g. the "untested optimizer"
    warning; the op build and checkpoint consolidation lines it prints; its progress bars;
    the compiler errors of the op checks it runs in subprocesses) goes to ``log``
    (appended; created with its folder), not to the user's terminal: Python's streams and
    file descriptors 1 and 2 are both redirected, so nothing of ours may print inside.
    ``log`` None or not writable: DeepSpeed's output is dropped."""
    import sys  # noqa: PLC0415

    from deepspeed.utils import logger  # noqa: PLC0415

    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        sink = open(log, "a")  # noqa: SIM115 - closed below
    except (AttributeError, OSError):
        sink = open(os.devnull, "w")  # noqa: SIM115 - closed below
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s] [%(levelname)s] [rank {os.environ.get('RANK', 0)}] "
                                           "%(message)s"))
    saved, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fds = [os.dup(1), os.dup(2)]
    os.dup2(sink.fileno(), 1)
    os.dup2(sink.fileno(), 2)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        sink.flush()
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        logger.handlers, logger.propagate = saved, propagate
        sink.close()


def init_distributed(log: Path | None = None) -> tuple[int, int, int]:
    """Join (or create) the process group: ``(rank, world_size, local_rank)``.

    Under torchrun or the ``deepspeed`` launcher the environment names the group; a plain
    process becomes a group of one on a free local port. Backend: NCCL on GPUs, gloo on CPU.
    DeepSpeed's lines go to ``log`` (:func:`deepspeed_output`).
    """
    import deepspeed  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with deepspeed_output(log):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def device_for(local_rank: int) -> torch.device:
    """This rank's device: its GPU when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next ``step`` can be skipped (a non-finite loss, or a non-finite global
    gradient norm): weights and moments stay untouched, whatever DeepSpeed does around
    the call. ``norm``: returns the step's global gradient norm, which DeepSpeed computes
    before it calls ``step`` (None: unknown, not checked)."""

    skip = False
    norm = None

    def step(self, closure=None):  # noqa: D102 - torch's
        if self.skip or not _finite(self.norm() if self.norm is not None else None):
            self.skipped = True
            return None
        self.skipped = False
        return super().step(closure)


def _finite(norm) -> bool:
    """Whether a gradient norm (float, tensor or None: unknown) is finite (a host sync)."""
    return norm is None or math.isfinite(float(norm))


class TrainStep(nn.Module):
    """What DeepSpeed wraps: a Potential whose forward also returns forces and stress, so
    their double backward happens inside the engine's module."""

    def __init__(self, potential: nn.Module, forces: bool, stress: bool, direct: bool):
        super().__init__()
        self.potential = potential
        self.forces, self.stress, self.direct = forces, stress, direct

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.potential(batch, forces=self.forces, stress=self.stress,
                              create_graph=self.training, direct=self.direct)


def _checkpoint_blocks(potential: nn.Module) -> int:
    """Recompute each backbone block in backward (non-reentrant checkpointing supports the
    double backward of a force loss). Returns how many blocks were wrapped."""
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    backbone = potential.backbone
    blocks = getattr(backbone, "blocks", None) or getattr(backbone, "layers", None)
    if blocks is None:
        raise ConfigError(f"engine.activation_checkpointing: {type(backbone).__name__} has no "
                          "'blocks' or 'layers' to checkpoint")
    for block in blocks:
        inner = block.forward
        block.forward = functools.partial(checkpoint, inner, use_reentrant=False)
    return len(blocks)


class Engine:
    """A DeepSpeed engine around ``TrainStep(potential)`` with a client AdamW.

    ``optimizer``: keyword arguments of AdamW (lr, betas, eps, weight_decay); the trainer
    sets the learning rate of every step with :meth:`set_lr` (no DeepSpeed scheduler, so
    a skipped step does not advance the schedule).
    """

    def __init__(self, cfg: EngineConfig, potential: nn.Module, optimizer: dict, forces: bool,
                 stress: bool, world_size: int, device: torch.device, log: Path | None = None):
        import deepspeed  # noqa: PLC0415
        from deepspeed.utils import logger  # noqa: PLC0415

        self.cfg, self.world_size, self.log = cfg, world_size, log
        self.potential = potential.to(device)
        if cfg.activation_checkpointing:
            _checkpoint_blocks(self.potential)
        module = TrainStep(self.potential, forces, stress, cfg.forces == "direct")
        self.optimizer = SkippableAdamW(module.parameters(), **optimizer)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,  # one packed batch (an atom budget) per micro-step
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": False},  # bf16 is autocast in the model (module docstring)
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        with deepspeed_output(log):
            self.engine, *_ = deepspeed.initialize(model=module, optimizer=self.optimizer,
                                                   config=ds_config, dist_init_required=False)
        if log is not None:  # what DeepSpeed logs later (saves, overflows) goes there too
            handler = logging.FileHandler(log)
            handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] %(message)s"))
            logger.handlers, logger.propagate = [handler], False
        self.device = device
        self._norm0 = None
        self.potential.precision = cfg.precision
        self.optimizer.norm = self._norm_before_step
        self.stepped = False

    # --- the step ------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.engine(batch)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss normalised by the step's global count (see the module docstring)."""
        self.engine.backward(loss * (self.cfg.grad_accum * self.world_size))

    def step(self, skip: bool = False) -> None:
        """After every micro-batch's backward; the optimizer steps at the accumulation
        boundary, unless ``skip`` or the global gradient norm is not finite (then the
        weights and optimizer state do not change). :attr:`stepped` says which it was."""
        self.optimizer.skip = skip
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self.cfg.zero_stage == 0 and boundary:
            # DeepSpeed records no norm without ZeRO; the gradients are averaged by now
            grads = [p.grad.detach().float().norm() for p in self.potential.parameters() if p.grad is not None]
            self._norm0 = torch.linalg.vector_norm(torch.stack(grads)) if grads else None
        self.optimizer.skipped = True  # DeepSpeed itself skips the call on some overflows
        try:
            self.engine.step()
        finally:
            self.optimizer.skip = False
        if boundary:
            self.stepped = not self.optimizer.skipped and _finite(self.grad_norm())

    def _norm_before_step(self):
        """The global gradient norm of the step being taken (DeepSpeed's ZeRO optimizers
        compute it before they call the client optimizer; stage 0: ours)."""
        if self.cfg.zero_stage == 0:
            return self._norm0
        return getattr(self.engine.optimizer, "_global_grad_norm", None)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last optimizer step (before clipping)."""
        norm = self._norm0 if self.cfg.zero_stage == 0 else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    # --- state -----------------------------------------------------------------------------
    def ema_tensors(self) -> list[torch.Tensor]:
        """The fp32 parameter tensors this rank holds (its partitions under ZeRO-3), for EMA."""
        return [getattr(p, "ds_tensor", p).data for p in self.potential.parameters()]

    @contextlib.contextmanager
    def using_weights(self, tensors: list[torch.Tensor]):
        """Inside the block the model computes with ``tensors`` (one per parameter, as
        :meth:`ema_tensors` gives them: this rank's partitions under ZeRO-3); the live
        weights are restored exactly after.

        Under ZeRO-3 the partitions alone are not enough: a parameter DeepSpeed keeps
        gathered (the persistent small ones, or any still materialised) is read from its
        full copy, which a write to the partition does not reach, and a forward inside the
        block leaves the persistent ones gathered with the swapped values. So on entry and
        on exit every gathered parameter is re-gathered from the partitions (one
        all-gather each, every rank in the same order). Without this the evaluation mixed
        EMA and live weights, and the next training step ran on the EMA copies."""
        live = self.ema_tensors()
        saved = [t.detach().clone() for t in live]
        with torch.no_grad():
            for s, t in zip(tensors, live):
                t.copy_(s)
            self._regather()
        try:
            yield
        finally:
            with torch.no_grad():
                for old, t in zip(saved, live):
                    t.copy_(old)
                self._regather()

    def _regather(self) -> None:
        """ZeRO-3: the full copy of every gathered parameter from every rank's partition."""
        if self.cfg.zero_stage != 3:
            return
        import torch.distributed as dist  # noqa: PLC0415

        for p in self.potential.parameters():
            if p.data.numel() == 0 or p.data.numel() != p.ds_numel:
                continue  # released: the next forward gathers it from the partitions
            part = p.ds_tensor.data.contiguous()
            parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, part)
            p.data.copy_(torch.cat(parts)[:p.ds_numel].view(p.ds_shape))

    def save(self, folder: Path, tag: str) -> None:
        """Every rank writes its part of model and optimizer state to ``folder/tag``."""
        with deepspeed_output(self.log):
            self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)

    def load(self, folder: Path, tag: str) -> None:
        with deepspeed_output(self.log):
            path, _ = self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{folder}/{tag}: DeepSpeed found no checkpoint to load")

    def load_resharded(self, folder: Path, tag: str, saved_world: int) -> None:
        """Load ``folder/tag`` saved by ``saved_world`` ranks into this group of another size.

        ZeRO 0: model and optimizer state are whole in rank 0's file; DeepSpeed loads them
        at any size. ZeRO 1/2: rank 0 converts the checkpoint to DeepSpeed's universal
        format (``ds_to_universal``: fp32 weights and Adam moments per parameter, in
        ``folder/.universal-<tag>``, removed after loading), which every rank then loads
        re-partitioned for this world size. ZeRO 3 is refused by the checkpointer.
        """
        import shutil  # noqa: PLC0415

        if self.cfg.zero_stage == 0:
            return self.load(folder, tag)
        work = folder / f".universal-{tag}"
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(work, ignore_errors=True)
            _to_universal(folder / tag, work / tag)
        torch.distributed.barrier()
        config = self.engine._config  # DeepSpeed reads the flag at load time
        config.load_universal_checkpoint = True
        try:
            self.load(work, tag)
        finally:
            config.load_universal_checkpoint = False
            torch.distributed.barrier()
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(work, ignore_errors=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole Potential's weights on every rank (gathered under ZeRO-3), fp32, CPU."""
        import deepspeed  # noqa: PLC0415

        params = list(self.potential.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
            return {k: v.detach().float().cpu().clone() for k, v in self.potential.state_dict().items()}


def _to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of checkpoint folder ``source`` into ``target``, in
    this process (one worker: no process pool forked from a rank of a process group)."""
    import argparse  # noqa: PLC0415
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    from deepspeed.checkpoint import ds_to_universal  # noqa: PLC0415

    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    quiet = io.StringIO()  # its progress bars and lines, per parameter
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ds_to_universal.main(args)


def consolidated_weights(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 Potential weights from a (possibly ZeRO-sharded) checkpoint ``folder/tag`` of
    one of your own runs (DeepSpeed's files are pickles)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

    path = Path(folder) / tag
    try:
        if any(path.glob("*zero_pp_rank_*optim_states.pt")):
            with deepspeed_output(Path(folder).resolve().parent / LOG_FILE):  # the run's log
                state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        else:  # ZeRO stage 0: rank 0 wrote the whole module
            state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=False)["module"]
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    except Exception as err:  # noqa: BLE001 - whatever a foreign or damaged file raises
        raise ConfigError(f"{path}: not a DeepSpeed checkpoint of this project that can be read "
                          f"({type(err).__name__}: {str(err)[:200]}); point init_from at a run's "
                          "checkpoints folder") from None
    prefix = "potential."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
