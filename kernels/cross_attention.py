"""Fused normalised cross-attention of the HyperDAS editor (METHOD.md, section 2): kernels, launchers, autograd.

The editor's Te instruction tokens attend over every hidden state of every token of a frozen target run,
flattened to S = T·N keys, each state x_s L2-normalised. The key and value projections are linear without
bias, so k_proj(x_s / ||x_s||) = k_proj(x_s) · r_s with r_s = 1 / ||x_s||: the normalisation is a per-key
scale and no normalised copy of the (B, S, D) states is ever made. With RoPE rotation R_p at position p
(Hugging Face Llama "rotate_half" convention) and GQA (query head h reads key/value head h // (Hq / Hkv)):

    y_s   = r_s · R_{pk_s} k_s                  (scaled, rotated key)
    z_s   = r_s · v_s                           (scaled value)
    a_ts  = scale · (R_{pq_t} q_t) · y_s        (−inf where key s is masked)
    out_t = Σ_s softmax_s(a_t)_s · z_s          (a row with no unmasked key gives 0)

The PyTorch paths (the oracle `cross_attention_reference`; `cross_attention_sdpa`: torch SDPA or flash-attn)
are in cross_attention_reference.py. Here: `CrossAttentionFunction`, a Triton flash-style forward (online
softmax; RoPE and r_s applied to key and value tiles on the fly; only the log-sum-exp saved) and a fused Triton
backward (FlashAttention-2 style, the probabilities recomputed from the log-sum-exp) giving gradients to q, k,
v and key_inv_norm; the dispatcher `normalized_cross_attention` (Triton on CUDA, SDPA elsewhere) and its module.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import nn

from hyperdas.kernels import common
from hyperdas.kernels.common import check_switch, choose_triton, dot_precision, interpreter_active, require_triton
from hyperdas.kernels.cross_attention_reference import check_inputs, cross_attention_sdpa

_LOG2E = 1.4426950408889634
_NOMINAL_BLOCK_N = 64  # key-block size used to decide how to split the keys over programs


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


def _configs(kind: str) -> list[triton.Config]:
    """Autotuning candidates (BLOCK_N keys per tile, warps, pipeline stages); one fixed config when Triton runs
    in its CPU interpreter, where timing means nothing. The first of each list compiles without register
    spills for hd = 128 on sm_90 (checked offline with ptxas); the others are there for other head sizes."""
    if interpreter_active():
        return [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)]
    if kind == "fwd":
        candidates = [(64, 8, 2), (64, 8, 3), (32, 4, 3), (64, 4, 2), (128, 8, 2)]
    else:
        candidates = [(16, 8, 1), (16, 4, 1), (32, 8, 1), (64, 8, 1), (32, 4, 1)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in candidates]


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation at tl.dot input precision PREC (`dot_precision` of the inputs' dtype)."""
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _rope(x1, x2, cos, sin):
    """R_p (x1, x2) = (x1 cos θ − x2 sin θ, x2 cos θ + x1 sin θ): Llama's rotate_half RoPE on the two halves."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_transposed(g1, g2, cos, sin):
    """R_pᵀ (g1, g2) = (g1 cos θ + g2 sin θ, g2 cos θ − g1 sin θ): pulls a gradient back through RoPE."""
    return g1 * cos + g2 * sin, g2 * cos - g1 * sin


@triton.jit
def _load_query_rows(
    Q, DO, QPOS, freq, b, kvh, offs_m, offs_h, h_ok,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_ob, stride_oh, stride_ot, stride_od,
    stride_qpb, stride_qpt, Te, HALF,
    GROUP: tl.constexpr, LOAD_DO: tl.constexpr,
):  # fmt: skip
    """Stacked query rows m (head kvh·GROUP + m // Te, token m % Te): RoPE'd query halves, cos θ, sin θ,
    the (row, column) validity, and (LOAD_DO) the rows of the output gradient; all (len(offs_m), BLOCK_H)."""
    row_ok = offs_m < GROUP * Te
    head = kvh * GROUP + offs_m // Te
    tok = offs_m % Te
    pos = tl.load(QPOS + b * stride_qpb + tok * stride_qpt, mask=row_ok, other=0).to(tl.float32)
    angle = pos[:, None] * freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    ok = row_ok[:, None] & h_ok[None, :]
    q_ptr = Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + offs_h[None, :] * stride_qd
    q1 = tl.load(q_ptr, mask=ok, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + HALF * stride_qd, mask=ok, other=0.0).to(tl.float32)
    qr1, qr2 = _rope(q1, q2, cos, sin)
    dtype = Q.dtype.element_ty
    if LOAD_DO:
        do_ptr = DO + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + offs_h[None, :] * stride_od
        do1 = tl.load(do_ptr, mask=ok, other=0.0)
        do2 = tl.load(do_ptr + HALF * stride_od, mask=ok, other=0.0)
    else:
        do1 = qr1.to(dtype)
        do2 = qr2.to(dtype)
    return qr1.to(dtype), qr2.to(dtype), cos, sin, row_ok, ok, do1, do2


@triton.jit
def _load_key_block(
    K, V, INV, KPOS, MASK, freq, b, kvh, offs_n, offs_h, h_ok,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ib, stride_is, stride_kpb, stride_kps, stride_mb, stride_ms, S, HALF,
):  # fmt: skip
    """A block of keys: RoPE'd key halves R k (input dtype) and value halves (all (BLOCK_N, BLOCK_H)), the key
    positions, the mask and r (zeroed on masked or out-of-range keys), and the (key, column) validity."""
    n_ok = offs_n < S
    keep = tl.load(MASK + b * stride_mb + offs_n * stride_ms, mask=n_ok, other=0) != 0
    inv = tl.load(INV + b * stride_ib + offs_n * stride_is, mask=n_ok, other=0.0).to(tl.float32)
    inv = tl.where(keep, inv, 0.0)
    pos = tl.load(KPOS + b * stride_kpb + offs_n * stride_kps, mask=n_ok, other=0).to(tl.float32)
    angle = pos[:, None] * freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    ok = n_ok[:, None] & h_ok[None, :]
    k_ptr = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_ks + offs_h[None, :] * stride_kd
    v_ptr = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs + offs_h[None, :] * stride_vd
    k1 = tl.load(k_ptr, mask=ok, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + HALF * stride_kd, mask=ok, other=0.0).to(tl.float32)
    v1 = tl.load(v_ptr, mask=ok, other=0.0)
    v2 = tl.load(v_ptr + HALF * stride_vd, mask=ok, other=0.0)
    kr1, kr2 = _rope(k1, k2, cos, sin)
    dtype = K.dtype.element_ty
    return kr1.to(dtype), kr2.to(dtype), v1, v2, pos, keep, inv, ok


@triton.autotune(configs=_configs("fwd"), key=["HALF", "GROUP", "SPLIT", "PREC"])
@triton.jit
def _cross_attn_fwd_kernel(
    Q, K, V, INV, QPOS, KPOS, FREQ, MASK, OUT, LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_ib, stride_is, stride_qpb, stride_qpt, stride_kpb, stride_kps, stride_mb, stride_ms,
    Hkv, Te, S, HALF, qk_scale, RUNS, split_stride_o, split_stride_lse,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    SPLIT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Forward: one program per (split of the keys (RUNS splits), block of BLOCK_M query rows, batch row b,
    key/value head).

    The GROUP = Hq/Hkv query heads that share key/value head j are stacked into M = GROUP·Te rows (row m is
    head j·GROUP + m // Te, instruction token m % Te), so every key tile is read once per group. Heads are
    split in halves x = (x1, x2) of width hd/2, which is the form RoPE acts on:
        R_p x = (x1 cos θ − x2 sin θ, x2 cos θ + x1 sin θ),   θ = p · inv_freq.
    Over the key tiles of this program's split (online softmax in base 2, c = scale·log2 e):
        a_ms = c · r_s · (R q_m) · (R k_s)          (−inf where key s is masked or past S)
        m'   = max(m, max_s a_ms);  l ← l·2^(m−m') + Σ_s 2^(a_ms−m');  acc ← acc·2^(m−m') + (2^(a−m') ⊙ r) v
    then o = acc / l and LSE = m + log2 l (base 2). SPLIT: the partial (o, LSE) of this split go to fp32
    buffers (LSE = −inf where the split saw no key) for `_combine_splits_kernel`; otherwise o goes straight
    to the output, with o = 0 and LSE = +inf for a row without any visible key.
    """
    pid_split = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    dtype = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)  # one half of the head dimension
    h_ok = offs_h < HALF
    freq = tl.load(FREQ + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    qr1, qr2, q_cos, q_sin, row_ok, q_ok, q_unused1, q_unused2 = _load_query_rows(
        Q, Q, QPOS, freq, b, kvh, offs_m, offs_h, h_ok,
        stride_qb, stride_qh, stride_qt, stride_qd, stride_qb, stride_qh, stride_qt, stride_qd,
        stride_qpb, stride_qpt, Te, HALF, GROUP, False,
    )  # fmt: skip

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    n_blocks = tl.cdiv(S, BLOCK_N)
    per_run = tl.cdiv(n_blocks, RUNS)
    first = pid_split * per_run
    last = tl.minimum(first + per_run, n_blocks)
    for block in range(first, last):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        kr1, kr2, v1, v2, k_pos, keep, inv, kv_ok = _load_key_block(
            K, V, INV, KPOS, MASK, freq, b, kvh, offs_n, offs_h, h_ok,
            stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
            stride_ib, stride_is, stride_kpb, stride_kps, stride_mb, stride_ms, S, HALF,
        )  # fmt: skip
        scores = _mm(qr1, tl.trans(kr1), PREC) + _mm(qr2, tl.trans(kr2), PREC)  # (BLOCK_M, BLOCK_N)
        scores = tl.where(keep[None, :], scores * (qk_scale * inv)[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = (p * inv[None, :]).to(dtype)  # folds r_s into the values
        acc1 = acc1 * alpha[:, None] + _mm(pv, v1, PREC)
        acc2 = acc2 * alpha[:, None] + _mm(pv, v2, PREC)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o1 = acc1 / l_safe[:, None]
    o2 = acc2 / l_safe[:, None]
    rows = pid_bh * GROUP * Te + offs_m  # index of row m in a contiguous (B, Hq, Te)
    if SPLIT:
        lse = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(LSE + pid_split * split_stride_lse + rows, lse, mask=row_ok)
        o_ptr = OUT + pid_split * split_stride_o + rows[:, None] * (2 * HALF) + offs_h[None, :]
        tl.store(o_ptr, o1, mask=q_ok)
        tl.store(o_ptr + HALF, o2, mask=q_ok)
    else:
        lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))
        tl.store(LSE + rows, lse, mask=row_ok)
        head = kvh * GROUP + offs_m // Te
        tok = offs_m % Te
        o_ptr = OUT + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + offs_h[None, :] * stride_od
        tl.store(o_ptr, o1.to(dtype), mask=q_ok)
        tl.store(o_ptr + HALF, o2.to(dtype), mask=q_ok)


@triton.jit
def _combine_splits_kernel(
    O_PART, LSE_PART, OUT, LSE, n_rows, n_splits, HD,
    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Merge the per-split partial results of one query row (the row index into a contiguous (B, Hq, Te)):
        LSE = log2 Σ_j 2^LSE_j,   out = Σ_j 2^(LSE_j − LSE) o_j
    (out = 0 and LSE = +inf for a row that no split saw a visible key for)."""
    row = tl.program_id(0)
    offs_j = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    j_ok = offs_j < n_splits
    lse_j = tl.load(LSE_PART + offs_j * n_rows + row, mask=j_ok, other=float("-inf"))
    m = tl.max(lse_j, 0)
    has_key = m > float("-inf")
    m_safe = tl.where(has_key, m, 0.0)
    w = tl.exp2(lse_j - m_safe)  # (BLOCK_SPLITS,), 0 for splits without keys
    total = tl.sum(w, 0)
    l_safe = tl.where(has_key, total, 1.0)
    ok = j_ok[:, None] & (offs_d < HD)[None, :]
    o_j = tl.load(O_PART + (offs_j[:, None] * n_rows + row) * HD + offs_d[None, :], mask=ok, other=0.0)
    out = tl.sum(o_j * w[:, None], 0) / l_safe
    tl.store(OUT + row * HD + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HD)
    tl.store(LSE + row, tl.where(has_key, m_safe + tl.log2(l_safe), float("inf")))


@triton.jit
def _tile_grads(kr1, kr2, v1, v2, inv, col_scale, keep, qr1, qr2, do1, do2, lse, delta, row_ok, PREC: tl.constexpr):
    """The gradient contributions of one (key block, query block) tile; see `_cross_attn_bwd_kernel`.

    Returns g_z (BLOCK_N, BLOCK_H) x2, g_y / scale (BLOCK_N, BLOCK_H) x2 and d(R q) / scale (BLOCK_M, BLOCK_H) x2.
    """
    dtype = kr1.dtype
    scores_t = _mm(kr1, tl.trans(qr1), PREC) + _mm(kr2, tl.trans(qr2), PREC)  # (BLOCK_N, BLOCK_M)
    p_t = tl.exp2(scores_t * col_scale[:, None] - lse[None, :])
    p_t = tl.where(keep[:, None] & row_ok[None, :], p_t, 0.0)
    g_z1 = _mm(p_t.to(dtype), do1, PREC)
    g_z2 = _mm(p_t.to(dtype), do2, PREC)
    dp_t = (_mm(v1, tl.trans(do1), PREC) + _mm(v2, tl.trans(do2), PREC)) * inv[:, None]
    ds_t = p_t * (dp_t - delta[None, :])
    g_y1 = _mm(ds_t.to(dtype), qr1, PREC)
    g_y2 = _mm(ds_t.to(dtype), qr2, PREC)
    ds_q = tl.trans((ds_t * inv[:, None]).to(dtype))  # (BLOCK_M, BLOCK_N), folds r_s into the keys
    return g_z1, g_z2, g_y1, g_y2, _mm(ds_q, kr1, PREC), _mm(ds_q, kr2, PREC)


@triton.autotune(configs=_configs("bwd"), key=["HALF", "GROUP", "SINGLE_Q", "PREC"], reset_to_zero=["DQ"])
@triton.jit
def _cross_attn_bwd_kernel(
    Q, K, V, INV, QPOS, KPOS, FREQ, MASK, DO, LSE, DELTA, DQ, DK, DV, DINV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_ib, stride_is, stride_qpb, stride_qpt, stride_kpb, stride_kps, stride_mb, stride_ms,
    Hkv, Te, S, HALF, sm_scale, qk_scale, RUNS,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    SINGLE_Q: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Backward: one program per (run of consecutive key blocks (RUNS runs), batch row b, key/value head).

    With y_s = r_s R k_s, z_s = r_s v_s, P = softmax(a) recomputed as 2^(c·r_s (Rq)·(Rk_s) − LSE) and
    Δ_m = dO_m · O_m (precomputed), FlashAttention-2 style:
        dP_ms = dO_m · z_s = r_s (dO_m · v_s),       dA_ms = P_ms (dP_ms − Δ_m)
        g_z,s = Σ_m P_ms dO_m                        (gradient of z_s)
        g_y,s = scale Σ_m dA_ms (R q_m)              (gradient of y_s)
        d(R q_m) = scale Σ_s dA_ms y_s,  dq_m = Rᵀ d(R q_m)
    and, with g_s = Rᵀ g_y,s the gradient of the scaled unrotated key r_s k_s:
        dk_s = r_s g_s,   dv_s = r_s g_z,s,   dr_s = g_s · k_s + g_z,s · v_s = g_y,s · (R k_s) + g_z,s · v_s
    dr_s is written per key/value head (DINV: (B, Hkv, S)) and summed over heads by the launcher. dq is added
    atomically into an fp32 buffer: once per program when all M = GROUP·Te query rows fit one tile
    (SINGLE_Q, the query tile then stays in registers across the key blocks), else once per tile.
    """
    pid_run = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    dtype = Q.dtype.element_ty

    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    offs_m0 = tl.arange(0, BLOCK_M)
    freq = tl.load(FREQ + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    if SINGLE_Q:
        qr1, qr2, q_cos, q_sin, row_ok, q_ok, do1, do2 = _load_query_rows(
            Q, DO, QPOS, freq, b, kvh, offs_m0, offs_h, h_ok,
            stride_qb, stride_qh, stride_qt, stride_qd, stride_dob, stride_doh, stride_dot, stride_dod,
            stride_qpb, stride_qpt, Te, HALF, GROUP, True,
        )  # fmt: skip
        lse = tl.load(LSE + pid_bh * GROUP * Te + offs_m0, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * GROUP * Te + offs_m0, mask=row_ok, other=0.0)
    dq1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)

    n_blocks = tl.cdiv(S, BLOCK_N)
    per_run = tl.cdiv(n_blocks, RUNS)
    first = pid_run * per_run
    last = tl.minimum(first + per_run, n_blocks)
    for block in range(first, last):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        kr1, kr2, v1, v2, k_pos, keep, inv, kv_ok = _load_key_block(
            K, V, INV, KPOS, MASK, freq, b, kvh, offs_n, offs_h, h_ok,
            stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
            stride_ib, stride_is, stride_kpb, stride_kps, stride_mb, stride_ms, S, HALF,
        )  # fmt: skip
        col_scale = qk_scale * inv
        if SINGLE_Q:
            g_z1, g_z2, g_y1, g_y2, dqr1, dqr2 = _tile_grads(
                kr1, kr2, v1, v2, inv, col_scale, keep, qr1, qr2, do1, do2, lse, delta, row_ok, PREC
            )
            dq1 += dqr1
            dq2 += dqr2
        else:
            g_z1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
            g_z2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
            g_y1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
            g_y2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
            for m_start in range(0, GROUP * Te, BLOCK_M):
                offs_m = m_start + offs_m0
                qr1_t, qr2_t, cos_t, sin_t, row_ok_t, q_ok_t, do1_t, do2_t = _load_query_rows(
                    Q, DO, QPOS, freq, b, kvh, offs_m, offs_h, h_ok,
                    stride_qb, stride_qh, stride_qt, stride_qd, stride_dob, stride_doh, stride_dot, stride_dod,
                    stride_qpb, stride_qpt, Te, HALF, GROUP, True,
                )  # fmt: skip
                lse_t = tl.load(LSE + pid_bh * GROUP * Te + offs_m, mask=row_ok_t, other=float("inf"))
                delta_t = tl.load(DELTA + pid_bh * GROUP * Te + offs_m, mask=row_ok_t, other=0.0)
                gz1, gz2, gy1, gy2, dqr1, dqr2 = _tile_grads(
                    kr1, kr2, v1, v2, inv, col_scale, keep, qr1_t, qr2_t, do1_t, do2_t, lse_t, delta_t, row_ok_t, PREC
                )
                g_z1 += gz1
                g_z2 += gz2
                g_y1 += gy1
                g_y2 += gy2
                dqa, dqb = _rope_transposed(dqr1 * sm_scale, dqr2 * sm_scale, cos_t, sin_t)
                dq_ptr = DQ + (pid_bh * GROUP * Te + offs_m[:, None]) * (2 * HALF) + offs_h[None, :]  # fp32
                tl.atomic_add(dq_ptr, dqa, mask=q_ok_t, sem="relaxed")
                tl.atomic_add(dq_ptr + HALF, dqb, mask=q_ok_t, sem="relaxed")

        g_y1 = g_y1 * sm_scale
        g_y2 = g_y2 * sm_scale
        d_inv = tl.sum(g_y1 * kr1.to(tl.float32) + g_y2 * kr2.to(tl.float32), 1)
        d_inv += tl.sum(g_z1 * v1.to(tl.float32) + g_z2 * v2.to(tl.float32), 1)
        k_angle = k_pos[:, None] * freq[None, :]  # recomputed rather than held in registers over the tile
        g1, g2 = _rope_transposed(g_y1, g_y2, tl.cos(k_angle), tl.sin(k_angle))  # grad of the scaled key r_s k_s
        tl.store(DINV + pid_bh * S + offs_n, d_inv, mask=offs_n < S)
        dk_ptr = DK + (pid_bh * S + offs_n[:, None]) * (2 * HALF) + offs_h[None, :]
        dv_ptr = DV + (pid_bh * S + offs_n[:, None]) * (2 * HALF) + offs_h[None, :]
        tl.store(dk_ptr, (g1 * inv[:, None]).to(dtype), mask=kv_ok)
        tl.store(dk_ptr + HALF, (g2 * inv[:, None]).to(dtype), mask=kv_ok)
        tl.store(dv_ptr, (g_z1 * inv[:, None]).to(dtype), mask=kv_ok)
        tl.store(dv_ptr + HALF, (g_z2 * inv[:, None]).to(dtype), mask=kv_ok)

    if SINGLE_Q:
        q_pos = tl.load(QPOS + b * stride_qpb + (offs_m0 % Te) * stride_qpt, mask=row_ok, other=0).to(tl.float32)
        q_angle = q_pos[:, None] * freq[None, :]  # recomputed rather than held in registers over the key loop
        dqa, dqb = _rope_transposed(dq1 * sm_scale, dq2 * sm_scale, tl.cos(q_angle), tl.sin(q_angle))
        dq_ptr = DQ + (pid_bh * GROUP * Te + offs_m0[:, None]) * (2 * HALF) + offs_h[None, :]  # contiguous fp32
        tl.atomic_add(dq_ptr, dqa, mask=q_ok, sem="relaxed")
        tl.atomic_add(dq_ptr + HALF, dqb, mask=q_ok, sem="relaxed")


# ----------------------------------------------------------------------------------------------------------
# Launchers: allocate the outputs, pick the grid, launch one kernel each
# ----------------------------------------------------------------------------------------------------------


def _block_sizes(rows: int, hd: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_H): stacked query rows per tile and the padded half head dimension (BLOCK_N is tuned)."""
    block_h = max(16, triton.next_power_of_2(hd // 2))
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    return block_m, block_h


def _programs_in_flight(device: torch.device) -> int:
    """How many programs keep the device busy: 4 per streaming multiprocessor (1 for the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _key_runs(s: int, programs: int, device: torch.device, minimum: int) -> int:
    """Into how many runs of consecutive keys to split the S keys of each of `programs` (query block, head)
    pairs: enough runs to fill the device, each at least `minimum` nominal 64-key blocks long (or all keys)."""
    n_blocks = triton.cdiv(s, _NOMINAL_BLOCK_N)
    per_run = max(minimum, triton.cdiv(n_blocks * programs, _programs_in_flight(device)))
    return triton.cdiv(n_blocks, min(per_run, n_blocks))


def _strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Every stride of every tensor, in order: what the kernels take after their pointers."""
    return tuple(stride for t in tensors for stride in t.stride())


def _launch_forward(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale: float):
    """The forward kernel, its keys split into runs when the grid would not fill the device.

    Returns out (B, Hq, Te, hd) and the base-2 LSE (B, Hq, Te) fp32; with several runs, their fp32 partials
    (runs, B, Hq, Te, hd) and (runs, B, Hq, Te) for `_launch_combine_splits`.
    """
    b, hq, te, hd = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    block_m, block_h = _block_sizes(group * te, hd)
    m_blocks = triton.cdiv(group * te, block_m)
    n_splits = _key_runs(s, m_blocks * b * hkv, q.device, minimum=4)
    split = (n_splits,) if n_splits > 1 else ()
    out = common.empty_buffer((*split, b, hq, te, hd), torch.float32 if split else q.dtype, q.device)
    lse = common.empty_buffer((*split, b, hq, te), torch.float32, q.device)
    _cross_attn_fwd_kernel[(n_splits, m_blocks, b * hkv)](
        q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[-4:],
        *_strides(key_inv_norm, q_positions, k_positions, key_mask),
        hkv, te, s, hd // 2, scale * _LOG2E, n_splits, b * hq * te * hd, b * hq * te,
        GROUP=group, BLOCK_M=block_m, BLOCK_H=block_h, SPLIT=n_splits > 1, PREC=dot_precision(q.dtype),
    )  # fmt: skip
    return out, lse


def _launch_combine_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor, dtype: torch.dtype):
    """Merge the runs' partial results: out (B, Hq, Te, hd) in ``dtype`` and the LSE (B, Hq, Te) fp32."""
    n_splits, b, hq, te, hd = o_parts.shape
    out = common.empty_buffer((b, hq, te, hd), dtype, o_parts.device)
    lse = common.empty_buffer((b, hq, te), torch.float32, o_parts.device)
    _combine_splits_kernel[(b * hq * te,)](
        o_parts, lse_parts, out, lse, b * hq * te, n_splits, hd,
        BLOCK_SPLITS=triton.next_power_of_2(n_splits), BLOCK_D=triton.next_power_of_2(hd), num_warps=2,
    )  # fmt: skip
    return out, lse


def _launch_backward(grad_out, out, lse, q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale):
    """The backward kernel. Returns dq, dk, dv (inputs' dtype) and d key_inv_norm (B, S) fp32."""
    b, hq, te, hd = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    delta = (grad_out.float() * out.float()).sum(dim=-1).contiguous()  # (B, Hq, Te): Δ_m = dO_m · O_m
    dq = torch.zeros((b, hq, te, hd), device=q.device, dtype=torch.float32)  # the kernel adds into it
    dk = common.empty_buffer((b, hkv, s, hd), k.dtype, q.device)
    dv = common.empty_buffer((b, hkv, s, hd), v.dtype, q.device)
    d_inv = common.empty_buffer((b, hkv, s), torch.float32, q.device)
    block_m, block_h = _block_sizes(group * te, hd)
    runs = _key_runs(s, b * hkv, q.device, minimum=1)
    _cross_attn_bwd_kernel[(runs, b * hkv)](
        q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, grad_out, lse, delta,
        dq, dk, dv, d_inv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
        *_strides(key_inv_norm, q_positions, k_positions, key_mask),
        hkv, te, s, hd // 2, scale, scale * _LOG2E, runs,
        GROUP=group, BLOCK_M=block_m, BLOCK_H=block_h, SINGLE_Q=group * te <= block_m, PREC=dot_precision(q.dtype),
    )  # fmt: skip
    return dq.to(q.dtype), dk, dv, d_inv.sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Autograd, functional form, module
# ----------------------------------------------------------------------------------------------------------


class CrossAttentionFunction(torch.autograd.Function):
    """Fused normalised cross-attention (Triton forward and backward); saves only the LSE besides the inputs.

    apply(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale) -> out (B, Hq, Te, hd).
    Gradients flow to q, k, v and key_inv_norm; positions, inv_freq and the mask get none.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale: float):
        check_inputs(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask)
        require_triton("cross-attention", q)
        inv_freq = inv_freq.float().contiguous()
        key_inv_norm_f = key_inv_norm.float()
        out, lse = _launch_forward(q, k, v, key_inv_norm_f, q_positions, k_positions, inv_freq, key_mask, scale)
        if out.dim() == 5:  # the keys ran in several splits
            out, lse = _launch_combine_splits(out, lse, q.dtype)
        ctx.save_for_backward(q, k, v, key_inv_norm_f, q_positions, k_positions, inv_freq, key_mask, out, lse)
        ctx.scale = scale
        ctx.inv_norm_dtype = key_inv_norm.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, out, lse = ctx.saved_tensors
        dq, dk, dv, d_inv = _launch_backward(
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
    *,
    use_triton: bool | None = None,
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
        use_triton: True forces the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1), False torch's SDPA
            (`cross_attention_sdpa` without flash-attn); None picks Triton for CUDA tensors of a supported dtype.

    Returns:
        (B, Hq, Te, hd) in q's dtype.
    """
    if choose_triton(use_triton, q):
        return cross_attention_triton(q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale)
    return cross_attention_sdpa(
        q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, scale, use_flash_attn=False
    )


class NormalizedCrossAttention(nn.Module):
    """Thin module form of `normalized_cross_attention` (no parameters: projections belong to the editor).

    Args:
        scale: softmax scale, 1/sqrt(hd) by default.
        use_triton: as in `normalized_cross_attention`: None = Triton on CUDA, SDPA elsewhere.
    """

    def __init__(self, scale: float | None = None, use_triton: bool | None = None) -> None:
        super().__init__()
        check_switch(use_triton)
        self.scale = scale
        self.use_triton = use_triton

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
            q, k, v, key_inv_norm, q_positions, k_positions, inv_freq, key_mask, self.scale, use_triton=self.use_triton
        )

    def extra_repr(self) -> str:
        return f"scale={self.scale}, use_triton={self.use_triton}"
