"""hyperdas: HyperDAS (Sun et al., ICLR 2025) with fused kernels and DeepSpeed ZeRO-3 training.

A transformer hypernetwork that, given a concept and a base/source prompt pair, finds where in a frozen
LLM's residual stream the concept lives (token positions) and which subspace carries it, and proves it with
an interchange intervention.
"""

__version__ = "0.1.0"
