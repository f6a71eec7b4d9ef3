"""Fused ops for HyperDAS (Triton on CUDA, the PyTorch reference elsewhere). Imports nothing of hyperdas."""
