"""Fused ops for HyperDAS (Triton on CUDA, the PyTorch reference elsewhere). Imports nothing of hyperdas.

The drop-in modules are re-exported here; their functional forms are in hyperdas.kernels.modules
(``interchange``, ``fused_selection_head``, ``normalized_cross_attention``), since ``hyperdas.kernels.interchange``
names the op's own file. Every op takes ``use_triton: bool | None`` (hyperdas.kernels.common). The pyvene
intervention lives in hyperdas.kernels.pyvene_intervention (it needs pyvene, so it is not imported here).
"""

from hyperdas.kernels.common import KernelUnavailableError
from hyperdas.kernels.modules import FusedSelectionHead, Interchange, NormalizedCrossAttention

__all__ = ["FusedSelectionHead", "Interchange", "KernelUnavailableError", "NormalizedCrossAttention"]
