"""Per-fidelity readouts: one small MLP per fidelity, run on every atom as one matmul."""

from __future__ import annotations

import torch
from torch import nn


class FidelityScalarHeads(nn.Module):
    """One small MLP per fidelity: ``scalars [N, C], fidelity of each atom [N] -> [N]``.

    All heads run on every atom as one matmul and the atom's own fidelity is gathered:
    cheaper than splitting the batch when there are a handful of fidelities. The energy
    heads and the property heads (``models/properties.py``) are both this.
    """

    def __init__(self, channels: int, hidden: int, num_fidelities: int):
        super().__init__()
        self.f, self.h = num_fidelities, hidden
        self.hidden = nn.Linear(channels, num_fidelities * hidden)
        self.out_w = nn.Parameter(torch.randn(num_fidelities, hidden) / hidden**0.5)
        self.out_b = nn.Parameter(torch.zeros(num_fidelities))

    def forward(self, scalars: torch.Tensor, fidelity: torch.Tensor,
                features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-atom outputs ``[N]``; with ``features`` also each atom's last hidden layer at
        its fidelity ``[N, H]`` (what the uncertainty heads read)."""
        h = torch.nn.functional.silu(self.hidden(scalars)).view(-1, self.f, self.h)  # [N, F, H]
        e = torch.einsum("nfh,fh->nf", h, self.out_w) + self.out_b  # [N, F]
        e = e.gather(1, fidelity.unsqueeze(1)).squeeze(1)
        if not features:
            return e
        return e, h.gather(1, fidelity.view(-1, 1, 1).expand(-1, 1, self.h)).squeeze(1)
