"""A short-range repulsion prior: the universal screened nuclear repulsion (ZBL) per pair.

Training data has no examples of atoms closer than a bond; a learned energy there is an
extrapolation, and it can fall as atoms are pushed together (a hot MD run then fuses
them). The ZBL potential (Ziegler, Biersack and Littmark, "The Stopping and Range of Ions
in Solids", 1985) is the Coulomb repulsion of two nuclei screened by a universal function
of their atomic numbers only:

    E(r) = k Z_i Z_j / r * phi(r / a),  a = 0.46850 A / (Z_i^0.23 + Z_j^0.23)
    phi(x) = 0.18175 e^(-3.19980 x) + 0.50986 e^(-0.94229 x)
           + 0.28022 e^(-0.40290 x) + 0.02817 e^(-0.20162 x)

with ``k = e^2 / (4 pi eps0) = 14.399645 eV A``. It is added to the learned energy inside
a per-pair radius, the sum of the two atoms' radii times ``radius_scale``, switched off by
the polynomial envelope of the radial features (1 at 0 and flat there,
zero with its first two derivatives at the radius), so energy, forces and stress stay
smooth and conservative. It has no parameters: a model's weights load with or without it.

An atom's radius (:func:`pair_radii`) is its covalent radius (ASE's table), or for a metal
half the nearest-neighbour distance of its reference crystal when that is longer (Al:
1.43 A, not 1.21): metallic bonds are longer than covalent ones, and with the covalent
radius alone the prior would be off where a compressed metal needs it (fcc Al at 0.45 V0
had a spurious minimum under compression).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.embedding import MAX_Z
from models.layers.radial import polynomial_envelope

COULOMB = 14.399645  # e^2 / (4 pi eps0) in eV * A
SCREENING = 0.46850  # A: 0.8854 x the Bohr radius, the universal screening length's numerator
COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)


def zbl_energy(z1: torch.Tensor, z2: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Unswitched ZBL pair energy (eV) of atomic numbers ``z1``, ``z2`` at distance ``r`` (A)."""
    return _zbl(z1, z2, r)[0]


