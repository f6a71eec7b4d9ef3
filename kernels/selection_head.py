"""HyperDAS token-position selection head, fused in Triton: kernels, launchers, autograd, module.

The head scores every (source token i, base token j) pair and normalises over the SOURCE axis, with an extra
SELF row (i = Ts, "keep the base"), so that every column of A (B, Ts+1, Tb) sums to 1 (METHOD.md section 3).
With the model's projections already applied (c_ij = W1 b_j + W2 s_i is linear, so W_k c_ij = kb_j + ks_i):

    logit_ij  = 1/(H sqrt(hd)) sum_h RoPE_{p_q}(q_h) . RoPE_{p_j}(kb_jh + ks_ih)      for i < Ts
    logit_Ts,j = 1/(H sqrt(hd)) sum_h RoPE_{p_q}(q_h) . RoPE_{p_j}(kself_jh)
    logit_ij  = -inf where source i or base j is not selectable (i < Ts; the SELF row is never masked)
    A[:, :, j] = softmax_i(logit_:,j)

with p_q the query's position (the last instruction token's real-token index) and p_j base token j's. RoPE
rotations compose by adding angles, so RoPE_{p_q}(q) . RoPE_{p_j}(k) = (RoPE_{p_j - p_q}ᵀ q) . k: with
R_j = RoPE_{p_j - p_q}, the same for every key of column j, and
q̃_j = concat_h R_jᵀ q_h (B, Tb, H·hd) the logits split into a per-column term and one batched matmul,

    logit_ij = 1/(H sqrt(hd)) [q̃_j . kb_j + q̃_j . ks_i],

and no (B, Ts, Tb, H, hd) pair tensor is ever needed. The fast paths (PyTorch and Triton, forward and
backward) rotate by the relative angle p_j - p_q; the naive oracle rotates q and every key separately. The
PyTorch paths (`selection_head_naive`, the oracle, and `selection_head_torch`, the CPU path) are in
selection_head_reference.py; this file holds the Triton kernels, their launchers, `SelectionHeadFunction`,
the dispatching `fused_selection_head` and the thin `FusedSelectionHead` module. ("Fused": no pair tensor; the
module with the projections is hyperdas.selection.SelectionHead.) RoPE is as in hyperdas.kernels.common.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import nn

from hyperdas.kernels import common
from hyperdas.kernels.common import check_switch, choose_triton, dot_precision, require_triton, rope_angles
from hyperdas.kernels.selection_head_reference import check_inputs, selection_head_torch

__all__ = ["FusedSelectionHead", "SelectionHeadFunction", "fused_selection_head"]

# Largest tile sizes of the Triton kernels (rows i, columns j, RoPE pairs f). Every tile is at least 16 wide,
# the smallest shape tl.dot accepts; tests lower these to force several tiles along every axis. The forward
# runs one program per (batch row, column tile), so narrow column tiles keep more SMs busy (B·Tb/16 programs).
BLOCK_I_MAX = 64
BLOCK_J_MAX = 16
BLOCK_F_MAX = 32
# The kernels lift every tile to fp32 before a dot, so the dots take the fp32 policy (exact products).
_PREC = dot_precision(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------
# Layout shared by every kernel: keys and query are contiguous, so row t of a (B, T, H, hd) tensor starts at
# (b·T + t)·D, D = H·hd. The feature axis is walked in RoPE pairs f in [0, H·hd/2): pair f of head
# h = f // (hd/2) couples the dimensions lo = h·hd + f mod (hd/2) and hi = lo + hd/2, so every rotation is
# local to one tile. cos/sin are (B, Tb, hd/2) float32 tables of the relative angle of column j to the query:
# cos[b, j, r] = cos((p_bj - p_bq) · inv_freq_r), so q̃ = RoPE_{p_j - p_q}ᵀ q is the rotated query's view.


@triton.jit
def _pair_columns(offs_f, P, HALF: tl.constexpr, HD: tl.constexpr):
    """Feature columns (lo, hi) of RoPE pairs offs_f, their frequency index r and validity f < P."""
    r = offs_f % HALF
    lo = (offs_f // HALF) * HD + r
    return lo, lo + HALF, r, offs_f < P


@triton.jit
def _rotated_query(q_ptr, cos_ptr, sin_ptr, b, offs_j, lo, hi, r, f_ok, Tb, P, HALF: tl.constexpr):
    """q̃ = RoPE_{p_j - p_q}ᵀ q on a (BLOCK_J, BLOCK_F) tile of pairs: q̃1 = q1 cos + q2 sin, q̃2 = q2 cos - q1 sin.

    Returns (q̃1, q̃2, cos, sin); rows j >= Tb and pairs f >= P are zero.
    """
    q1 = tl.load(q_ptr + b * (P * 2) + lo, mask=f_ok, other=0.0).to(tl.float32)  # (F,)
    q2 = tl.load(q_ptr + b * (P * 2) + hi, mask=f_ok, other=0.0).to(tl.float32)
    jf_ok = (offs_j < Tb)[:, None] & f_ok[None, :]
    table = (b * Tb + offs_j)[:, None] * HALF + r[None, :]  # (J, F)
    cos = tl.load(cos_ptr + table, mask=jf_ok, other=0.0)
    sin = tl.load(sin_ptr + table, mask=jf_ok, other=0.0)
    q_rot1 = q1[None, :] * cos + q2[None, :] * sin
    q_rot2 = q2[None, :] * cos - q1[None, :] * sin
    return q_rot1, q_rot2, cos, sin


@triton.jit
def _selection_fwd_kernel(
    kb_ptr,
    ks_ptr,
    kself_ptr,
    q_ptr,
    cos_ptr,
    sin_ptr,
    bmask_ptr,
    smask_ptr,
    out_ptr,
    Ts,
    Tb,
    P,
    scale,
    HALF: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_F: tl.constexpr,
    PREC: tl.constexpr,
):
    """Forward for one batch row b and a tile of BLOCK_J base columns; writes A[b, :, j-tile].

    1. column terms  c_j = s·q̃_j.kb_j,  l_Ts,j = s·q̃_j.kself_j   (s = 1/(H sqrt(hd)))
    2. for every source tile: l_ij = s·ks_i.q̃_j + c_j, -inf where not selectable; stored raw in A while the
       column max m_j and sum z_j = Σ_i exp(l_ij - m_j) are kept online (started from the SELF row, which is
       never masked, so m_j is always finite);
    3. A_ij = exp(l_ij - m_j) / z_j, read back and rewritten in place.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < Tb
    D = P * 2
    column = tl.zeros((BLOCK_J,), dtype=tl.float32)
    own = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for f0 in range(0, P, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        lo, hi, r, f_ok = _pair_columns(offs_f, P, HALF, HD)
        q1, q2, cos, sin = _rotated_query(q_ptr, cos_ptr, sin_ptr, b, offs_j, lo, hi, r, f_ok, Tb, P, HALF)
        rows = (b * Tb + offs_j)[:, None] * D
        jf_ok = j_ok[:, None] & f_ok[None, :]
        kb1 = tl.load(kb_ptr + rows + lo[None, :], mask=jf_ok, other=0.0).to(tl.float32)
        kb2 = tl.load(kb_ptr + rows + hi[None, :], mask=jf_ok, other=0.0).to(tl.float32)
        ko1 = tl.load(kself_ptr + rows + lo[None, :], mask=jf_ok, other=0.0).to(tl.float32)
        ko2 = tl.load(kself_ptr + rows + hi[None, :], mask=jf_ok, other=0.0).to(tl.float32)
        column += tl.sum(q1 * kb1 + q2 * kb2, axis=1)
        own += tl.sum(q1 * ko1 + q2 * ko2, axis=1)
    column = column * scale
    own = own * scale
    base_ok = tl.load(bmask_ptr + b * Tb + offs_j, mask=j_ok, other=0) != 0
    col_max = own
    col_sum = tl.full((BLOCK_J,), 1.0, dtype=tl.float32)
    a_base = out_ptr + b * (Ts + 1) * Tb
    for i0 in range(0, Ts, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_ok = offs_i < Ts
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for f0 in range(0, P, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            lo, hi, r, f_ok = _pair_columns(offs_f, P, HALF, HD)
            q1, q2, cos, sin = _rotated_query(q_ptr, cos_ptr, sin_ptr, b, offs_j, lo, hi, r, f_ok, Tb, P, HALF)
            rows = (b * Ts + offs_i)[:, None] * D
            if_ok = i_ok[:, None] & f_ok[None, :]
            ks1 = tl.load(ks_ptr + rows + lo[None, :], mask=if_ok, other=0.0).to(tl.float32)  # (I, F)
            ks2 = tl.load(ks_ptr + rows + hi[None, :], mask=if_ok, other=0.0).to(tl.float32)
            acc = tl.dot(ks1, tl.trans(q1), acc, input_precision=PREC)
            acc = tl.dot(ks2, tl.trans(q2), acc, input_precision=PREC)
        source_ok = tl.load(smask_ptr + b * Ts + offs_i, mask=i_ok, other=0) != 0
        logits = acc * scale + column[None, :]
        logits = tl.where(source_ok[:, None] & base_ok[None, :], logits, float("-inf"))  # (I, J)
        new_max = tl.maximum(col_max, tl.max(logits, axis=0))
        col_sum = col_sum * tl.exp(col_max - new_max) + tl.sum(tl.exp(logits - new_max[None, :]), axis=0)
        col_max = new_max
        tl.store(a_base + offs_i[:, None] * Tb + offs_j[None, :], logits, mask=i_ok[:, None] & j_ok[None, :])
    tl.debug_barrier()
    inv_sum = 1.0 / col_sum
    for i0 in range(0, Ts, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        ij_ok = (offs_i < Ts)[:, None] & j_ok[None, :]
        ptrs = a_base + offs_i[:, None] * Tb + offs_j[None, :]
        logits = tl.load(ptrs, mask=ij_ok, other=float("-inf"))
        tl.store(ptrs, tl.exp(logits - col_max[None, :]) * inv_sum[None, :], mask=ij_ok)
    tl.store(a_base + Ts * Tb + offs_j, tl.exp(own - col_max) * inv_sum, mask=j_ok)


@triton.jit
def _softmax_bwd_kernel(
    a_ptr,
    da_ptr,
    g_ptr,
    gsum_ptr,
    Ts,
    Tb,
    scale,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Column-softmax backward for one batch row and a tile of columns, with the logit scale folded in.

    G_ij = s · A_ij (dA_ij - Σ_i' A_i'j dA_i'j) over all Ts+1 rows; also gsum_j = Σ_{i<Ts} G_ij.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < Tb
    base = b * (Ts + 1) * Tb
    a_own = tl.load(a_ptr + base + Ts * Tb + offs_j, mask=j_ok, other=0.0)
    da_own = tl.load(da_ptr + base + Ts * Tb + offs_j, mask=j_ok, other=0.0).to(tl.float32)
    inner = a_own * da_own
    for i0 in range(0, Ts, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        ij_ok = (offs_i < Ts)[:, None] & j_ok[None, :]
        idx = base + offs_i[:, None] * Tb + offs_j[None, :]
        a = tl.load(a_ptr + idx, mask=ij_ok, other=0.0)
        da = tl.load(da_ptr + idx, mask=ij_ok, other=0.0).to(tl.float32)
        inner += tl.sum(a * da, axis=0)
    tl.store(g_ptr + base + Ts * Tb + offs_j, scale * a_own * (da_own - inner), mask=j_ok)
    gsum = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for i0 in range(0, Ts, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        ij_ok = (offs_i < Ts)[:, None] & j_ok[None, :]
        idx = base + offs_i[:, None] * Tb + offs_j[None, :]
        a = tl.load(a_ptr + idx, mask=ij_ok, other=0.0)
        da = tl.load(da_ptr + idx, mask=ij_ok, other=0.0).to(tl.float32)
        g = scale * a * (da - inner[None, :])
        tl.store(g_ptr + idx, g, mask=ij_ok)
        gsum += tl.sum(g, axis=0)
    tl.store(gsum_ptr + b * Tb + offs_j, gsum, mask=j_ok)


@triton.jit
def _source_bwd_kernel(
    g_ptr,
    q_ptr,
    cos_ptr,
    sin_ptr,
    dks_ptr,
    Ts,
    Tb,
    P,
    HALF: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_F: tl.constexpr,
    PREC: tl.constexpr,
):
    """d ks_i = Σ_j G_ij q̃_j for a tile of source rows and a tile of RoPE pairs (a (Ts x Tb)(Tb x D) matmul)."""
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_f = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    i_ok = offs_i < Ts
    acc1 = tl.zeros((BLOCK_I, BLOCK_F), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_I, BLOCK_F), dtype=tl.float32)
    lo, hi, r, f_ok = _pair_columns(offs_f, P, HALF, HD)
    for j0 in range(0, Tb, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        q1, q2, cos, sin = _rotated_query(q_ptr, cos_ptr, sin_ptr, b, offs_j, lo, hi, r, f_ok, Tb, P, HALF)
        g_ok = i_ok[:, None] & (offs_j < Tb)[None, :]
        g = tl.load(g_ptr + (b * (Ts + 1) + offs_i)[:, None] * Tb + offs_j[None, :], mask=g_ok, other=0.0)
        acc1 = tl.dot(g, q1, acc1, input_precision=PREC)
        acc2 = tl.dot(g, q2, acc2, input_precision=PREC)
    rows = (b * Ts + offs_i)[:, None] * (P * 2)
    if_ok = i_ok[:, None] & f_ok[None, :]
    tl.store(dks_ptr + rows + lo[None, :], acc1.to(dks_ptr.dtype.element_ty), mask=if_ok)
    tl.store(dks_ptr + rows + hi[None, :], acc2.to(dks_ptr.dtype.element_ty), mask=if_ok)


@triton.jit
def _base_bwd_kernel(
    g_ptr,
    gsum_ptr,
    kb_ptr,
    ks_ptr,
    kself_ptr,
    q_ptr,
    cos_ptr,
    sin_ptr,
    dkb_ptr,
    dkself_ptr,
    dq_ptr,
    Ts,
    Tb,
    P,
    HALF: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_F: tl.constexpr,
    PREC: tl.constexpr,
):
    """Column-side gradients for one batch row and a tile of RoPE pairs, looping over every base column.

    d kb_j = gsum_j q̃_j,  d kself_j = G_Ts,j q̃_j,
    d q̃_j = gsum_j kb_j + G_Ts,j kself_j + Σ_{i<Ts} G_ij ks_i   (a (Tb x Ts)(Ts x D) matmul),
    d q_h = Σ_j RoPE_{p_j - p_q}(d q̃_jh):  dq1 += dq̃1 cos - dq̃2 sin,  dq2 += dq̃2 cos + dq̃1 sin.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    D = P * 2
    dq1 = tl.zeros((BLOCK_F,), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_F,), dtype=tl.float32)
    lo, hi, r, f_ok = _pair_columns(offs_f, P, HALF, HD)
    for j0 in range(0, Tb, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < Tb
        q1, q2, cos, sin = _rotated_query(q_ptr, cos_ptr, sin_ptr, b, offs_j, lo, hi, r, f_ok, Tb, P, HALF)
        acc1 = tl.zeros((BLOCK_J, BLOCK_F), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_J, BLOCK_F), dtype=tl.float32)
        for i0 in range(0, Ts, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_ok = offs_i < Ts
            g_t = tl.load(
                g_ptr + (b * (Ts + 1) + offs_i)[None, :] * Tb + offs_j[:, None],
                mask=j_ok[:, None] & i_ok[None, :],
                other=0.0,
            )  # (J, I) = Gᵀ
            rows = (b * Ts + offs_i)[:, None] * D
            if_ok = i_ok[:, None] & f_ok[None, :]
            ks1 = tl.load(ks_ptr + rows + lo[None, :], mask=if_ok, other=0.0).to(tl.float32)  # (I, F)
            ks2 = tl.load(ks_ptr + rows + hi[None, :], mask=if_ok, other=0.0).to(tl.float32)
            acc1 = tl.dot(g_t, ks1, acc1, input_precision=PREC)
            acc2 = tl.dot(g_t, ks2, acc2, input_precision=PREC)
        g_sum = tl.load(gsum_ptr + b * Tb + offs_j, mask=j_ok, other=0.0)[:, None]  # (J, 1)
        g_own = tl.load(g_ptr + (b * (Ts + 1) + Ts) * Tb + offs_j, mask=j_ok, other=0.0)[:, None]
        rows = (b * Tb + offs_j)[:, None] * D
        jf_ok = j_ok[:, None] & f_ok[None, :]
        kb1 = tl.load(kb_ptr + rows + lo[None, :], mask=jf_ok, other=0.0).to(tl.float32)
        kb2 = tl.load(kb_ptr + rows + hi[None, :], mask=jf_ok, other=0.0).to(tl.float32)
        ko1 = tl.load(kself_ptr + rows + lo[None, :], mask=jf_ok, other=0.0).to(tl.float32)
        ko2 = tl.load(kself_ptr + rows + hi[None, :], mask=jf_ok, other=0.0).to(tl.float32)
        tl.store(dkb_ptr + rows + lo[None, :], (g_sum * q1).to(dkb_ptr.dtype.element_ty), mask=jf_ok)
        tl.store(dkb_ptr + rows + hi[None, :], (g_sum * q2).to(dkb_ptr.dtype.element_ty), mask=jf_ok)
        tl.store(dkself_ptr + rows + lo[None, :], (g_own * q1).to(dkself_ptr.dtype.element_ty), mask=jf_ok)
        tl.store(dkself_ptr + rows + hi[None, :], (g_own * q2).to(dkself_ptr.dtype.element_ty), mask=jf_ok)
        d_rot1 = acc1 + g_sum * kb1 + g_own * ko1  # (J, F)
        d_rot2 = acc2 + g_sum * kb2 + g_own * ko2
        dq1 += tl.sum(d_rot1 * cos - d_rot2 * sin, axis=0)
        dq2 += tl.sum(d_rot2 * cos + d_rot1 * sin, axis=0)
    tl.store(dq_ptr + b * D + lo, dq1.to(dq_ptr.dtype.element_ty), mask=f_ok)
    tl.store(dq_ptr + b * D + hi, dq2.to(dq_ptr.dtype.element_ty), mask=f_ok)


# --------------------------------------------------------------------------------------------------------------
# Launchers: allocate the outputs, launch one kernel each
# --------------------------------------------------------------------------------------------------------------


def _tile(n: int, largest: int) -> int:
    """A power-of-two tile for an axis of length n: at least 16 (tl.dot), at most `largest`."""
    return max(16, min(largest, triton.next_power_of_2(n)))


def _constexprs(Ts: int, Tb: int, hd: int, P: int) -> dict:
    """The kernels' constexprs: half and whole head size, the tile sizes, the dot precision."""
    return dict(
        HALF=hd // 2,
        HD=hd,
        BLOCK_I=_tile(Ts, BLOCK_I_MAX),
        BLOCK_J=_tile(Tb, BLOCK_J_MAX),
        BLOCK_F=_tile(P, BLOCK_F_MAX),
        PREC=_PREC,
    )


def _rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of θ = p·inv_freq in float32, as Hugging Face computes them: (B, Tb, hd/2) each (p may be < 0)."""
    theta = rope_angles(positions, inv_freq, torch.float32)
    return theta.cos().contiguous(), theta.sin().contiguous()


def _launch_forward(kb, ks, kself, q, cos, sin, base_mask, source_mask) -> torch.Tensor:
    """A (B, Ts+1, Tb) float32 from contiguous keys and query and the relative-angle tables."""
    B, Tb, H, hd = kb.shape
    Ts = ks.shape[1]
    cx = _constexprs(Ts, Tb, hd, H * hd // 2)
    scores = common.empty_buffer((B, Ts + 1, Tb), torch.float32, kb.device)
    _selection_fwd_kernel[(B, triton.cdiv(Tb, cx["BLOCK_J"]))](
        kb, ks, kself, q, cos, sin,
        base_mask.to(torch.int8).contiguous(), source_mask.to(torch.int8).contiguous(), scores,
        Ts, Tb, H * hd // 2, 1.0 / (H * math.sqrt(hd)),
        **cx,
    )  # fmt: skip
    return scores


def _launch_softmax_backward(scores, grad_scores, H: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G = s·A ⊙ (dA − Σ_i A dA) (B, Ts+1, Tb) with the logit scale s folded in, and Σ_{i<Ts} G_ij (B, Tb)."""
    B, rows, Tb = scores.shape
    cx = _constexprs(rows - 1, Tb, hd, H * hd // 2)
    grad_logits = common.empty_buffer((B, rows, Tb), torch.float32, scores.device)
    grad_sum = common.empty_buffer((B, Tb), torch.float32, scores.device)
    _softmax_bwd_kernel[(B, triton.cdiv(Tb, cx["BLOCK_J"]))](
        scores, grad_scores.contiguous(), grad_logits, grad_sum, rows - 1, Tb, 1.0 / (H * math.sqrt(hd)),
        BLOCK_I=cx["BLOCK_I"], BLOCK_J=cx["BLOCK_J"],
    )  # fmt: skip
    return grad_logits, grad_sum


def _launch_source_backward(grad_logits, q, cos, sin, ks) -> torch.Tensor:
    """d ks = G[:, :Ts] q̃: (B, Ts, H, hd) in the source keys' dtype."""
    B, Ts, H, hd = ks.shape
    Tb, P = cos.shape[1], H * hd // 2
    cx = _constexprs(Ts, Tb, hd, P)
    d_source = common.empty_buffer(tuple(ks.shape), ks.dtype, ks.device)
    grid = (B, triton.cdiv(Ts, cx["BLOCK_I"]), triton.cdiv(P, cx["BLOCK_F"]))
    _source_bwd_kernel[grid](grad_logits, q, cos, sin, d_source, Ts, Tb, P, **cx)
    return d_source


def _launch_base_backward(grad_logits, grad_sum, kb, ks, kself, q, cos, sin):
    """d kb, d kself (B, Tb, H, hd) and d q (B, H, hd), each in its input's dtype."""
    B, Tb, H, hd = kb.shape
    Ts, P = ks.shape[1], H * hd // 2
    cx = _constexprs(Ts, Tb, hd, P)
    d_base = common.empty_buffer(tuple(kb.shape), kb.dtype, kb.device)
    d_self = common.empty_buffer(tuple(kself.shape), kself.dtype, kb.device)
    d_query = common.empty_buffer(tuple(q.shape), q.dtype, kb.device)
    _base_bwd_kernel[(B, triton.cdiv(P, cx["BLOCK_F"]))](
        grad_logits, grad_sum, kb, ks, kself, q, cos, sin, d_base, d_self, d_query, Ts, Tb, P, **cx
    )
    return d_base, d_self, d_query


# --------------------------------------------------------------------------------------------------------------
# Autograd, functional form, module
# --------------------------------------------------------------------------------------------------------------


class SelectionHeadFunction(torch.autograd.Function):
    """Fused Triton selection head: forward writes A directly; backward never forms a pair tensor.

    Saves A (the output, so no extra memory), the inputs and the (B, Tb, hd/2) cos/sin tables. Backward:
    G = s·A ⊙ (dA − Σ_i A dA) (column softmax, s = 1/(H sqrt(hd))), then d ks = G[:, :Ts] q̃,
    d kb_j = (Σ_{i<Ts} G_ij) q̃_j, d kself_j = G_Ts,j q̃_j, d q = Σ_j RoPE_{p_j - p_q}(d q̃_j) (q before RoPE).
    The only scratch tensors are G (B, Ts+1, Tb) and its column sums (B, Tb). Positions, inv_freq and masks get
    no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        base_keys: torch.Tensor,
        source_keys: torch.Tensor,
        self_keys: torch.Tensor,
        query: torch.Tensor,
        base_positions: torch.Tensor,
        query_positions: torch.Tensor,
        inv_freq: torch.Tensor,
        base_mask: torch.Tensor,
        source_mask: torch.Tensor,
    ) -> torch.Tensor:
        check_inputs(
            base_keys, source_keys, self_keys, query, base_positions, query_positions, inv_freq, base_mask, source_mask
        )
        require_triton("selection head", base_keys, source_keys, self_keys, query)
        kb, ks, kself, q = (t.contiguous() for t in (base_keys, source_keys, self_keys, query))
        cos, sin = _rope_tables(base_positions - query_positions[:, None], inv_freq)  # relative to the query
        scores = _launch_forward(kb, ks, kself, q, cos, sin, base_mask, source_mask)
        ctx.save_for_backward(kb, ks, kself, q, cos, sin, scores)
        return scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores: torch.Tensor):
        kb, ks, kself, q, cos, sin, scores = ctx.saved_tensors
        H, hd = kb.shape[2:]
        needs = ctx.needs_input_grad
        grad_logits, grad_sum = _launch_softmax_backward(scores, grad_scores, H, hd)
        d_source = _launch_source_backward(grad_logits, q, cos, sin, ks) if needs[1] else None
        d_base, d_self, d_query = _launch_base_backward(grad_logits, grad_sum, kb, ks, kself, q, cos, sin)
        return (
            d_base if needs[0] else None,
            d_source,
            d_self if needs[2] else None,
            d_query if needs[3] else None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_selection_head(
    base_keys: torch.Tensor,
    source_keys: torch.Tensor,
    self_keys: torch.Tensor,
    query: torch.Tensor,
    base_positions: torch.Tensor,
    query_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    base_mask: torch.Tensor,
    source_mask: torch.Tensor,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """The selection matrix A (B, Ts+1, Tb), float32, columns summing to 1, without a pair tensor.

    Args:
        base_keys, source_keys, self_keys, query, base_positions, query_positions, inv_freq, base_mask,
            source_mask: as in `selection_head_naive` (selection_head_reference.py).
        use_triton: True forces the fused Triton op (CUDA, or CPU under TRITON_INTERPRET=1), False forces
            `selection_head_torch`; None picks Triton when the keys are on CUDA in a dtype it takes
            (float32, bfloat16, float16), else `selection_head_torch`.
    """
    args = (base_keys, source_keys, self_keys, query, base_positions, query_positions, inv_freq, base_mask, source_mask)
    if choose_triton(use_triton, base_keys, source_keys, self_keys, query):
        return SelectionHeadFunction.apply(*args)
    return selection_head_torch(*args)


class FusedSelectionHead(nn.Module):
    """Drop-in module around `fused_selection_head` (no parameters: the model owns the projections).

    Args:
        use_triton: passed to `fused_selection_head` (None: Triton on CUDA, PyTorch elsewhere).
    """

    def __init__(self, use_triton: bool | None = None) -> None:
        super().__init__()
        check_switch(use_triton)
        self.use_triton = use_triton

    def forward(
        self,
        base_keys: torch.Tensor,
        source_keys: torch.Tensor,
        self_keys: torch.Tensor,
        query: torch.Tensor,
        base_positions: torch.Tensor,
        query_positions: torch.Tensor,
        inv_freq: torch.Tensor,
        base_mask: torch.Tensor,
        source_mask: torch.Tensor,
    ) -> torch.Tensor:
        """A (B, Ts+1, Tb) float32; see `selection_head_naive` for the arguments."""
        return fused_selection_head(
            base_keys,
            source_keys,
            self_keys,
            query,
            base_positions,
            query_positions,
            inv_freq,
            base_mask,
            source_mask,
            use_triton=self.use_triton,
        )

    def extra_repr(self) -> str:
        return f"use_triton={self.use_triton}"
