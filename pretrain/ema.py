"""Exponential moving average of the weights, evaluated and released instead of the raw ones.

Each rank averages the tensors it holds (whole parameters under ZeRO 0-2, its partitions
under ZeRO-3), in fp32 whatever the training precision. The decay warms up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early weights fade quickly.
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    """Shadow copies of ``tensors`` (the live parameter data, updated in place by training)."""

    def __init__(self, tensors: list[torch.Tensor], decay: float):
        self.tensors = tensors
        self.decay = decay
        self.updates = 0
        self.shadow = [t.detach().float().clone() for t in tensors]

    @torch.no_grad()
    def update(self) -> None:
        """Blend the current weights in (after an optimizer step that was not skipped)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, t in zip(self.shadow, self.tensors):
            s.lerp_(t.float(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """Inside the block the live tensors hold the EMA weights; restored exactly after."""
        saved = [t.detach().clone() for t in self.tensors]
        with torch.no_grad():
            for s, t in zip(self.shadow, self.tensors):
                t.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for old, t in zip(saved, self.tensors):
                    t.copy_(old)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{k}": s for k, s in enumerate(self.shadow)}
        state["ema.updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
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
