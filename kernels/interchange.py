"""The interchange intervention ("rotate, project, patch"), fused: Triton kernels, launchers, autograd, module.

For one example, with base states h: (Tb, D), source states S: (Ts, D), selection weights A: (Ts+1, Tb)
(row Ts is SELF, every column sums to 1) and an orthonormal basis W: (D, r):

    M_j  = sum_{i<Ts} A_ij S_i              (a matmul A[:Ts]^T S)
    s~_j = M_j + A_{Ts,j} h_j               (what base position j is moved towards)
    h'_j = h_j + W W^T (s~_j - h_j)         (rotate into the subspace, swap, rotate back)

W may be per example (B, D, r), shared (D, r) (static DAS), or None ("full": h'_j = s~_j). A may be None,
the identity selection (s~_j = S_j, needs Ts == Tb): pyvene's interchange at matching positions.
Where position_mask[b, j] is False, h'_j = h_j exactly and that row sends no gradient to A, S or W.

Backward, with g = dL/dh', diff_j = s~_j - h_j, c_j = W^T diff_j and a_j = A_{Ts,j}:

    dc_j    = W^T g_j                       d diff_j = W dc_j          (= g_j when W is None)
    dW      = sum_j diff_j dc_j^T + g_j c_j^T     (summed over the batch too when W is shared)
    dA_ij   = S_i . d diff_j                dA_{Ts,j} = h_j . d diff_j
    dS_i    = sum_j A_ij d diff_j           dh_j = g_j + (a_j - 1) d diff_j

The fused forward never writes A^T S, the difference or the projection to global memory: per block of base
rows it streams D in chunks twice (once to reduce c = diff W, once to write h + c W^T) and saves only the
coefficients c: (B, Tb, r) in fp32, and only when W needs a gradient. Backward recomputes d diff and diff
tile by tile from the saved c, the inputs and dc: (B, Tb, r). All accumulation is fp32; in bf16/fp16 the
dot operands (A, the fp32 tiles and W) are rounded to the input dtype so that tensor cores do the matmuls.
The kernels' mode switches are constexprs: WEIGHTED (s~ = A^T S + A_self h; False: the identity selection),
PROJECT (a basis W is given), HAS_MASK. The plain PyTorch reference is in interchange_reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hyperdas.kernels import common
from hyperdas.kernels.common import check_switch, choose_triton, dot_constexprs, require_triton
from hyperdas.kernels.interchange_reference import check_inputs, interchange_reference

# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, cols, stride_r, stride_c, rows_ok, cols_ok):
    """base[rows, cols]: (len(rows), len(cols)), zero outside rows_ok x cols_ok."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def _store_tile(base, rows, cols, stride_r, stride_c, rows_ok, cols_ok, value):
    """base[rows, cols] = value, rounded to base's element type, inside rows_ok x cols_ok."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])


@triton.jit
def _kept_rows(m_base, rows, row_ok, stride_mt, HAS_MASK: tl.constexpr):
    """Rows that are in range and (HAS_MASK) kept by position_mask."""
    keep = row_ok
    if HAS_MASK:
        keep = keep & (tl.load(m_base + rows * stride_mt, mask=row_ok, other=0) != 0)
    return keep


@triton.jit
def _mixed_tile(
    h_tile, s_base, a_base, rows, row_ok, cols, col_ok, Ts, stride_st, stride_sd, stride_ai, stride_at,
    WEIGHTED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """s~ for base rows x feature cols, fp32 (BLOCK_T, BLOCK_D): A^T S + A_self h, or S[rows] (identity)."""
    if WEIGHTED:
        mixed = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for i0 in range(0, Ts, BLOCK_S):
            src = i0 + tl.arange(0, BLOCK_S)
            src_ok = src < Ts
            a = _load_tile(a_base, rows, src, stride_at, stride_ai, row_ok, src_ok)  # A[src, rows]^T: (T, S)
            s = _load_tile(s_base, src, cols, stride_st, stride_sd, src_ok, col_ok)  # S[src, cols]: (S, D)
            mixed = tl.dot(a.to(DOT), s.to(DOT), mixed, input_precision=PREC)
        a_self = tl.load(a_base + Ts * stride_ai + rows * stride_at, mask=row_ok, other=0.0).to(tl.float32)
        mixed += a_self[:, None] * h_tile
    else:
        mixed = _load_tile(s_base, rows, cols, stride_st, stride_sd, row_ok, col_ok).to(tl.float32)
    return mixed


@triton.jit
def _interchange_fwd_kernel(
    h_ptr, s_ptr, a_ptr, w_ptr, m_ptr, out_ptr, c_ptr,
    Tb, Ts, D, R,
    stride_hb, stride_ht, stride_hd,
    stride_sb, stride_st, stride_sd,
    stride_ab, stride_ai, stride_at,
    stride_wb, stride_wd, stride_wr,
    stride_mb, stride_mt,
    stride_ob, stride_ot, stride_od,
    stride_cb, stride_ct, stride_cr,
    WEIGHTED: tl.constexpr, PROJECT: tl.constexpr, HAS_MASK: tl.constexpr, STORE_C: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, R_PAD: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One block of base rows of one example: h' = h + (s~ - h) W W^T, or h' = s~ without W.

    Pass 1 over D reduces c = (s~ - h) W: (BLOCK_T, r) and, when W's gradient will be needed, stores it
    (fp32, zero on masked rows); pass 2 writes h + c W^T. Masked rows (position_mask False) copy h.
    """
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < Tb
    keep = _kept_rows(m_ptr + b * stride_mb, rows, row_ok, stride_mt, HAS_MASK)
    h_base = h_ptr + b * stride_hb
    s_base = s_ptr + b * stride_sb
    a_base = a_ptr + b * stride_ab
    w_base = w_ptr + b * stride_wb
    o_base = out_ptr + b * stride_ob
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    coeff = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    if PROJECT:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            h_tile = _load_tile(h_base, rows, cols, stride_ht, stride_hd, row_ok, col_ok).to(tl.float32)
            mixed = _mixed_tile(
                h_tile, s_base, a_base, rows, row_ok, cols, col_ok, Ts, stride_st, stride_sd, stride_ai, stride_at,
                WEIGHTED, BLOCK_S, BLOCK_T, BLOCK_D, DOT, PREC,
            )  # fmt: skip
            w = _load_tile(w_base, cols, ranks, stride_wd, stride_wr, col_ok, rank_ok)  # W[cols]: (D, R_PAD)
            coeff = tl.dot((mixed - h_tile).to(DOT), w.to(DOT), coeff, input_precision=PREC)
        coeff = tl.where(keep[:, None], coeff, 0.0)
        if STORE_C:
            _store_tile(c_ptr + b * stride_cb, rows, ranks, stride_ct, stride_cr, row_ok, rank_ok, coeff)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        h_raw = _load_tile(h_base, rows, cols, stride_ht, stride_hd, row_ok, col_ok)
        if PROJECT:
            w_t = _load_tile(w_base, ranks, cols, stride_wr, stride_wd, rank_ok, col_ok)  # W[cols]^T: (R_PAD, D)
            new = h_raw.to(tl.float32) + tl.dot(coeff.to(DOT), w_t.to(DOT), input_precision=PREC)
        else:
            new = _mixed_tile(
                h_raw.to(tl.float32), s_base, a_base, rows, row_ok, cols, col_ok, Ts,
                stride_st, stride_sd, stride_ai, stride_at, WEIGHTED, BLOCK_S, BLOCK_T, BLOCK_D, DOT, PREC,
            )  # fmt: skip
        out = tl.where(keep[:, None], new, h_raw)
        _store_tile(o_base, rows, cols, stride_ot, stride_od, row_ok, col_ok, out)


