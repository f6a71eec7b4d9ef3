"""Drop-in modules and functional forms of the fused ops: Triton on CUDA, the PyTorch reference elsewhere.

Each picks its path from the tensors it gets (``use_triton=None`` / ``backend=None``) and takes an argument
that forces either path. The math of each op is in its own file's docstrings:

- ``interchange`` / ``Interchange``: h' = h + W Wᵀ (Aᵀ[:Ts] S + A_Ts ⊙ h − h), the rotate-project-patch step.
- ``selection_head`` / ``SelectionHead``: A = column softmax over source tokens + SELF of
  mean_h q_h · RoPE_{p_j}(kb_j + ks_i) / √hd, never forming the (B, Ts, Tb, ·) pair tensor.
- ``normalized_cross_attention`` / ``NormalizedCrossAttention``: instruction queries over the T·N flattened,
  L2-normalised target states (GQA, RoPE on both sides), flash-style.
- ``FusedLowRankRotatedSpaceIntervention``: pyvene's LowRankRotatedSpaceIntervention through the fused
  interchange (import it from hyperdas.kernels.pyvene_intervention; it needs pyvene).
"""

from __future__ import annotations

from hyperdas.kernels.cross_attention import NormalizedCrossAttention, normalized_cross_attention
from hyperdas.kernels.interchange import Interchange, interchange
from hyperdas.kernels.selection_head import SelectionHead, selection_head

__all__ = [
    "Interchange",
    "NormalizedCrossAttention",
    "SelectionHead",
    "interchange",
    "normalized_cross_attention",
    "selection_head",
]
