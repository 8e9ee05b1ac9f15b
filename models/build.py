"""Model configs (``configs/model/<family>-<size>.yaml``) and the one function that builds them.

A config names the family and its hyperparameters; the number of parameters and FLOPs
per atom are measured on the built model (``mlip-pretrain model info``), never typed in.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from common.config import ConfigError
from common.fidelities import FidelityTable
from models.esen import ESENBackbone
from models.layers import cueq
from models.layers.zbl import ZBLRepulsion
from models.mace import MACEBackbone
from models.potential import Potential
from models.properties import TargetConfig, check_targets


@dataclasses.dataclass
class ModelConfig:
    """An interatomic potential: backbone family, its size, heads and references."""

    family: Literal["esen", "mace"]
    """``esen``: SO(2) convolutions in edge frames; ``mace``: tensor-product product basis."""
    cutoff: float = 6.0
    """Neighbor-list cutoff in Angstrom (the loader's ``cutoff`` must match)."""
    channels: int = 64
    """Feature channels per degree."""
    hidden: int = 64
    """Hidden width (eSEN message/feed-forward; energy heads for both families)."""
    layers: int = 2
    """Message-passing layers."""
    lmax: int = 2
    """Maximum degree of the features (eSEN) or of the spherical harmonics / A basis (MACE)."""
    mmax: int = 1
    """eSEN: maximum order kept in the edge frame (0..lmax)."""
    hidden_lmax: int = 1
    """MACE: maximum degree of the node features passed between layers."""
    correlation: int = 3
    """MACE: order of the product basis (body order = correlation + 1)."""
    num_basis: int = 8
    """Bessel radial basis functions."""
    avg_neighbors: float = 30.0
    """Normalisation of summed messages (typical neighbours within the cutoff)."""
    direct_forces: bool = False
    """Add a direct force head (cheap pretraining; conservative forces stay available)."""
    direct_stress: bool = False
    """Add a direct stress head (with ``direct_forces``, pretraining without double backward)."""
    learn_references: bool = False
    """Train the elemental reference energies instead of freezing the manifest's."""
    zbl: bool = False
    """Add the ZBL screened nuclear repulsion inside the sum of the two atoms' radii (covalent,
    or a metal's half nearest-neighbour distance when longer): a short-range prior, atoms
    pushed together repel where training data has no examples (``models/layers/zbl.py``)."""
    zbl_radius_scale: float = 1.0
    """The prior's radius: this times the sum of the pair's radii."""
    uncertainty: Literal["none", "llpr", "ensemble"] = "none"
    """Per-prediction uncertainty (``models/uncertainty.py``): ``ensemble`` trains
    ``ensemble_size`` energy and force readouts per fidelity with a Gaussian NLL; ``llpr``
    is fitted after training (``release create`` fits it for any model left at ``none``)."""
    ensemble_size: int = 8
    """Members of the trained shallow ensemble."""
    kernels: Literal["auto", "torch", "cueq"] = "auto"
    """MACE contractions: ``torch`` (torch ops always), ``cueq`` (cuEquivariance, also its slow
    CPU fallback; needs the ``cuda`` extra) or ``auto`` (on CPU the fused C++ kernels of
    ``models/layers/slot_kernels.py``, built at first use where a C++ compiler exists; cueq on
    CUDA inputs where installed; torch ops otherwise). Same function and parameters every
    way: checkpoints load across settings."""
    fidelity_conditioning: Literal["input", "layers"] = "input"
    """How the backbone knows the fidelity: ``input`` (a learned embedding added to every
    atom's input features) or ``layers`` (that, and each layer's invariant channels scaled
    and shifted per fidelity: ``models/layers/embedding.py``)."""
    delta: dict[str, str] = dataclasses.field(default_factory=dict)
    """``{fidelity: base fidelity}``: that fidelity's energy head learns a correction to the
    base's prediction (delta learning, e.g. ``PBE: GFN2-xTB``); its head starts at 0."""
    targets: list[TargetConfig] = dataclasses.field(default_factory=list)
    """Extra targets learned beside the energy (partial charges, dipoles, magnetic moments,
    ...), by record extras name (``models/properties.py``); each with its kind, loss weight
    and fidelities. The training data must carry each one."""

    def validate(self) -> None:
        """Reject sizes that cannot build."""
        for key in ("channels", "hidden", "layers", "num_basis"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: got {getattr(self, key)}, expected >= 1")
        if not 0 <= self.mmax <= self.lmax:
            raise ConfigError(f"mmax: got {self.mmax}, expected 0..lmax ({self.lmax})")
        if self.family == "mace" and not 0 <= self.hidden_lmax <= self.lmax:
            raise ConfigError(f"hidden_lmax: got {self.hidden_lmax}, expected 0..lmax ({self.lmax})")
        if self.correlation < 1:
            raise ConfigError(f"correlation: got {self.correlation}, expected >= 1")
        if not self.cutoff > 0:
            raise ConfigError(f"cutoff: got {self.cutoff}, expected > 0")
        if self.kernels not in ("auto", "torch", "cueq"):
            raise ConfigError(f"kernels: got {self.kernels!r}, expected auto, torch or cueq")
        if self.kernels == "cueq" and not cueq.installed():
            raise ConfigError("kernels: cueq needs cuequivariance-torch (pip install -e '.[cuda]'), "
                              "or set kernels: auto")
        if not self.zbl_radius_scale > 0:
            raise ConfigError(f"zbl_radius_scale: got {self.zbl_radius_scale}, expected > 0")
        if self.uncertainty not in ("none", "llpr", "ensemble"):
            raise ConfigError(f"uncertainty: got {self.uncertainty!r}, expected none, llpr or ensemble")
        if self.uncertainty == "ensemble" and self.ensemble_size < 2:
            raise ConfigError(f"ensemble_size: got {self.ensemble_size}, expected >= 2")
        if self.uncertainty == "ensemble" and self.family == "mace" and self.hidden_lmax < 1:
            raise ConfigError("uncertainty: ensemble force members need l = 1 features: set hidden_lmax >= 1")
        if self.direct_forces and self.family == "mace" and self.hidden_lmax < 1:
            raise ConfigError("direct_forces needs l = 1 features: set hidden_lmax >= 1")
        if self.fidelity_conditioning not in ("input", "layers"):
            raise ConfigError(f"fidelity_conditioning: got {self.fidelity_conditioning!r}, expected input or layers")
        check_targets(self.targets)


def build_model(cfg: ModelConfig, fidelities: FidelityTable | list[str],
                element_references: dict | None = None) -> Potential:
    """The Potential ``cfg`` describes, with one head per fidelity of ``fidelities`` (a
    fidelity table, or names with ``element_references`` ``{fidelity: {element: eV}}``,
    e.g. from a manifest via :func:`references_from_manifest`)."""
    if cfg.family == "esen":
        backbone = ESENBackbone(len(fidelities), cfg.cutoff, cfg.channels, cfg.hidden, cfg.lmax,
                                cfg.mmax, cfg.layers, cfg.num_basis, cfg.avg_neighbors,
                                cfg.fidelity_conditioning)
    else:
        backbone = MACEBackbone(len(fidelities), cfg.cutoff, cfg.channels, cfg.lmax,
                                cfg.hidden_lmax, cfg.correlation, cfg.layers, cfg.num_basis,
                                cfg.hidden, cfg.avg_neighbors, cfg.kernels, cfg.fidelity_conditioning)
    repulsion = ZBLRepulsion(cfg.zbl_radius_scale) if cfg.zbl else None
    return Potential(backbone, fidelities, cfg.channels, cfg.hidden, element_references,
                     cfg.learn_references, cfg.direct_forces, cfg.direct_stress, repulsion,
                     cfg.uncertainty, cfg.ensemble_size, cfg.targets, cfg.delta)


def references_from_manifest(manifest: dict) -> dict:
    """``{fidelity: {element: eV}}`` from a shard folder's manifest."""
    return {f: r["energies"] for f, r in manifest.get("element_references", {}).items()}
