"""What the three fused ops share: the path switch, its errors, output buffers, the dot policy and RoPE.

Every op takes one switch, ``use_triton: bool | None``: True forces the Triton kernels (CUDA tensors, or the
CPU under TRITON_INTERPRET=1), False the op's PyTorch path, None picks Triton for CUDA tensors of a dtype the
kernels take and PyTorch elsewhere. A forced path that cannot run raises `KernelUnavailableError`, a
ValueError, so the command line reports it in one line.

RoPE follows Hugging Face Llama ("rotate_half"): with x = (x1, x2) split in halves, θ_f = p·inv_freq_f and
emb = (θ, θ),

    RoPE_p(x) = x·cos(emb) + rotate_half(x)·sin(emb) = (x1 cos θ − x2 sin θ, x2 cos θ + x1 sin θ),

an orthogonal map whose transpose is RoPE_{-p} (negate sin).
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

#: dtypes the Triton kernels take (float64 and the rest run the PyTorch paths).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class KernelUnavailableError(ValueError):
    """The forced path (Triton, flash-attn) cannot run on these tensors: wrong device or dtype, or no library."""


def interpreter_active() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1, read now: tests change it)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_switch(use_triton: bool | None) -> None:
    """Raise a ValueError unless ``use_triton`` is True, False or None."""
    if use_triton is not None and not isinstance(use_triton, bool):
        raise ValueError(f"use_triton must be True, False or None (pick by device), got {use_triton!r}")


def choose_triton(use_triton: bool | None, *tensors: torch.Tensor) -> bool:
    """Resolve the switch: None = Triton when tensors[0] is on CUDA and every tensor's dtype is in TRITON_DTYPES."""
    check_switch(use_triton)
    if use_triton is None:
        return tensors[0].is_cuda and all(t.dtype in TRITON_DTYPES for t in tensors)
    return use_triton


def require_triton(op: str, *tensors: torch.Tensor) -> None:
    """Raise KernelUnavailableError unless the Triton ``op`` can run: dtypes in TRITON_DTYPES, CUDA or interpreter."""
    for tensor in tensors:
        if tensor.dtype not in TRITON_DTYPES:
            raise KernelUnavailableError(
                f"the Triton {op} supports float32, bfloat16 and float16, got {tensor.dtype}; "
                "use use_triton=False for other dtypes"
            )
    if not tensors[0].is_cuda and not interpreter_active():
        raise KernelUnavailableError(
            f"the Triton {op} needs CUDA tensors (got device {tensors[0].device}) or TRITON_INTERPRET=1 set "
            "before triton is imported; use use_triton=False on CPU"
        )


def empty_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher hands a kernel to write (tests swap it for a NaN-filled one, through this module)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of ``dtype``: exact "ieee" products for float32 (not TF32);
    16-bit operands go to tensor cores whatever it says, with float32 accumulation."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_constexprs(dtype: torch.dtype) -> dict:
    """DOT, the Triton type dot operands are rounded to for inputs of ``dtype``, and PREC = dot_precision(DOT):
    the input's own type, except bf16 in the interpreter, which multiplies bf16 blocks as raw 16-bit integers
    (numpy has no bf16), so there the dots run in exact fp32."""
    if dtype == torch.bfloat16 and interpreter_active():
        dtype = torch.float32
    operand = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    return dict(DOT=operand, PREC=dot_precision(dtype))


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """θ = p·inv_freq in ``dtype``: (..., hd/2) for integer positions (...) (p may be negative)."""
    return positions.to(dtype)[..., None] * inv_freq.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(emb), sin(emb) with emb = (θ, θ), θ = p·inv_freq: (..., hd) each, in ``dtype``."""
    theta = rope_angles(positions, inv_freq, dtype)
    emb = torch.cat((theta, theta), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """rotate_half(x) = (−x2, x1) over the last axis, with x = (x1, x2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE_p(x) = x·cos + rotate_half(x)·sin, with cos, sin from `rope_cos_sin` broadcast against x (..., hd);
    pass −sin for the transpose RoPE_pᵀ."""
    return x * cos + rotate_half(x) * sin
