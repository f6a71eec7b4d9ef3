"""Drop-in modules and functional forms of the fused ops: Triton on CUDA, the PyTorch reference elsewhere.

Each picks its path from the tensors it gets (``use_triton=None``); ``use_triton=True`` or ``False`` forces
one (hyperdas.kernels.common). The math of each op is in its own file's docstrings:

- ``interchange`` / ``Interchange``: h' = h + W Wᵀ (Aᵀ[:Ts] S + A_Ts ⊙ h − h), the rotate-project-patch step.
- ``fused_selection_head`` / ``FusedSelectionHead``: A = column softmax over source tokens + SELF of
  mean_h q_h · RoPE_{p_j}(kb_j + ks_i) / √hd, never forming the (B, Ts, Tb, ·) pair tensor (the module with
  the projections around it is hyperdas.selection.SelectionHead).
- ``normalized_cross_attention`` / ``NormalizedCrossAttention``: instruction queries over the T·N flattened,
  L2-normalised target states (GQA, RoPE on both sides), flash-style.
- ``FusedLowRankRotatedSpaceIntervention``: pyvene's LowRankRotatedSpaceIntervention through the fused
  interchange (import it from hyperdas.kernels.pyvene_intervention; it needs pyvene).
"""

from __future__ import annotations

from hyperdas.kernels.cross_attention import NormalizedCrossAttention, normalized_cross_attention
from hyperdas.kernels.interchange import Interchange, interchange
from hyperdas.kernels.selection_head import FusedSelectionHead, fused_selection_head

__all__ = [
    "FusedSelectionHead",
    "Interchange",
    "NormalizedCrossAttention",
    "fused_selection_head",
    "interchange",
    "normalized_cross_attention",
]
