"""Fused ops for HyperDAS (Triton on CUDA, the PyTorch reference elsewhere). Imports nothing of hyperdas.

The drop-in modules are re-exported here; their functional forms are in hyperdas.kernels.modules
(``interchange``, ``selection_head``, ``normalized_cross_attention``), since ``hyperdas.kernels.interchange``
and ``hyperdas.kernels.selection_head`` name the ops' own files. The pyvene intervention lives in
hyperdas.kernels.pyvene_intervention (it needs pyvene, so it is not imported here).
"""

from hyperdas.kernels.modules import Interchange, NormalizedCrossAttention, SelectionHead

__all__ = ["Interchange", "NormalizedCrossAttention", "SelectionHead"]
