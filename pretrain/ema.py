"""Exponential moving average of the weights, evaluated and released instead of the raw ones.

Each rank averages the fp32 tensors it holds (whole parameters under ZeRO 0-2, its
partitions under ZeRO-3: ``Engine.ema_tensors``); the weights are fp32 in every precision
(bf16 is autocast), so the average follows the optimizer's fp32 weights, not a rounded
copy (learned elemental references are a float32 shift of float64 values,
``models/potential.py``, so their EMA keeps float64 totals). The
trainer evaluates with ``Engine.using_weights(ema.shadow)``: under ZeRO-3 the forward then
reads the EMA of every parameter, persistent ones included, and training resumes on the
live weights (tests/pretrain/test_ema.py checks both on the weights each module sees). The decay warms up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early weights fade quickly.
"""

from __future__ import annotations

from typing import Callable

import torch


class EMA:
    """Shadow copies of ``tensors``: the live parameter data, or a function returning it
    (looked up at every use: DeepSpeed may give a parameter new storage after a step)."""

    def __init__(self, tensors: list[torch.Tensor] | Callable[[], list[torch.Tensor]], decay: float):
        self._tensors = tensors if callable(tensors) else (lambda: tensors)
        self.decay = decay
        self.updates = 0
        self.shadow = [t.detach().float().clone() for t in self.tensors]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self._tensors()

    @torch.no_grad()
    def update(self) -> None:
        """Blend the current weights in (after an optimizer step that was not skipped)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, t in zip(self.shadow, self.tensors):
            s.lerp_(t.float(), 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{k}": s for k, s in enumerate(self.shadow)}
        state["ema.updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Raises ValueError naming what differs when ``state`` is another model's EMA."""
        if "ema.updates" not in state:
            raise ValueError("the checkpoint has no EMA state (saved with ema_decay: 0); resume "
                             "with ema_decay: 0, or start a new run with init_from")
        if len([k for k in state if k.startswith("ema.") and k != "ema.updates"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model: it has a different number of "
                             "tensors (another model config, or another ZeRO stage)")
        for k, s in enumerate(self.shadow):
            src = state[f"ema.{k}"]
            if src.shape != s.shape:
                raise ValueError(f"EMA tensor {k}: shape {tuple(src.shape)} in the checkpoint, "
                                 f"{tuple(s.shape)} in the model; resume with the same config")
            s.copy_(src)
        self.updates = int(state["ema.updates"])
