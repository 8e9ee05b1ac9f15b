"""Per-fidelity readouts: one small MLP per fidelity, run on every atom as one matmul."""

from __future__ import annotations

import torch
from torch import nn


class FidelityScalarHeads(nn.Module):
    """One small MLP per fidelity: ``scalars [N, C], fidelity of each atom [N] -> [N]``.

    All heads run on every atom as one matmul and the atom's own fidelity is gathered:
    cheaper than splitting the batch when there are a handful of fidelities. The energy
    heads and the property heads (``models/properties.py``) are both this.

    :meth:`set_delta` makes some heads corrections to another's: fidelity ``f`` with base
    ``b`` outputs ``head_f + head_b`` (``head_b``'s weights cut from autograd there: the base
    is learned from its own fidelity's labels only), and ``head_f`` starts at 0, so a new
    delta head predicts its base's answer until it has learned the difference.
    """

    def __init__(self, channels: int, hidden: int, num_fidelities: int):
        super().__init__()
        self.f, self.h = num_fidelities, hidden
        self.hidden = nn.Linear(channels, num_fidelities * hidden)
        self.out_w = nn.Parameter(torch.randn(num_fidelities, hidden) / hidden**0.5)
        self.out_b = nn.Parameter(torch.zeros(num_fidelities))
        self.register_buffer("base", None, persistent=False)  # [F]: base head of each, -1 none

    def set_delta(self, base: list[int]) -> None:
        """``base[f]``: the head ``f`` corrects (-1: none); zeroes the delta heads' output layer."""
        if all(b < 0 for b in base):
            self.base = None
            return
        self.base = torch.tensor(base, dtype=torch.long, device=self.out_w.device)
        with torch.no_grad():
            for f, b in enumerate(base):
                if b >= 0:
                    self.out_w[f].zero_()

    def _frozen(self, scalars: torch.Tensor) -> torch.Tensor:
        """Every head's output ``[N, F]`` through weights cut from autograd: a delta fidelity's
        labels never train its base head, while the output still depends on the features
        (so on the positions: forces stay ``-dE/dr``)."""
        hidden = torch.nn.functional.linear(scalars, self.hidden.weight.detach(), self.hidden.bias.detach())
        h = torch.nn.functional.silu(hidden).view(-1, self.f, self.h)
        return torch.einsum("nfh,fh->nf", h, self.out_w.detach()) + self.out_b.detach()

    def forward(self, scalars: torch.Tensor, fidelity: torch.Tensor,
                features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-atom outputs ``[N]``; with ``features`` also each atom's last hidden layer at
        its fidelity ``[N, H]`` (what the uncertainty heads read)."""
        h = torch.nn.functional.silu(self.hidden(scalars)).view(-1, self.f, self.h)  # [N, F, H]
        e = torch.einsum("nfh,fh->nf", h, self.out_w) + self.out_b  # [N, F]
        if self.base is not None:  # delta heads: plus their base head's output
            base = self._frozen(scalars)[:, self.base.clamp_min(0)]
            e = e + torch.where(self.base >= 0, base, torch.zeros_like(base))
        e = e.gather(1, fidelity.unsqueeze(1)).squeeze(1)
        if not features:
            return e
        return e, h.gather(1, fidelity.view(-1, 1, 1).expand(-1, 1, self.h)).squeeze(1)
