"""Every model family runs the physics suite (float64), at a tiny size and its named sizes."""

from __future__ import annotations

import pytest
import torch

from models.build import ModelConfig, build_model
from tests.models import physics

TINY = {
    # 3 layers: with 2, the m > 0 paths of an SO(2) conv never reach the energy (block 1
    # sees only l = 0 inputs, the last block's l > 0 outputs are not read), so a broken
    # m > 0 path would pass every check
    "esen": {"family": "esen", "cutoff": 4.0, "channels": 8, "hidden": 8, "lmax": 2, "mmax": 2,
             "layers": 3, "avg_neighbors": 10.0},
    "mace": {"family": "mace", "cutoff": 4.0, "channels": 8, "hidden": 8, "lmax": 2,
             "hidden_lmax": 1, "correlation": 3, "layers": 2, "avg_neighbors": 10.0},
}


def tiny_model(family: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY[family], **extra})
    refs = {"PBE": {"Cu": -3.5, "Ni": -4.1, "C": -7.0}, "r2SCAN": {"Cu": -3.9}}
    return build_model(cfg, ["PBE", "r2SCAN"], refs).double().eval()


@pytest.mark.parametrize("check", physics.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", ["esen", "mace"])
def test_physics(family, check):
    model = tiny_model(family)
    check(model, model.backbone.radial.basis.cutoff)
