"""DAS at the last entity token, through pyvene's ``LowRankRotatedSpaceIntervention`` (RAVEL's baseline).

For a base run with states h (B, Tb, D) at layer k and a source run with states S (B, Ts, D), with j_b the last
base entity token and i_b the last source entity token of example b, and R (D, r) pyvene's orthonormal basis:

    h'_{b, j_b} = h_{b, j_b} + (S_{b, i_b} R − h_{b, j_b} R) Rᵀ          (every other position unchanged)

then target layers k..end on h' give the label logits. DAS trains R on an attribute's causal examples only;
MDAS (RAVEL's multi-task DAS) on its causal examples and the isolate examples of the other attributes together,
weighted like HyperDAS's loss. The interchange is pyvene's own module (what researchers compare against); the
equivalence test runs a real pyvene ``IntervenableModel`` beside it.
"""

from __future__ import annotations

import torch
from torch import nn

from hyperdas.data.batch import PairBatch


def pyvene_intervention(hidden_size: int, rank: int) -> nn.Module:
    """A fresh pyvene LowRankRotatedSpaceIntervention of rank ``rank`` on D = ``hidden_size``."""
    try:
        from pyvene import LowRankRotatedSpaceIntervention
    except ImportError as err:  # pragma: no cover - install.sh installs it
        raise ImportError("the DAS/MDAS baselines need pyvene: pip install --no-deps pyvene==0.1.8") from err
    if not 1 <= rank <= hidden_size:
        raise ValueError(f"rank {rank} out of range for hidden size {hidden_size}: allowed 1..{hidden_size}")
    return LowRankRotatedSpaceIntervention(embed_dim=hidden_size, low_rank_dimension=rank)


class LastEntityDAS(nn.Module):
    """One rotated low-rank subspace, patched at the last entity token (see module docstring)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.rank = rank
        self.intervention = pyvene_intervention(hidden_size, rank)

    def forward(
        self, h: torch.Tensor, s: torch.Tensor, base_position: torch.Tensor, source_position: torch.Tensor
    ) -> torch.Tensor:
        """h: (B, Tb, D), s: (B, Ts, D), base_position / source_position: (B,) long -> patched h (B, Tb, D)."""
        rows = torch.arange(h.shape[0], device=h.device)
        out = h.clone()
        out[rows, base_position] = self.intervention(h[rows, base_position], s[rows, source_position]).to(h.dtype)
        return out


def full_vector_patch(
    h: torch.Tensor, s: torch.Tensor, base_position: torch.Tensor, source_position: torch.Tensor
) -> torch.Tensor:
    """The whole last source entity vector written into the last base entity token (the cause ceiling)."""
    rows = torch.arange(h.shape[0], device=h.device)
    out = h.clone()
    out[rows, base_position] = s[rows, source_position]
    return out


def patched_label_logits(target, layer: int, patch, h: torch.Tensor, s: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """Label logits (B, P, V) after ``patch(h, s, base_last, source_last)`` at layer ``layer`` (None: unpatched)."""
    device = h.device
    if patch is not None:
        h = patch(h, s, batch.base_entity_last.to(device), batch.source_entity_last.to(device))
    return target.run_from_layer(h, layer, batch.base_attention_mask.to(device), batch.label_positions.to(device))