def _zbl(z1: torch.Tensor, z2: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, dE/dr)`` of the unswitched ZBL potential."""
    z1, z2 = z1.to(r.dtype), z2.to(r.dtype)
    inv_a = (z1**0.23 + z2**0.23) / SCREENING
    x = r * inv_a
    terms = [(c * torch.exp(-d * x), d) for c, d in zip(COEFFICIENTS, EXPONENTS)]
    phi = sum(t for t, _ in terms)
    dphi_dr = -inv_a * sum(t * d for t, d in terms)
    coulomb = COULOMB * z1 * z2 / r
    return coulomb * phi, coulomb * (dphi_dr - phi / r)


NOBLE = (2, 10, 18, 36, 54, 86)


def pair_radii() -> torch.Tensor:
    """float64 ``[MAX_Z + 1]`` radius of each element (module docstring)."""
    import math  # noqa: PLC0415

    from ase.data import covalent_radii, reference_states  # noqa: PLC0415

    radii = torch.as_tensor(covalent_radii[:MAX_Z + 1], dtype=torch.float64).clone()
    for z in range(1, MAX_Z + 1):
        state = (reference_states[z] if z < len(reference_states) else None) or {}
        symmetry, a = state.get("symmetry"), state.get("a")
        if z in NOBLE or a is None:
            continue
        nearest = {"fcc": a / math.sqrt(2), "bcc": a * math.sqrt(3) / 2}.get(symmetry)
        if symmetry == "hcp" and 1.5 <= state.get("c/a", 0.0) <= 1.75:  # close-packed, not chains
            nearest = a
        if nearest is not None:
            radii[z] = max(float(radii[z]), nearest / 2)
    return radii


class ZBLRepulsion(nn.Module):
    """``numbers [N], vectors [E, 3], edge_index [2, E] -> [N]`` ZBL energy per atom (half of
    each of its pairs'), float64: a repulsion of 1e3 eV at 0.3 A would keep only 1e-4 eV in
    float32, and per-element float32 math differs in its last bit with the batch's layout.
    Only the edges inside a pair radius are computed (a few percent of a cutoff's edges)."""

    def __init__(self, radius_scale: float = 1.0, p: int = 6):
        super().__init__()
        self.radius_scale, self.p = float(radius_scale), p
        self.register_buffer("radii", pair_radii() * radius_scale, persistent=False)  # no parameters

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.float()``, ...: the radii move with the model but stay float64."""
        radii = self.radii
        out = super()._apply(fn, recurse)
        self.radii = radii.to(self.radii.device)
        return out

    def close_edges(self, numbers: torch.Tensor, vectors: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Indices of the edges inside their pair radius (the mask needs no gradient)."""
        r = torch.linalg.vector_norm(vectors.detach(), dim=-1)
        r_max = self.radii[numbers[edge_index[0]]] + self.radii[numbers[edge_index[1]]]
        return torch.nonzero(r < r_max.to(r.dtype)).squeeze(1)

    def pair_terms(self, numbers: torch.Tensor, vectors: torch.Tensor, edge_index: torch.Tensor):
        """``(r, E, dE/dr)`` per directed edge, float64, E and dE/dr halved (both directions)."""
        zi, zj = numbers[edge_index[0]], numbers[edge_index[1]]
        r = torch.linalg.vector_norm(vectors.double(), dim=-1)
        r_max = self.radii[zi] + self.radii[zj]
        inside = r < r_max
        r_safe = torch.where(inside, r, r_max)  # no 1/r beyond the radius (and its gradient)
        e, de = _zbl(zi, zj, r_safe)
        u = r_safe / r_max
        env = polynomial_envelope(u, self.p)
        p = self.p
        denv = -p * (p + 1) * (p + 2) / 2 * u ** (p - 1) * (1 - u) ** 2 / r_max * (u < 1.0)
        zero = torch.zeros_like(e)
        return r, 0.5 * torch.where(inside, e * env, zero), 0.5 * torch.where(inside, de * env + e * denv, zero)

    def forward(self, numbers: torch.Tensor, vectors: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        close = self.close_edges(numbers, vectors, edge_index)
        pairs = edge_index[:, close]
        _, e, _ = self.pair_terms(numbers, vectors[close], pairs)
        return torch.zeros(numbers.shape[0], dtype=torch.float64, device=e.device).index_add(0, pairs[0], e)

    def derivatives(self, numbers: torch.Tensor, vectors: torch.Tensor, edge_index: torch.Tensor,
                    batch: torch.Tensor, n_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forces [N, 3], dE/d(strain) [G, 3, 3])`` of the prior alone, float64, for models
        whose forces come from direct heads (the prior's own forces are always ``-dE/dr``);
        analytic, so no autograd pass runs inside the model's forward."""
        close = self.close_edges(numbers, vectors, edge_index)
        i, j = edge_index[:, close]
        v = vectors[close].detach().double()
        r, _, de_dr = self.pair_terms(numbers, v, edge_index[:, close])
        grad = (de_dr / r.clamp_min(1e-12))[:, None] * v  # dE/dv [E, 3]
        # v = r_j - r_i (+ shift): dE/dr_j = dE/dv, dE/dr_i = -dE/dv; F = -dE/dr
        forces = torch.zeros(numbers.shape[0], 3, dtype=grad.dtype, device=grad.device)
        forces = forces.index_add(0, i, grad).index_add(0, j, -grad)
        virial = grad[:, :, None] * v[:, None, :]  # dE/d(eps) = sum_e dE/dv_e (x) v_e
        strain = torch.zeros(n_graphs, 3, 3, dtype=grad.dtype, device=grad.device).index_add(0, batch[i], virial)
        return forces, 0.5 * (strain + strain.transpose(1, 2))
