"""Fused normalised cross-attention of the HyperDAS editor (METHOD.md, section 2).

The editor's Te instruction tokens attend over every hidden state of every token of a frozen target run,
flattened to S = T·N keys, each state x_s L2-normalised. The key and value projections are linear without
bias, so k_proj(x_s / ||x_s||) = k_proj(x_s) · r_s with r_s = 1 / ||x_s||: the normalisation is a per-key
scale and no normalised copy of the (B, S, D) states is ever made. With RoPE rotation R_p at position p
(Hugging Face Llama "rotate_half" convention) and GQA (query head h reads key/value head h // (Hq / Hkv)):

    y_s   = r_s · R_{pk_s} k_s                  (scaled, rotated key)
    z_s   = r_s · v_s                           (scaled value)
    a_ts  = scale · (R_{pq_t} q_t) · y_s        (−inf where key s is masked)
    out_t = Σ_s softmax_s(a_t)_s · z_s          (a row with no unmasked key gives 0)

Four implementations of the same contract, `normalized_cross_attention(q, k, v, key_inv_norm, q_positions,
k_positions, inv_freq, key_mask, scale)`:

- `cross_attention_reference`: plain PyTorch, the oracle.
- `cross_attention_sdpa`: torch scaled_dot_product_attention (CPU, and the GPU fallback); flash-attn's
  varlen kernel when it is importable and the tensors are CUDA fp16/bf16.
- `CrossAttentionFunction`: Triton flash-style forward (online softmax; RoPE and r_s applied to key and value
  tiles on the fly; only the log-sum-exp saved) and a fused Triton backward (FlashAttention-2 style, the
  probabilities recomputed from the log-sum-exp) giving gradients to q, k, v and key_inv_norm.
- `normalized_cross_attention`: the dispatcher (Triton on CUDA, SDPA elsewhere).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import nn

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

BACKENDS = ("triton", "sdpa", "flash", "reference")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------
# Checks and the pieces shared by the PyTorch paths
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(
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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """rotate_half(x) = cat(-x2, x1) with x = cat(x1, x2) split on the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE in the Hugging Face Llama convention, computed in x's dtype from fp32 (or fp64) angles.

    Args:
        x: (B, H, L, hd).
        positions: (B, L) integer positions.
        inv_freq: (hd/2,).

    Returns:
        x·cos(emb) + rotate_half(x)·sin(emb) with emb = cat(p·inv_freq, p·inv_freq), shape (B, H, L, hd).
    """
    angle_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    freqs = positions.to(angle_dtype)[..., None] * inv_freq.to(angle_dtype)  # (B, L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, hd)
    return x * emb.cos().to(x.dtype) + _rotate_half(x) * emb.sin().to(x.dtype)


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
    _check_inputs(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask)
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
    use_flash_attn: bool = True,
) -> torch.Tensor:
    """The op through torch's scaled_dot_product_attention (or flash-attn's varlen kernel when available).

    Normalisation and RoPE are done first in PyTorch (z = r·v, y = RoPE(r·k), RoPE(q)), then one attention
    call with a boolean key mask and native GQA. A row without visible keys is given an all-visible mask
    (so no NaN appears) and its output is zeroed, which also zeroes its gradients.

    Args:
        use_flash_attn: take flash-attn's varlen path when it is importable and q is CUDA fp16/bf16.
        Other arguments as `normalized_cross_attention`.

    Returns:
        (B, Hq, Te, hd) in q's dtype.
    """
    _check_inputs(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_r, k_r, v_s = normalise_and_rotate(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq)
    if use_flash_attn and flash_attn_available(q):
        return _flash_attn_packed(q_r, k_r, v_s, key_mask, scale)
    row_has_key = key_mask.any(dim=-1)  # (B,)
    visible = (key_mask | ~row_has_key[:, None])[:, None, None, :]  # (B, 1, 1, S)
    out = torch.nn.functional.scaled_dot_product_attention(
        q_r, k_r, v_s, attn_mask=visible, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out * row_has_key[:, None, None, None].to(out.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE (fp32 inputs) asks for full fp32 products instead of TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _cross_attn_fwd_kernel(
    Q, K, V, INV, QPOS, KPOS, FREQ, MASK, OUT, LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_ib, stride_is, stride_qpb, stride_qpt, stride_kpb, stride_kps, stride_mb, stride_ms,
    Hkv, Te, S, HALF, qk_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """Forward: one program per (block of BLOCK_M query rows, batch row b, key/value head).

    The GROUP = Hq/Hkv query heads that share key/value head j are stacked into M = GROUP·Te rows (row m is
    head j·GROUP + m // Te, instruction token m % Te), so every key tile is read once per group. Heads are
    split in halves x = (x1, x2) of width hd/2, which is the form RoPE acts on:
        R_p x = (x1 cos θ − x2 sin θ, x2 cos θ + x1 sin θ),   θ = p · inv_freq.
    Over key tiles (online softmax in base 2, c = scale·log2 e):
        a_ms = c · r_s · (R q_m) · (R k_s)          (−inf where key s is masked or past S)
        m'   = max(m, max_s a_ms);  l ← l·2^(m−m') + Σ_s 2^(a_ms−m');  acc ← acc·2^(m−m') + (2^(a−m') ⊙ r) v
    and finally out = acc / l and LSE = m + log2 l (base 2; +inf and out = 0 for a row with l = 0).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    dtype = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # stacked query rows
    row_ok = offs_m < GROUP * Te
    head = kvh * GROUP + offs_m // Te
    tok = offs_m % Te
    offs_h = tl.arange(0, BLOCK_H)  # half of the head dimension
    h_ok = offs_h < HALF
    offs_n0 = tl.arange(0, BLOCK_N)

    freq = tl.load(FREQ + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    q_pos = tl.load(QPOS + b * stride_qpb + tok * stride_qpt, mask=row_ok, other=0).to(tl.float32)
    q_angle = q_pos[:, None] * freq[None, :]  # (BLOCK_M, BLOCK_H)
    q_cos = tl.cos(q_angle)
    q_sin = tl.sin(q_angle)
    q_ptr = Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + offs_h[None, :] * stride_qd
    q_ok = row_ok[:, None] & h_ok[None, :]
    q1 = tl.load(q_ptr, mask=q_ok, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + HALF * stride_qd, mask=q_ok, other=0.0).to(tl.float32)
    qr1 = (q1 * q_cos - q2 * q_sin).to(dtype)
    qr2 = (q2 * q_cos + q1 * q_sin).to(dtype)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for start in range(0, S, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < S
        keep = tl.load(MASK + b * stride_mb + offs_n * stride_ms, mask=n_ok, other=0) != 0
        inv = tl.load(INV + b * stride_ib + offs_n * stride_is, mask=n_ok, other=0.0).to(tl.float32)
        inv = tl.where(keep, inv, 0.0)
        k_pos = tl.load(KPOS + b * stride_kpb + offs_n * stride_kps, mask=n_ok, other=0).to(tl.float32)
        # keys loaded transposed, (BLOCK_H, BLOCK_N), and rotated on the fly
        kt_angle = freq[:, None] * k_pos[None, :]
        kt_cos = tl.cos(kt_angle)
        kt_sin = tl.sin(kt_angle)
        kt_ok = h_ok[:, None] & n_ok[None, :]
        kt_ptr = k_base + offs_n[None, :] * stride_ks + offs_h[:, None] * stride_kd
        k1 = tl.load(kt_ptr, mask=kt_ok, other=0.0).to(tl.float32)
        k2 = tl.load(kt_ptr + HALF * stride_kd, mask=kt_ok, other=0.0).to(tl.float32)
        kr1 = (k1 * kt_cos - k2 * kt_sin).to(dtype)
        kr2 = (k2 * kt_cos + k1 * kt_sin).to(dtype)
        v_ok = n_ok[:, None] & h_ok[None, :]
        v_ptr = v_base + offs_n[:, None] * stride_vs + offs_h[None, :] * stride_vd
        v1 = tl.load(v_ptr, mask=v_ok, other=0.0)
        v2 = tl.load(v_ptr + HALF * stride_vd, mask=v_ok, other=0.0)

        scores = _mm(qr1, kr1, IEEE) + _mm(qr2, kr2, IEEE)  # (BLOCK_M, BLOCK_N)
        scores = scores * (qk_scale * inv)[None, :]
        scores = tl.where(keep[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = (p * inv[None, :]).to(dtype)  # folds r_s into the values
        acc1 = acc1 * alpha[:, None] + _mm(pv, v1, IEEE)
        acc2 = acc2 * alpha[:, None] + _mm(pv, v2, IEEE)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))
    tl.store(LSE + pid_bh * GROUP * Te + offs_m, lse, mask=row_ok)
    o_ptr = OUT + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + offs_h[None, :] * stride_od
    tl.store(o_ptr, (acc1 / l_safe[:, None]).to(dtype), mask=q_ok)
    tl.store(o_ptr + HALF * stride_od, (acc2 / l_safe[:, None]).to(dtype), mask=q_ok)


@triton.jit
def _cross_attn_bwd_kernel(
    Q, K, V, INV, QPOS, KPOS, FREQ, MASK, DO, LSE, DELTA, DQ, DK, DV, DINV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_ib, stride_is, stride_qpb, stride_qpt, stride_kpb, stride_kps, stride_mb, stride_ms,
    Hkv, Te, S, HALF, sm_scale, qk_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """Backward: one program per (block of BLOCK_N keys, batch row b, key/value head); loops over all query rows.

    With y_s = r_s R k_s, z_s = r_s v_s, P = softmax(a) recomputed as 2^(c·r_s (Rq)·(Rk_s) − LSE) and
    Δ_m = dO_m · O_m (precomputed), FlashAttention-2 style:
        dP_ms = dO_m · z_s = r_s (dO_m · v_s),       dA_ms = P_ms (dP_ms − Δ_m)
        g_z,s = Σ_m P_ms dO_m                        (gradient of z_s)
        g_y,s = scale Σ_m dA_ms (R q_m)              (gradient of y_s)
        d(R q_m) = scale Σ_s dA_ms y_s,  dq_m = Rᵀ d(R q_m)   (atomically added over key blocks, fp32)
    and, with g_s = Rᵀ g_y,s the gradient of the scaled unrotated key r_s k_s:
        dk_s = r_s g_s,   dv_s = r_s g_z,s,   dr_s = g_s · k_s + g_z,s · v_s
    dr_s is written per key/value head (DINV: (B, Hkv, S)) and summed over heads by the launcher.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    dtype = Q.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < S
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    offs_m0 = tl.arange(0, BLOCK_M)

    freq = tl.load(FREQ + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    keep = tl.load(MASK + b * stride_mb + offs_n * stride_ms, mask=n_ok, other=0) != 0
    inv = tl.load(INV + b * stride_ib + offs_n * stride_is, mask=n_ok, other=0.0).to(tl.float32)
    inv = tl.where(keep, inv, 0.0)
    k_pos = tl.load(KPOS + b * stride_kpb + offs_n * stride_kps, mask=n_ok, other=0).to(tl.float32)
    k_angle = k_pos[:, None] * freq[None, :]  # (BLOCK_N, BLOCK_H)
    k_cos = tl.cos(k_angle)
    k_sin = tl.sin(k_angle)
    kv_ok = n_ok[:, None] & h_ok[None, :]
    k_ptr = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_ks + offs_h[None, :] * stride_kd
    v_ptr = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs + offs_h[None, :] * stride_vd
    k1 = tl.load(k_ptr, mask=kv_ok, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + HALF * stride_kd, mask=kv_ok, other=0.0).to(tl.float32)
    v1 = tl.load(v_ptr, mask=kv_ok, other=0.0)
    v2 = tl.load(v_ptr + HALF * stride_vd, mask=kv_ok, other=0.0)
    kr1 = (k1 * k_cos - k2 * k_sin).to(dtype)
    kr2 = (k2 * k_cos + k1 * k_sin).to(dtype)

    g_y1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    g_y2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    g_z1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    g_z2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    col_scale = qk_scale * inv  # (BLOCK_N,)

    for m_start in range(0, GROUP * Te, BLOCK_M):
        offs_m = m_start + offs_m0
        row_ok = offs_m < GROUP * Te
        head = kvh * GROUP + offs_m // Te
        tok = offs_m % Te
        q_pos = tl.load(QPOS + b * stride_qpb + tok * stride_qpt, mask=row_ok, other=0).to(tl.float32)
        q_angle = q_pos[:, None] * freq[None, :]  # (BLOCK_M, BLOCK_H)
        q_cos = tl.cos(q_angle)
        q_sin = tl.sin(q_angle)
        q_ok = row_ok[:, None] & h_ok[None, :]
        q_ptr = Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + offs_h[None, :] * stride_qd
        do_ptr = (
            DO + b * stride_dob + head[:, None] * stride_doh + tok[:, None] * stride_dot + offs_h[None, :] * stride_dod
        )
        q1 = tl.load(q_ptr, mask=q_ok, other=0.0).to(tl.float32)
        q2 = tl.load(q_ptr + HALF * stride_qd, mask=q_ok, other=0.0).to(tl.float32)
        qr1 = (q1 * q_cos - q2 * q_sin).to(dtype)
        qr2 = (q2 * q_cos + q1 * q_sin).to(dtype)
        do1 = tl.load(do_ptr, mask=q_ok, other=0.0)
        do2 = tl.load(do_ptr + HALF * stride_dod, mask=q_ok, other=0.0)
        lse = tl.load(LSE + pid_bh * GROUP * Te + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * GROUP * Te + offs_m, mask=row_ok, other=0.0)

        scores_t = _mm(kr1, tl.trans(qr1), IEEE) + _mm(kr2, tl.trans(qr2), IEEE)  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(scores_t * col_scale[:, None] - lse[None, :])
        p_t = tl.where(keep[:, None] & row_ok[None, :], p_t, 0.0)
        g_z1 += _mm(p_t.to(dtype), do1, IEEE)
        g_z2 += _mm(p_t.to(dtype), do2, IEEE)
        dp_t = (_mm(v1, tl.trans(do1), IEEE) + _mm(v2, tl.trans(do2), IEEE)) * inv[:, None]
        ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M)
        g_y1 += _mm(ds_t.to(dtype), qr1, IEEE)
        g_y2 += _mm(ds_t.to(dtype), qr2, IEEE)
        ds_q = tl.trans((ds_t * inv[:, None]).to(dtype))  # (BLOCK_M, BLOCK_N), folds r_s into the keys
        dqr1 = _mm(ds_q, kr1, IEEE) * sm_scale
        dqr2 = _mm(ds_q, kr2, IEEE) * sm_scale
        dq_ptr = DQ + ((b * Hkv * GROUP + head[:, None]) * Te + tok[:, None]) * (2 * HALF) + offs_h[None, :]
        tl.atomic_add(dq_ptr, dqr1 * q_cos + dqr2 * q_sin, mask=q_ok)
        tl.atomic_add(dq_ptr + HALF, dqr2 * q_cos - dqr1 * q_sin, mask=q_ok)

    g_y1 = g_y1 * sm_scale
    g_y2 = g_y2 * sm_scale
    g1 = g_y1 * k_cos + g_y2 * k_sin  # Rᵀ g_y: gradient of the scaled, unrotated key
    g2 = g_y2 * k_cos - g_y1 * k_sin
    d_inv = tl.sum(g1 * k1 + g2 * k2, 1) + tl.sum(g_z1 * v1.to(tl.float32) + g_z2 * v2.to(tl.float32), 1)
    tl.store(DINV + pid_bh * S + offs_n, d_inv, mask=n_ok)
    dk_ptr = DK + (pid_bh * S + offs_n[:, None]) * (2 * HALF) + offs_h[None, :]
    dv_ptr = DV + (pid_bh * S + offs_n[:, None]) * (2 * HALF) + offs_h[None, :]
    tl.store(dk_ptr, (g1 * inv[:, None]).to(dtype), mask=kv_ok)
    tl.store(dk_ptr + HALF, (g2 * inv[:, None]).to(dtype), mask=kv_ok)
    tl.store(dv_ptr, (g_z1 * inv[:, None]).to(dtype), mask=kv_ok)
    tl.store(dv_ptr + HALF, (g_z2 * inv[:, None]).to(dtype), mask=kv_ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers and the autograd.Function
# ----------------------------------------------------------------------------------------------------------


def _block_sizes(rows: int, hd: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_H): stacked query rows per tile, keys per tile, padded half head dimension."""
    block_h = max(16, triton.next_power_of_2(hd // 2))
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = 64 if block_h <= 64 else 32
    return block_m, block_n, block_h


def _index_strides(
    key_inv_norm: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor, key_mask: torch.Tensor
) -> tuple[int, ...]:
    return (*key_inv_norm.stride(), *q_positions.stride(), *k_positions.stride(), *key_mask.stride())


def _triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_inv_norm: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns out (B, Hq, Te, hd) and the base-2 LSE (B, Hq, Te) fp32."""
    b, hq, te, hd = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, te), device=q.device, dtype=torch.float32)
    block_m, block_n, block_h = _block_sizes(group * te, hd)
    grid = (triton.cdiv(group * te, block_m), b * hkv)
    _cross_attn_fwd_kernel[grid](
        q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *_index_strides(key_inv_norm, q_positions, k_positions, key_mask),
        hkv, te, s, hd // 2, scale * _LOG2E,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out, lse


def _triton_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_inv_norm: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns dq, dk, dv (inputs' dtype) and d key_inv_norm (B, S) fp32."""
    b, hq, te, hd = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    delta = (grad_out.float() * out.float()).sum(dim=-1).contiguous()  # (B, Hq, Te): Δ_m = dO_m · O_m
    dq = torch.zeros((b, hq, te, hd), device=q.device, dtype=torch.float32)
    dk = torch.empty((b, hkv, s, hd), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, hkv, s, hd), device=q.device, dtype=v.dtype)
    d_inv = torch.empty((b, hkv, s), device=q.device, dtype=torch.float32)
    block_m, block_n, block_h = _block_sizes(group * te, hd)
    grid = (triton.cdiv(s, block_n), b * hkv)
    _cross_attn_bwd_kernel[grid](
        q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, grad_out, lse, delta,
        dq, dk, dv, d_inv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
        *_index_strides(key_inv_norm, q_positions, k_positions, key_mask),
        hkv, te, s, hd // 2, scale, scale * _LOG2E,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return dq.to(q.dtype), dk, dv, d_inv.sum(dim=1)


class CrossAttentionFunction(torch.autograd.Function):
    """Fused normalised cross-attention (Triton forward and backward); saves only the LSE besides the inputs.

    apply(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale) -> out (B, Hq, Te, hd).
    Gradients flow to q, k, v and key_inv_norm; positions, inv_freq and the mask get none.
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_inv_norm: torch.Tensor,
        q_positions: torch.Tensor,
        k_positions: torch.Tensor,
        inv_freq: torch.Tensor,
        key_mask: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        inv_freq = inv_freq.float().contiguous()
        key_inv_norm_f = key_inv_norm.float()
        out, lse = _triton_forward(q, k, v, key_inv_norm_f, q_positions, k_positions, inv_freq, key_mask, scale)
        ctx.save_for_backward(q, k, v, key_inv_norm_f, q_positions, k_positions, inv_freq, key_mask, out, lse)
        ctx.scale = scale
        ctx.inv_norm_dtype = key_inv_norm.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, out, lse = ctx.saved_tensors
        dq, dk, dv, d_inv = _triton_backward(
            grad_out, out, lse, q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, ctx.scale
        )
        return dq, dk, dv, d_inv.to(ctx.inv_norm_dtype), None, None, None, None, None


def cross_attention_triton(
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
    """The fused Triton op (CUDA, or the CPU under TRITON_INTERPRET=1). Arguments as `normalized_cross_attention`."""
    _check_inputs(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask)
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"the Triton cross-attention supports {_TRITON_DTYPES}; got {q.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return CrossAttentionFunction.apply(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale)


def normalized_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_inv_norm: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax_s(scale · RoPE(q)·RoPE(r_s k_s), masked) @ (r_s v_s) with r_s = key_inv_norm; the editor's op.

    Args:
        q: (B, Hq, Te, hd) query projections before RoPE.
        k: (B, Hkv, S, hd) key projections of the raw (un-normalised) states, before RoPE.
        v: (B, Hkv, S, hd) value projections of the raw states.
        key_inv_norm: (B, S) 1 / ||x_s||, applied to both k_s and v_s.
        q_positions: (B, Te) integer RoPE positions of the queries.
        k_positions: (B, S) integer RoPE positions of the keys (flattened token x layer index).
        inv_freq: (hd/2,) RoPE inverse frequencies (Hugging Face Llama "rotate_half" convention).
        key_mask: (B, S) bool, True = may be attended; a row with no True gives zeros (and zero gradients).
        scale: softmax scale, 1/sqrt(hd) by default.
        backend: "triton", "sdpa", "flash" or "reference"; None picks Triton on CUDA and SDPA elsewhere.

    Returns:
        (B, Hq, Te, hd) in q's dtype.
    """
    if backend is None:
        backend = "triton" if q.is_cuda and q.dtype in _TRITON_DTYPES else "sdpa"
    if backend == "triton":
        return cross_attention_triton(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale)
    if backend == "sdpa":
        return cross_attention_sdpa(
            q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale, use_flash_attn=False
        )
    if backend == "flash":
        if not flash_attn_available(q):
            raise ValueError("backend 'flash' needs flash-attn installed and CUDA fp16/bf16 tensors")
        return cross_attention_sdpa(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale)
    if backend == "reference":
        return cross_attention_reference(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale)
    raise ValueError(f"unknown cross-attention backend {backend!r}; allowed: {BACKENDS} or None")


class NormalizedCrossAttention(nn.Module):
    """Thin module form of `normalized_cross_attention` (no parameters: projections belong to the editor).

    Args:
        scale: softmax scale, 1/sqrt(hd) by default.
        backend: forced backend ("triton", "sdpa", "flash", "reference") or None for the automatic choice.
    """

    def __init__(self, scale: float | None = None, backend: str | None = None) -> None:
        super().__init__()
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown cross-attention backend {backend!r}; allowed: {BACKENDS} or None")
        self.scale = scale
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_inv_norm: torch.Tensor,
        q_positions: torch.Tensor,
        k_positions: torch.Tensor,
        inv_freq: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, Hq, Te, hd) attention output; arguments as `normalized_cross_attention`."""
        return normalized_cross_attention(
            q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, self.scale, self.backend
        )

    def extra_repr(self) -> str:
        return f"scale={self.scale}, backend={self.backend}"