@triton.jit
def _ddiff_tile(
    g_base, w_base, dc, rows, row_ok, keep, cols, col_ok, ranks, rank_ok,
    stride_gt, stride_gd, stride_wd, stride_wr,
    PROJECT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """d diff for base rows x feature cols, fp32: dc W^T (dc is zero on masked rows), or g where kept."""
    if PROJECT:
        w_t = _load_tile(w_base, ranks, cols, stride_wr, stride_wd, rank_ok, col_ok)
        ddiff = tl.dot(dc.to(DOT), w_t.to(DOT), input_precision=PREC)
    else:
        g = _load_tile(g_base, rows, cols, stride_gt, stride_gd, row_ok, col_ok).to(tl.float32)
        ddiff = tl.where(keep[:, None], g, 0.0)
    return ddiff


@triton.jit
def _interchange_bwd_rows_kernel(
    g_ptr, h_ptr, s_ptr, a_ptr, w_ptr, m_ptr, dc_ptr, dh_ptr, ds_ptr, da_ptr,
    Tb, Ts, D, R,
    stride_gb, stride_gt, stride_gd,
    stride_hb, stride_ht, stride_hd,
    stride_sb, stride_st, stride_sd,
    stride_ab, stride_ai, stride_at,
    stride_wb, stride_wd, stride_wr,
    stride_mb, stride_mt,
    stride_cb, stride_ct, stride_cr,
    stride_dsb, stride_dst, stride_dsd,
    stride_dab, stride_dai, stride_dat,
    WEIGHTED: tl.constexpr, PROJECT: tl.constexpr, HAS_MASK: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DS: tl.constexpr, NEED_DA: tl.constexpr, STORE_DC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, R_PAD: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Backward for one block of base rows: dc = g W (stored), dh, dA[:, rows] and (identity) dS.

    dh_j = g_j + (a_j - 1) d diff_j; dA_ij = S_i . d diff_j and dA_{Ts,j} = h_j . d diff_j, reduced over
    D; with the identity selection dS_j = d diff_j. dh shares g's strides (both contiguous).
    """
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < Tb
    keep = _kept_rows(m_ptr + b * stride_mb, rows, row_ok, stride_mt, HAS_MASK)
    g_base = g_ptr + b * stride_gb
    h_base = h_ptr + b * stride_hb
    s_base = s_ptr + b * stride_sb
    a_base = a_ptr + b * stride_ab
    w_base = w_ptr + b * stride_wb
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    dc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    if PROJECT:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            g = _load_tile(g_base, rows, cols, stride_gt, stride_gd, row_ok, col_ok)
            w = _load_tile(w_base, cols, ranks, stride_wd, stride_wr, col_ok, rank_ok)
            dc = tl.dot(g.to(DOT), w.to(DOT), dc, input_precision=PREC)
        dc = tl.where(keep[:, None], dc, 0.0)
        if STORE_DC:
            _store_tile(dc_ptr + b * stride_cb, rows, ranks, stride_ct, stride_cr, row_ok, rank_ok, dc)
    if WEIGHTED:
        a_self = tl.load(a_base + Ts * stride_ai + rows * stride_at, mask=row_ok, other=0.0).to(tl.float32)
    else:
        a_self = tl.zeros((BLOCK_T,), dtype=tl.float32)
    da_self = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if NEED_DH or (NEED_DA and WEIGHTED) or (NEED_DS and not WEIGHTED):
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            ddiff = _ddiff_tile(
                g_base, w_base, dc, rows, row_ok, keep, cols, col_ok, ranks, rank_ok,
                stride_gt, stride_gd, stride_wd, stride_wr, PROJECT, DOT, PREC,
            )  # fmt: skip
            if NEED_DH:
                g = _load_tile(g_base, rows, cols, stride_gt, stride_gd, row_ok, col_ok).to(tl.float32)
                dh = g + (a_self[:, None] - 1.0) * ddiff
                _store_tile(dh_ptr + b * stride_gb, rows, cols, stride_gt, stride_gd, row_ok, col_ok, dh)
            if NEED_DA and WEIGHTED:
                h_tile = _load_tile(h_base, rows, cols, stride_ht, stride_hd, row_ok, col_ok).to(tl.float32)
                da_self += tl.sum(h_tile * ddiff, axis=1)
            if NEED_DS and not WEIGHTED:
                _store_tile(ds_ptr + b * stride_dsb, rows, cols, stride_dst, stride_dsd, row_ok, col_ok, ddiff)
    if NEED_DA and WEIGHTED:
        da_base = da_ptr + b * stride_dab
        tl.store(da_base + Ts * stride_dai + rows * stride_dat, da_self.to(da_ptr.dtype.element_ty), mask=row_ok)
        for i0 in range(0, Ts, BLOCK_S):
            src = i0 + tl.arange(0, BLOCK_S)
            src_ok = src < Ts
            da = tl.zeros((BLOCK_S, BLOCK_T), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                ddiff = _ddiff_tile(
                    g_base, w_base, dc, rows, row_ok, keep, cols, col_ok, ranks, rank_ok,
                    stride_gt, stride_gd, stride_wd, stride_wr, PROJECT, DOT, PREC,
                )  # fmt: skip
                s = _load_tile(s_base, src, cols, stride_st, stride_sd, src_ok, col_ok)
                da = tl.dot(s.to(DOT), tl.trans(ddiff.to(DOT)), da, input_precision=PREC)
            _store_tile(da_base, src, rows, stride_dai, stride_dat, src_ok, row_ok, da)


@triton.jit
def _interchange_bwd_source_kernel(
    g_ptr, a_ptr, w_ptr, m_ptr, dc_ptr, ds_ptr,
    Tb, Ts, D, R,
    stride_gb, stride_gt, stride_gd,
    stride_ab, stride_ai, stride_at,
    stride_wb, stride_wd, stride_wr,
    stride_mb, stride_mt,
    stride_cb, stride_ct, stride_cr,
    stride_dsb, stride_dst, stride_dsd,
    PROJECT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, R_PAD: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dS[src, cols] = sum_j A[src, j] d diff_j[cols], reduced over base rows j in blocks (weighted mode)."""
    b = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    src = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    src_ok = src < Ts
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    g_base = g_ptr + b * stride_gb
    a_base = a_ptr + b * stride_ab
    w_base = w_ptr + b * stride_wb
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, Tb, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < Tb
        keep = _kept_rows(m_ptr + b * stride_mb, rows, row_ok, stride_mt, HAS_MASK)
        if PROJECT:
            dc = _load_tile(dc_ptr + b * stride_cb, rows, ranks, stride_ct, stride_cr, row_ok, rank_ok)
        else:
            dc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
        ddiff = _ddiff_tile(
            g_base, w_base, dc, rows, row_ok, keep, cols, col_ok, ranks, rank_ok,
            stride_gt, stride_gd, stride_wd, stride_wr, PROJECT, DOT, PREC,
        )  # fmt: skip
        a = _load_tile(a_base, src, rows, stride_ai, stride_at, src_ok, row_ok)  # A[src, rows]: (S, T)
        acc = tl.dot(a.to(DOT), ddiff.to(DOT), acc, input_precision=PREC)
    _store_tile(ds_ptr + b * stride_dsb, src, cols, stride_dst, stride_dsd, src_ok, col_ok, acc)


@triton.jit
def _interchange_bwd_weight_kernel(
    g_ptr, h_ptr, s_ptr, a_ptr, c_ptr, dc_ptr, dw_ptr,
    Tb, Ts, D, R,
    stride_gb, stride_gt, stride_gd,
    stride_hb, stride_ht, stride_hd,
    stride_sb, stride_st, stride_sd,
    stride_ab, stride_ai, stride_at,
    stride_cb, stride_ct, stride_cr,
    stride_vb, stride_vd, stride_vr,
    WEIGHTED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, R_PAD: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dW[b, cols] = sum_j diff_j[cols] dc_j^T + g_j[cols] c_j^T, reduced over base rows in blocks.

    c and dc are zero on masked rows, so those rows add nothing. One fp32 partial per example; the
    launcher sums them over the batch for a shared W.
    """
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    g_base = g_ptr + b * stride_gb
    h_base = h_ptr + b * stride_hb
    s_base = s_ptr + b * stride_sb
    a_base = a_ptr + b * stride_ab
    acc = tl.zeros((BLOCK_D, R_PAD), dtype=tl.float32)
    for t0 in range(0, Tb, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < Tb
        h_tile = _load_tile(h_base, rows, cols, stride_ht, stride_hd, row_ok, col_ok).to(tl.float32)
        mixed = _mixed_tile(
            h_tile, s_base, a_base, rows, row_ok, cols, col_ok, Ts, stride_st, stride_sd, stride_ai, stride_at,
            WEIGHTED, BLOCK_S, BLOCK_T, BLOCK_D, DOT, PREC,
        )  # fmt: skip
        g = _load_tile(g_base, rows, cols, stride_gt, stride_gd, row_ok, col_ok)
        coeff = _load_tile(c_ptr + b * stride_cb, rows, ranks, stride_ct, stride_cr, row_ok, rank_ok)
        dc = _load_tile(dc_ptr + b * stride_cb, rows, ranks, stride_ct, stride_cr, row_ok, rank_ok)
        acc = tl.dot(tl.trans((mixed - h_tile).to(DOT)), dc.to(DOT), acc, input_precision=PREC)
        acc = tl.dot(tl.trans(g.to(DOT)), coeff.to(DOT), acc, input_precision=PREC)
    _store_tile(dw_ptr + b * stride_vb, cols, ranks, stride_vd, stride_vr, col_ok, rank_ok, acc)


# --------------------------------------------------------------------------------------------------------------
# Launchers: allocate the outputs, pick the tiles, launch one kernel each
# --------------------------------------------------------------------------------------------------------------


def _tiles(Tb: int, Ts: int, r: int, dtype: torch.dtype) -> tuple[dict, int]:
    """The kernels' tile and dot constexprs, and the warp count, for Tb base rows, Ts sources, rank r.

    Dot operands need >= 16 per side; r is padded to a power of two >= 16. At r = 128 on sm_90 with 8 warps
    (checked with ptxas -v), 32 base rows x 64 features per tile keeps the bf16/fp16 kernels free of register
    spills (64 rows spill); exact fp32 dots need 32-feature tiles.
    """
    r_pad = max(16, triton.next_power_of_2(r)) if r else 16
    tiles = dict(
        BLOCK_T=16 if Tb <= 16 else 32,
        BLOCK_D=32 if dtype == torch.float32 and r_pad >= 64 else 64,
        BLOCK_S=16 if Ts <= 16 else 32,
        R_PAD=r_pad,
        **dot_constexprs(dtype),
    )
    return tiles, 8 if r_pad >= 64 else 4


def _rank(W: torch.Tensor | None) -> int:
    return W.shape[-1] if W is not None else 0


def _operands(h: torch.Tensor, A: torch.Tensor | None, W: torch.Tensor | None, mask: torch.Tensor | None):
    """A, W and the uint8 mask with their strides; an absent one is replaced by h with zero strides (never read).

    W's strides are (batch, D, r); a shared (D, r) basis gets batch stride 0.
    """
    a_strides = A.stride() if A is not None else (0, 0, 0)
    if W is None:
        w_strides = (0, 0, 0)
    else:
        w_strides = W.stride() if W.dim() == 3 else (0, *W.stride())
    m_strides = mask.stride() if mask is not None else (0, 0)
    return (
        (A if A is not None else h, a_strides),
        (W if W is not None else h, w_strides),
        (mask if mask is not None else h, m_strides),
    )


def _strides(t: torch.Tensor | None, rank: int = 3) -> tuple[int, ...]:
    return t.stride() if t is not None else (0,) * rank


def _launch_forward(h, S, A, W, mask, store_c: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h' (B, Tb, D) in h's dtype and, when store_c, the fp32 coefficients c = (s~ - h) W: (B, Tb, r)."""
    B, Tb, D = h.shape
    tiles, num_warps = _tiles(Tb, S.shape[1], _rank(W), h.dtype)
    (a, a_st), (w, w_st), (m, m_st) = _operands(h, A, W, mask)
    out = common.empty_buffer((B, Tb, D), h.dtype, h.device)
    coeff = common.empty_buffer((B, Tb, _rank(W)), torch.float32, h.device) if store_c else None
    _interchange_fwd_kernel[(triton.cdiv(Tb, tiles["BLOCK_T"]), B)](
        h, S, a, w, m, out, coeff if store_c else h,
        Tb, S.shape[1], D, _rank(W),
        *h.stride(), *S.stride(), *a_st, *w_st, *m_st, *out.stride(), *_strides(coeff),
        WEIGHTED=A is not None, PROJECT=W is not None, HAS_MASK=mask is not None, STORE_C=store_c,
        **tiles, num_warps=num_warps,
    )  # fmt: skip
    return out, coeff


def _launch_backward_rows(g, h, S, A, W, mask, need_dh: bool, need_ds: bool, need_da: bool, store_dc: bool):
    """dh (B, Tb, D), dA (B, Ts+1, Tb), dS with the identity selection (else only allocated: the source
    kernel writes it) and dc = g W: (B, Tb, r) fp32 when store_dc; None where not needed."""
    B, Tb, D = h.shape
    tiles, num_warps = _tiles(Tb, S.shape[1], _rank(W), h.dtype)
    (a, a_st), (w, w_st), (m, m_st) = _operands(h, A, W, mask)
    dh = common.empty_buffer((B, Tb, D), h.dtype, h.device) if need_dh else None
    dS = common.empty_buffer(tuple(S.shape), S.dtype, S.device) if need_ds else None
    dA = common.empty_buffer(tuple(A.shape), A.dtype, A.device) if need_da else None
    dc = common.empty_buffer((B, Tb, _rank(W)), torch.float32, h.device) if store_dc else None
    _interchange_bwd_rows_kernel[(triton.cdiv(Tb, tiles["BLOCK_T"]), B)](
        g, h, S, a, w, m,
        dc if dc is not None else g, dh if dh is not None else g,
        dS if dS is not None else g, dA if dA is not None else g,
        Tb, S.shape[1], D, _rank(W),
        *g.stride(), *h.stride(), *S.stride(), *a_st, *w_st, *m_st, *_strides(dc), *_strides(dS), *_strides(dA),
        WEIGHTED=A is not None, PROJECT=W is not None, HAS_MASK=mask is not None,
        NEED_DH=need_dh, NEED_DS=need_ds, NEED_DA=need_da, STORE_DC=store_dc,
        **tiles, num_warps=num_warps,
    )  # fmt: skip
    return dh, dS, dA, dc


def _launch_backward_source(g, h, S, A, W, mask, dc, dS) -> None:
    """Write dS = A[:Ts] d diff (weighted selection) into dS, reduced over the base rows."""
    B, Tb, D = h.shape
    Ts = S.shape[1]
    tiles, num_warps = _tiles(Tb, Ts, _rank(W), h.dtype)
    _, (w, w_st), (m, m_st) = _operands(h, A, W, mask)
    grid = (triton.cdiv(D, tiles["BLOCK_D"]), triton.cdiv(Ts, tiles["BLOCK_S"]), B)
    _interchange_bwd_source_kernel[grid](
        g, A, w, m, dc if dc is not None else g, dS,
        Tb, Ts, D, _rank(W),
        *g.stride(), *A.stride(), *w_st, *m_st, *_strides(dc), *dS.stride(),
        PROJECT=W is not None, HAS_MASK=mask is not None,
        **tiles, num_warps=num_warps,
    )  # fmt: skip


def _launch_backward_weight(g, h, S, A, W, coeff, dc) -> torch.Tensor:
    """dW in W's dtype: one fp32 partial per example, summed over the batch for a shared (D, r) basis."""
    B, Tb, D = h.shape
    r = _rank(W)
    tiles, num_warps = _tiles(Tb, S.shape[1], r, h.dtype)
    (a, a_st), _, _ = _operands(h, A, W, None)
    partial = common.empty_buffer((B, D, r), torch.float32, h.device)
    _interchange_bwd_weight_kernel[(triton.cdiv(D, tiles["BLOCK_D"]), B)](
        g, h, S, a, coeff, dc, partial,
        Tb, S.shape[1], D, r,
        *g.stride(), *h.stride(), *S.stride(), *a_st, *coeff.stride(), *partial.stride(),
        WEIGHTED=A is not None,
        **tiles, num_warps=num_warps,
    )  # fmt: skip
    return (partial if W.dim() == 3 else partial.sum(0)).to(W.dtype)


# --------------------------------------------------------------------------------------------------------------
# Autograd, functional form, module
# --------------------------------------------------------------------------------------------------------------


class InterchangeFunction(torch.autograd.Function):
    """Fused Triton interchange with a fused Triton backward (see the module docstring for the math).

    apply(h, S, A, W, position_mask) with A or W possibly None; h, S: fp32, bf16 or fp16. Saves the inputs
    and, when W needs a gradient, the fp32 coefficients c = (s~ - h) W: (B, Tb, r); nothing of size
    (B, Tb, D) beyond the inputs.
    """

    @staticmethod
    def forward(ctx, h, S, A, W, position_mask):
        check_inputs(h, S, A, W, position_mask)
        require_triton("interchange", h)
        mask = position_mask.view(torch.uint8) if position_mask is not None else None
        store_c = W is not None and ctx.needs_input_grad[3]  # c is read only by dW's kernel
        out, coeff = _launch_forward(h, S, A, W, mask, store_c)
        ctx.save_for_backward(h, S, A, W, mask, coeff)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, S, A, W, mask, coeff = ctx.saved_tensors
        need_dh, need_ds, need_da, need_dw, _ = ctx.needs_input_grad
        need_da = need_da and A is not None
        need_dw = need_dw and W is not None
        weighted_ds = need_ds and A is not None  # dS is then a reduction over base rows: its own kernel
        g = grad_out.to(h.dtype).contiguous()
        store_dc = W is not None and (need_dw or weighted_ds)
        dh, dS, dA, dc = _launch_backward_rows(g, h, S, A, W, mask, need_dh, need_ds, need_da, store_dc)
        if weighted_ds:
            _launch_backward_source(g, h, S, A, W, mask, dc, dS)
        dW = _launch_backward_weight(g, h, S, A, W, coeff, dc) if need_dw else None
        return dh, dS, dA, dW, None


def interchange(
    h: torch.Tensor,
    S: torch.Tensor,
    A: torch.Tensor | None,
    W: torch.Tensor | None = None,
    position_mask: torch.Tensor | None = None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Interchange intervention h' = h + W W^T (A^T S + A_self h - h), fused where possible.

    Args:
        h: (B, Tb, D) raw base states (fp32, bf16, fp16; fp64 runs the reference).
        S: (B, Ts, D) raw source states, h's dtype.
        A: (B, Ts+1, Tb) selection weights (row Ts = SELF, columns sum to 1), or None for the identity
            selection (s~_j = S_j, Ts == Tb).
        W: (B, D, r) per-example orthonormal basis, (D, r) shared, or None to patch the whole vector.
        position_mask: (B, Tb) bool; where False, h'_j = h_j and no gradient flows from row j to A, S, W.
        use_triton: True forces the Triton kernels (on CPU they need TRITON_INTERPRET=1), False the PyTorch
            reference; None picks Triton for CUDA tensors of a supported dtype.

    Returns:
        h': (B, Tb, D) in h's dtype.
    """
    if choose_triton(use_triton, h):
        return InterchangeFunction.apply(h, S, A, W, position_mask)
    return interchange_reference(h, S, A, W, position_mask)


class Interchange(torch.nn.Module):
    """nn.Module form of :func:`interchange` (stateless; the basis W comes from the subspace module).

    Args:
        use_triton: as in :func:`interchange`: None = Triton on CUDA, the reference elsewhere.
    """

    def __init__(self, use_triton: bool | None = None) -> None:
        super().__init__()
        check_switch(use_triton)
        self.use_triton = use_triton

    def forward(
        self,
        h: torch.Tensor,
        S: torch.Tensor,
        A: torch.Tensor | None,
        W: torch.Tensor | None = None,
        position_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h: (B, Tb, D), S: (B, Ts, D), A: (B, Ts+1, Tb) or None, W: (B, D, r), (D, r) or None -> (B, Tb, D)."""
        return interchange(h, S, A, W, position_mask, use_triton=self.use_triton)

    def extra_repr(self) -> str:
        return f"use_triton={self.use_triton}"
