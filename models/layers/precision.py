"""Mixed precision of the models: bf16 where the FLOPs are, fp32 (or fp64) everywhere else.

``Potential.precision = "bf16"`` runs the backbone under ``torch.autocast``: matmuls,
batched matmuls and linear layers (channel mixing, radial MLPs, the tensor-product
contractions) take bf16 inputs, with fp32 weights cast on the fly, so the weights, their
gradients and the optimizer state stay fp32 and an EMA of them is an EMA of fp32 weights.
Everything that carries geometry runs with autocast switched off (:func:`full_precision`):
edge lengths, the radial basis and its envelope (smooth across the cutoff only in fp32:
bf16 resolves 4 A in steps of 0.03 A), spherical harmonics, Wigner matrices and the
rotations into edge frames, Clebsch-Gordan couplings, norms; the energy heads and the
elemental references (float64) sit outside the backbone and never see bf16.

Why not bf16 weights (DeepSpeed's ``bf16``): a bf16 copy of each weight rounds every
parameter that touches geometry too, and measured on a trained MACE-style model it
doubled the force error (BENCHMARKS.md, "bf16"). Autocast costs an fp32 weight copy per
bf16 one, negligible next to the activations of an MLIP.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def full_precision(like: torch.Tensor):
    """Context in which autocast is off on ``like``'s device: ops run in their inputs' dtype."""
    return torch.autocast(like.device.type, enabled=False)


def compute_precision(device: torch.device, precision: str):
    """Context for a backbone forward at ``precision`` (``fp32``: no change)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}, expected one of {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
