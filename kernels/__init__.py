"""Fused ops for HyperDAS (Triton on CUDA, the PyTorch reference elsewhere). Imports nothing of hyperdas.

The drop-in modules and functional forms are re-exported here from hyperdas.kernels.modules; the pyvene
intervention lives in hyperdas.kernels.pyvene_intervention (it needs pyvene, so it is not imported here).
"""

from hyperdas.kernels import modules
from hyperdas.kernels.modules import *  # noqa: F403 (the public names are modules.__all__)

__all__ = modules.__all__
