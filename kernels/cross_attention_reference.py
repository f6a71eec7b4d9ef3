"""The editor's normalised cross-attention in plain PyTorch: the oracle, and SDPA / flash-attn (the CPU path).

out_t = Σ_s softmax_s(scale · RoPE(q_t) · RoPE(r_s k_s), masked) · r_s v_s with r_s = 1/||x_s|| (see
cross_attention.py for the contract and the fused Triton op):

- `cross_attention_reference`: plain PyTorch in fp32 (fp64 for fp64 inputs), the oracle.
- `cross_attention_sdpa`: torch scaled_dot_product_attention after a PyTorch prologue; flash-attn's varlen
  kernel when it is importable and the tensors are CUDA fp16/bf16 (``use_flash_attn``).
"""

from __future__ import annotations

import math

import torch

from hyperdas.kernels.common import KernelUnavailableError, apply_rope, rope_cos_sin

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_inv_norm: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    key_mask: torch.Tensor,
) -> None:
    """Raise a ValueError naming the first argument that does not fit the contract."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be (B, Hq, Te, hd) and k (B, Hkv, S, hd); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    b, hq, te, hd = q.shape
    _, hkv, s, _ = k.shape
    if k.shape[0] != b or k.shape[3] != hd:
        raise ValueError(f"k {tuple(k.shape)} must be (B={b}, Hkv, S, hd={hd}) to match q {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads Hq={hq} must be a multiple of the key/value heads Hkv={hkv}")
    if hd % 2 != 0:
        raise ValueError(f"head_dim must be even for RoPE; got hd={hd}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    expected = {
        "key_inv_norm": (key_inv_norm, (b, s)),
        "q_positions": (q_positions, (b, te)),
        "k_positions": (k_positions, (b, s)),
        "inv_freq": (inv_freq, (hd // 2,)),
        "key_mask": (key_mask, (b, s)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {tuple(tensor.shape)}")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    if key_mask.dtype != torch.bool:
        raise ValueError(f"key_mask must be a bool tensor (True = may be attended); got {key_mask.dtype}")
    if q_positions.is_floating_point() or k_positions.is_floating_point():
        raise ValueError(f"positions must be integer tensors; got {q_positions.dtype}, {k_positions.dtype}")


def _apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE_p(x) (hyperdas.kernels.common) of (B, H, L, hd) vectors at positions (B, L), in x's dtype.

    The angles are fp32 (fp64 for fp64 x); cos and sin are rounded to x's dtype, as Hugging Face does.
    """
    angle_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(positions[:, None], inv_freq, angle_dtype)  # (B, 1, L, hd): every head alike
    return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))


def normalise_and_rotate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_inv_norm: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    inv_freq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused prologue: z = r·v, y = RoPE(r·k), RoPE(q). Shapes as the inputs."""
    r = key_inv_norm.to(k.dtype)[:, None, :, None]  # (B, 1, S, 1)
    return (
        _apply_rope(q, q_positions, inv_freq),
        _apply_rope(k * r, k_positions, inv_freq),
        v * r,
    )


# ----------------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------------


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_inv_norm: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Normalised GQA cross-attention in plain PyTorch (fp32, or fp64 for fp64 inputs); the oracle.

    out_t = Σ_s softmax_s(scale · RoPE(q_t) · RoPE(r_s k_s), masked) · r_s v_s; rows without any unmasked key
    give 0. Arguments as `normalized_cross_attention`.

    Returns:
        (B, Hq, Te, hd) in q's dtype.
    """
    check_inputs(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask)
    hd = q.shape[-1]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_c, k_c, v_c = (t.to(compute) for t in (q, k, v))
    key_inv_norm = key_inv_norm.to(compute)
    # 1. normalise: scale each key and value by 1 / ||x_s||
    k_c = k_c * key_inv_norm[:, None, :, None]  # (B, Hkv, S, hd)
    v_c = v_c * key_inv_norm[:, None, :, None]
    # 2. RoPE: queries at their instruction positions, keys at their flattened (token x layer) index
    q_c = _apply_rope(q_c, q_positions, inv_freq)
    k_c = _apply_rope(k_c, k_positions, inv_freq)
    # 3. GQA: query head h reads key/value head h // (Hq / Hkv)
    group = q.shape[1] // k.shape[1]
    k_c = k_c.repeat_interleave(group, dim=1)  # (B, Hq, S, hd)
    v_c = v_c.repeat_interleave(group, dim=1)
    # 4. masked softmax over keys; a row with no visible key attends to nothing and gives 0
    scores = scale * q_c @ k_c.transpose(-1, -2)  # (B, Hq, Te, S)
    row_has_key = key_mask.any(dim=-1)  # (B,)
    visible = (key_mask | ~row_has_key[:, None])[:, None, None, :]  # (B, 1, 1, S)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = (probs @ v_c) * row_has_key[:, None, None, None].to(compute)  # (B, Hq, Te, hd)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# SDPA and flash-attn
