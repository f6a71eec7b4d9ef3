"""Benchmark of the editor's normalised cross-attention, every implementation side by side in one run.

    python -m pytest bench/test_cross_attention.py --benchmark-only

CUDA (Llama-3-8B editor shapes, bf16: Hq=32, Hkv=8, hd=128, Te=16 queries, T=64 tokens x N=33 states):
  - triton: the fused op (normalisation, RoPE, GQA, mask in the kernels);
  - sdpa_flash: torch's SDPA pinned to its flash backend, after an explicit normalisation + RoPE step in
    PyTorch (the fair unfused baseline; the flash backend takes no key mask, so it attends to every key);
  - sdpa_masked: `cross_attention_sdpa` (same prologue, boolean key mask, whatever backend torch picks);
  - flash_attn: flash-attn's varlen path on the packed unmasked keys, when flash-attn is installed;
  - reference: the eager PyTorch oracle.
CPU: the PyTorch paths only, at a small shape.
Each case runs forward ("fwd") and forward+backward ("fwd_bwd"); extra_info records the achieved TFLOP/s
(attention matmuls only: 4·B·Hq·Te·S·hd forward, 2.5x that backward) and, on CUDA, the peak memory that one
call allocates beyond its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from hyperdas.kernels.cross_attention import cross_attention_triton
from hyperdas.kernels.cross_attention_reference import (
    cross_attention_reference,
    cross_attention_sdpa,
    flash_attn_available,
    normalise_and_rotate,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@dataclass(frozen=True)
class Case:
    """B batch, Hq/Hkv heads, Te queries, T tokens x N states (S = T·N keys), hd head dim."""

    b: int
    hq: int
    hkv: int
    te: int
    t: int
    n: int
    hd: int
    dtype: torch.dtype

    @property
    def s(self) -> int:
        return self.t * self.n

    def __str__(self) -> str:
        return f"B{self.b}-Hq{self.hq}-Hkv{self.hkv}-Te{self.te}-S{self.t}x{self.n}-hd{self.hd}-{str(self.dtype)[6:]}"


CASES = (
    [Case(4, 32, 8, 16, 64, 33, 128, torch.bfloat16), Case(16, 32, 8, 16, 64, 33, 128, torch.bfloat16)]
    if CUDA
    else [Case(2, 6, 2, 8, 16, 5, 32, torch.float32)]
)


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Random inputs of the contract; about 70% of the tokens selectable (whole tokens, all N states)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    b, s, hd = case.b, case.s, case.hd

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=DEVICE, dtype=case.dtype)

    selectable = torch.rand(b, case.t, generator=g, device=DEVICE) < 0.7
    return {
        "q": randn(b, case.hq, case.te, hd),
        "k": randn(b, case.hkv, s, hd),
        "v": randn(b, case.hkv, s, hd),
        "key_inv_norm": 0.01 + torch.rand(b, s, generator=g, device=DEVICE) * 0.1,
        "q_positions": torch.arange(case.te, device=DEVICE).expand(b, -1),
        "k_positions": torch.arange(s, device=DEVICE).expand(b, -1),
        "inv_freq": 1.0 / 500000.0 ** (torch.arange(0, hd, 2, device=DEVICE, dtype=torch.float32) / hd),
        "key_mask": selectable.repeat_interleave(case.n, dim=1),
    }


def sdpa_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_inv_norm: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Unfused baseline: normalise + RoPE in PyTorch, then SDPA's flash backend (no key mask: it takes none)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q_r, k_r, v_s = normalise_and_rotate(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q_r, k_r, v_s, enable_gqa=True)


def _methods() -> dict[str, Callable[..., torch.Tensor]]:
    methods: dict[str, Callable[..., torch.Tensor]] = {}
    if CUDA:
        methods["triton"] = cross_attention_triton
        methods["sdpa_flash"] = sdpa_flash
    methods["sdpa_masked"] = lambda **kw: cross_attention_sdpa(**kw, use_flash_attn=False)
    if CUDA and flash_attn_available(torch.empty(0, device=DEVICE, dtype=torch.bfloat16)):
        methods["flash_attn"] = cross_attention_sdpa
    methods["reference"] = cross_attention_reference
    return methods


METHODS = _methods()
DIFFERENTIABLE = ("q", "k", "v", "key_inv_norm")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cross_attention(benchmark, case: Case, method: str, mode: str) -> None:
    fn = METHODS[method]
    inputs = make_inputs(case)
    if mode == "fwd_bwd":
        for name in DIFFERENTIABLE:
            inputs[name].requires_grad_()
        grad_out = torch.randn(case.b, case.hq, case.te, case.hd, device=DEVICE, dtype=case.dtype)
        leaves = [inputs[name] for name in DIFFERENTIABLE]

        def step() -> None:
            torch.autograd.grad(fn(**inputs), leaves, grad_out)
            _sync()
    else:

        def step() -> None:
            with torch.no_grad():
                fn(**inputs)
            _sync()

    try:
        step()  # compile / warm up
    except RuntimeError as error:  # e.g. this torch build's flash backend refuses these shapes or GQA
        pytest.skip(f"{method} cannot run {case}: {error}")
    peak_bytes = None
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak_bytes = torch.cuda.max_memory_allocated() - before

    benchmark.pedantic(step, rounds=20 if CUDA else 5, iterations=5 if CUDA else 1, warmup_rounds=2)
    fwd_flops = 4.0 * case.b * case.hq * case.te * case.s * case.hd
    flops = fwd_flops * (3.5 if mode == "fwd_bwd" else 1.0)
    benchmark.extra_info.update(
        {
            "op": "cross_attention",
            "method": method,
            "mode": mode,
            "shape": str(case),
            "tflops": flops / benchmark.stats.stats.mean / 1e12 if benchmark.stats is not None else None,
            "peak_mem_bytes": peak_bytes,
            "masked": method != "sdpa_flash",
        }
    )