# ----------------------------------------------------------------------------------------------------------


def flash_attn_available(q: torch.Tensor) -> bool:
    """Whether flash-attn's varlen kernel can take q: flash-attn importable, q on CUDA in fp16 or bf16."""
    return flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _flash_attn_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """flash-attn's varlen kernel on the unmasked keys of each row, packed (q, k, v already normalised/rotated).

    flash-attn takes no arbitrary key mask, so the visible keys of every batch row are gathered into one
    (total_keys, Hkv, hd) tensor with cumulative lengths; a row without visible keys gets 0.
    NOT TESTED in this repository (flash-attn is not installed on the development machine).
    """
    b, hq, te, hd = q.shape
    flat_index = key_mask.reshape(-1).nonzero().squeeze(-1)  # (total_keys,)
    lengths = key_mask.sum(dim=-1, dtype=torch.int32)  # (B,)
    cu_k = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * te, te, dtype=torch.int32, device=q.device)
    k_packed = k.transpose(1, 2).reshape(-1, k.shape[1], hd).index_select(0, flat_index)  # (total, Hkv, hd)
    v_packed = v.transpose(1, 2).reshape(-1, v.shape[1], hd).index_select(0, flat_index)
    q_packed = q.transpose(1, 2).reshape(b * te, hq, hd)  # (B·Te, Hq, hd)
    out = flash_attn_varlen_func(
        q_packed, k_packed, v_packed, cu_q, cu_k, te, max(int(lengths.max()), 1), softmax_scale=scale, causal=False
    )
    out = out.reshape(b, te, hq, hd).transpose(1, 2)
    return torch.where((lengths > 0)[:, None, None, None], out, torch.zeros_like(out))


def cross_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_inv_norm: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float | None = None,
    use_flash_attn: bool | None = None,
) -> torch.Tensor:
    """The op through torch's scaled_dot_product_attention (or flash-attn's varlen kernel when available).

    Normalisation and RoPE are done first in PyTorch (z = r·v, y = RoPE(r·k), RoPE(q)), then one attention
    call with a boolean key mask and native GQA. A row without visible keys is given an all-visible mask
    (so no NaN appears) and its output is zeroed, which also zeroes its gradients.

    Args:
        use_flash_attn: True forces flash-attn's varlen path (installed, CUDA fp16/bf16 tensors), False SDPA;
            None takes flash-attn where it can run.
        Other arguments as `normalized_cross_attention`.

    Returns:
        (B, Hq, Te, hd) in q's dtype.
    """
    check_inputs(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask)
    if use_flash_attn and not flash_attn_available(q):
        raise KernelUnavailableError(
            f"use_flash_attn=True needs flash-attn installed and CUDA fp16/bf16 tensors, got {q.dtype} on {q.device}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_r, k_r, v_s = normalise_and_rotate(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq)
    if use_flash_attn is not False and flash_attn_available(q):
        return _flash_attn_packed(q_r, k_r, v_s, key_mask, scale)
    row_has_key = key_mask.any(dim=-1)  # (B,)
    visible = (key_mask | ~row_has_key[:, None])[:, None, None, :]  # (B, 1, 1, S)
    out = torch.nn.functional.scaled_dot_product_attention(
        q_r, k_r, v_s, attn_mask=visible, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out * row_has_key[:, None, None, None].to(out.dtype)
