"""The interchange intervention ("rotate, project, patch"), fused: reference, Triton kernels, autograd.

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
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is a declared dependency, but some platforms have no wheel
    HAS_TRITON = False

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Selection modes of the kernels (tl.constexpr): s~ = S at the same position, or s~ = A^T S + A_self h.
_IDENTITY = 0
_WEIGHTED = 1


def _check_inputs(
    h: torch.Tensor,
    S: torch.Tensor,
    A: torch.Tensor | None,
    W: torch.Tensor | None,
    position_mask: torch.Tensor | None,
) -> None:
    """Raise a ValueError naming the bad argument when shapes, dtypes or devices do not fit together."""
    if h.dim() != 3:
        raise ValueError(f"h must be (B, Tb, D), got shape {tuple(h.shape)}")
    B, Tb, D = h.shape
    if S.dim() != 3 or S.shape[0] != B or S.shape[2] != D:
        raise ValueError(f"S must be (B={B}, Ts, D={D}) to match h {tuple(h.shape)}, got {tuple(S.shape)}")
    Ts = S.shape[1]
    if A is None:
        if Ts != Tb:
            raise ValueError(f"A=None (identity selection) needs Ts == Tb, got S {tuple(S.shape)}, h {tuple(h.shape)}")
    elif tuple(A.shape) != (B, Ts + 1, Tb):
        raise ValueError(f"A must be (B, Ts+1, Tb) = {(B, Ts + 1, Tb)} (row Ts is SELF), got {tuple(A.shape)}")
    if W is not None and not (
        (W.dim() == 3 and W.shape[0] == B and W.shape[1] == D) or (W.dim() == 2 and W.shape[0] == D)
    ):
        raise ValueError(f"W must be (B={B}, D={D}, r), shared (D={D}, r) or None (full), got {tuple(W.shape)}")
    if position_mask is not None and (position_mask.dtype != torch.bool or tuple(position_mask.shape) != (B, Tb)):
        raise ValueError(
            f"position_mask must be a bool tensor of shape (B, Tb) = {(B, Tb)}, "
            f"got {position_mask.dtype} {tuple(position_mask.shape)}"
        )
    if S.dtype != h.dtype:
        raise ValueError(f"S must have h's dtype {h.dtype}, got {S.dtype}")
    for name, t in (("S", S), ("A", A), ("W", W), ("position_mask", position_mask)):
        if t is not None and t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}; put all inputs on one device")
        if t is not None and name in ("A", "W") and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def interchange_reference(
    h: torch.Tensor,
    S: torch.Tensor,
    A: torch.Tensor | None,
    W: torch.Tensor | None = None,
    position_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The interchange intervention in plain PyTorch: the readable oracle for the fused kernels.

    s~ = A[:, :Ts]^T S + A[:, Ts] * h, then h' = h + (s~ - h) W W^T (or h' = s~ when W is None). Computes in
    fp32 (fp64 if any input is fp64) with batched matmuls; never forms (B, Ts, Tb, D) or (B, D, D).

    Args:
        h: (B, Tb, D) raw base states.
        S: (B, Ts, D) raw source states, h's dtype.
        A: (B, Ts+1, Tb) selection weights, row Ts = SELF; None = identity selection (s~_j = S_j, Ts == Tb).
        W: (B, D, r) per-example orthonormal basis, (D, r) shared, or None to patch the whole vector.
        position_mask: (B, Tb) bool; where False the base state is returned unchanged.

    Returns:
        h': (B, Tb, D) in h's dtype.
    """
    _check_inputs(h, S, A, W, position_mask)
    inputs = [t for t in (h, S, A, W) if t is not None]
    compute = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    hf, Sf = h.to(compute), S.to(compute)
    if A is None:
        mixed = Sf
    else:
        Ts = S.shape[1]
        Af = A.to(compute)
        mixed = torch.bmm(Af[:, :Ts].transpose(1, 2), Sf) + Af[:, Ts, :, None] * hf  # s~: (B, Tb, D)
    if W is None:
        out = mixed
    else:
        Wf = W.to(compute)
        coeff = torch.matmul(mixed - hf, Wf)  # c: (B, Tb, r)
        out = hf + torch.matmul(coeff, Wf.transpose(-1, -2))
    if position_mask is not None:
        out = torch.where(position_mask[..., None], out, hf)
    return out.to(h.dtype)


if HAS_TRITON:

    @triton.jit
    def _mixed_tile(
        h_tile,
        s_base,
        a_base,
        rows,
        row_ok,
        cols,
        col_ok,
        Ts,
        stride_st,
        stride_sd,
        stride_ai,
        stride_at,
        SELECT: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """s~ for base rows x feature cols, fp32 (BLOCK_T, BLOCK_D): S[rows] (identity) or A^T S + A_self h."""
        if SELECT == 0:
            s_ptrs = s_base + rows[:, None] * stride_st + cols[None, :] * stride_sd
            mixed = tl.load(s_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        else:
            mixed = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for i0 in range(0, Ts, BLOCK_S):
                src = i0 + tl.arange(0, BLOCK_S)
                src_ok = src < Ts
                # A[src, rows]^T: (BLOCK_T, BLOCK_S); S[src, cols]: (BLOCK_S, BLOCK_D)
                a = tl.load(
                    a_base + src[None, :] * stride_ai + rows[:, None] * stride_at,
                    mask=row_ok[:, None] & src_ok[None, :],
                    other=0.0,
                )
                s = tl.load(
                    s_base + src[:, None] * stride_st + cols[None, :] * stride_sd,
                    mask=src_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                mixed = tl.dot(a.to(DOT), s.to(DOT), mixed, input_precision=PREC)
            a_self = tl.load(a_base + Ts * stride_ai + rows * stride_at, mask=row_ok, other=0.0).to(tl.float32)
            mixed += a_self[:, None] * h_tile
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
        SELECT: tl.constexpr, PROJECT: tl.constexpr, HAS_MASK: tl.constexpr, STORE_C: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, R_PAD: tl.constexpr,
        DOT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One block of base rows of one example: h' = h + (s~ - h) W W^T, or h' = s~ without W.

        Pass 1 over D reduces c = (s~ - h) W: (BLOCK_T, r) and, when W's gradient will be needed, stores it
        (fp32, zero on masked rows); pass 2 writes h + c W^T. Masked rows (position_mask False) copy h.
        """
        pid_t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < Tb
        keep = row_ok
        if HAS_MASK:
            keep = keep & (tl.load(m_ptr + b * stride_mb + rows * stride_mt, mask=row_ok, other=0) != 0)
        h_base = h_ptr + b * stride_hb
        s_base = s_ptr + b * stride_sb
        a_base = a_ptr + b * stride_ab
        w_base = w_ptr + b * stride_wb
        o_base = out_ptr + b * stride_ob
        if PROJECT:
            ranks = tl.arange(0, R_PAD)
            rank_ok = ranks < R
            coeff = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                tile_ok = row_ok[:, None] & col_ok[None, :]
                h_tile = tl.load(
                    h_base + rows[:, None] * stride_ht + cols[None, :] * stride_hd, mask=tile_ok, other=0.0
                ).to(tl.float32)
                mixed = _mixed_tile(
                    h_tile, s_base, a_base, rows, row_ok, cols, col_ok, Ts,
                    stride_st, stride_sd, stride_ai, stride_at,
                    SELECT, BLOCK_S, BLOCK_T, BLOCK_D, DOT, PREC,
                )  # fmt: skip
                w = tl.load(
                    w_base + cols[:, None] * stride_wd + ranks[None, :] * stride_wr,
                    mask=col_ok[:, None] & rank_ok[None, :],
                    other=0.0,
                )  # W[cols]: (BLOCK_D, R_PAD)
                coeff = tl.dot((mixed - h_tile).to(DOT), w.to(DOT), coeff, input_precision=PREC)
            coeff = tl.where(keep[:, None], coeff, 0.0)
            if STORE_C:
                tl.store(
                    c_ptr + b * stride_cb + rows[:, None] * stride_ct + ranks[None, :] * stride_cr,
                    coeff,
                    mask=row_ok[:, None] & rank_ok[None, :],
                )
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                tile_ok = row_ok[:, None] & col_ok[None, :]
                h_raw = tl.load(h_base + rows[:, None] * stride_ht + cols[None, :] * stride_hd, mask=tile_ok)
                w_t = tl.load(
                    w_base + cols[None, :] * stride_wd + ranks[:, None] * stride_wr,
                    mask=rank_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )  # W[cols]^T: (R_PAD, BLOCK_D)
                proj = tl.dot(coeff.to(DOT), w_t.to(DOT), input_precision=PREC)
                out = tl.where(keep[:, None], h_raw.to(tl.float32) + proj, h_raw)
                tl.store(
                    o_base + rows[:, None] * stride_ot + cols[None, :] * stride_od,
                    out.to(out_ptr.dtype.element_ty),
                    mask=tile_ok,
                )
        else:
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                tile_ok = row_ok[:, None] & col_ok[None, :]
                h_raw = tl.load(h_base + rows[:, None] * stride_ht + cols[None, :] * stride_hd, mask=tile_ok)
                mixed = _mixed_tile(
                    h_raw.to(tl.float32), s_base, a_base, rows, row_ok, cols, col_ok, Ts,
                    stride_st, stride_sd, stride_ai, stride_at,
                    SELECT, BLOCK_S, BLOCK_T, BLOCK_D, DOT, PREC,
                )  # fmt: skip
                out = tl.where(keep[:, None], mixed, h_raw)
                tl.store(
                    o_base + rows[:, None] * stride_ot + cols[None, :] * stride_od,
                    out.to(out_ptr.dtype.element_ty),
                    mask=tile_ok,
                )

    @triton.jit
    def _ddiff_tile(
        g_base, w_base, dc, rows, row_ok, keep, cols, col_ok, ranks, rank_ok,
        stride_gt, stride_gd, stride_wd, stride_wr,
        PROJECT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """d diff for base rows x feature cols, fp32: dc W^T (dc is zero on masked rows), or g where kept."""
        if PROJECT:
            w_t = tl.load(
                w_base + cols[None, :] * stride_wd + ranks[:, None] * stride_wr,
                mask=rank_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            ddiff = tl.dot(dc.to(DOT), w_t.to(DOT), input_precision=PREC)
        else:
            g = tl.load(
                g_base + rows[:, None] * stride_gt + cols[None, :] * stride_gd,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
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
        SELECT: tl.constexpr, PROJECT: tl.constexpr, HAS_MASK: tl.constexpr,
        NEED_DH: tl.constexpr, NEED_DS: tl.constexpr, NEED_DA: tl.constexpr, STORE_DC: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, R_PAD: tl.constexpr,
        DOT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Backward for one block of base rows: dc = g W (stored), dh, dA[:, rows] and (identity) dS.

        dh_j = g_j + (a_j - 1) d diff_j; dA_ij = S_i . d diff_j and dA_{Ts,j} = h_j . d diff_j, reduced over
        D; with the identity selection dS_j = d diff_j. dh shares g's strides (both contiguous).
        """
        pid_t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < Tb
        keep = row_ok
        if HAS_MASK:
            keep = keep & (tl.load(m_ptr + b * stride_mb + rows * stride_mt, mask=row_ok, other=0) != 0)
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
                g = tl.load(
                    g_base + rows[:, None] * stride_gt + cols[None, :] * stride_gd,
                    mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                w = tl.load(
                    w_base + cols[:, None] * stride_wd + ranks[None, :] * stride_wr,
                    mask=col_ok[:, None] & rank_ok[None, :],
                    other=0.0,
                )
                dc = tl.dot(g.to(DOT), w.to(DOT), dc, input_precision=PREC)
            dc = tl.where(keep[:, None], dc, 0.0)
            if STORE_DC:
                tl.store(
                    dc_ptr + b * stride_cb + rows[:, None] * stride_ct + ranks[None, :] * stride_cr,
                    dc,
                    mask=row_ok[:, None] & rank_ok[None, :],
                )
        if SELECT == 1:
            a_self = tl.load(a_base + Ts * stride_ai + rows * stride_at, mask=row_ok, other=0.0).to(tl.float32)
        else:
            a_self = tl.zeros((BLOCK_T,), dtype=tl.float32)
        da_self = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if NEED_DH or (NEED_DA and SELECT == 1) or (NEED_DS and SELECT == 0):
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                tile_ok = row_ok[:, None] & col_ok[None, :]
                ddiff = _ddiff_tile(
                    g_base, w_base, dc, rows, row_ok, keep, cols, col_ok, ranks, rank_ok,
                    stride_gt, stride_gd, stride_wd, stride_wr, PROJECT, DOT, PREC,
                )  # fmt: skip
                if NEED_DH:
                    g = tl.load(
                        g_base + rows[:, None] * stride_gt + cols[None, :] * stride_gd, mask=tile_ok, other=0.0
                    ).to(tl.float32)
                    dh = g + (a_self[:, None] - 1.0) * ddiff
                    tl.store(
                        dh_ptr + b * stride_gb + rows[:, None] * stride_gt + cols[None, :] * stride_gd,
                        dh.to(dh_ptr.dtype.element_ty),
                        mask=tile_ok,
                    )
                if NEED_DA and SELECT == 1:
                    h_tile = tl.load(
                        h_base + rows[:, None] * stride_ht + cols[None, :] * stride_hd, mask=tile_ok, other=0.0
                    ).to(tl.float32)
                    da_self += tl.sum(h_tile * ddiff, axis=1)
                if NEED_DS and SELECT == 0:
                    tl.store(
                        ds_ptr + b * stride_dsb + rows[:, None] * stride_dst + cols[None, :] * stride_dsd,
                        ddiff.to(ds_ptr.dtype.element_ty),
                        mask=tile_ok,
                    )
        if NEED_DA and SELECT == 1:
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
                    s = tl.load(
                        s_base + src[:, None] * stride_st + cols[None, :] * stride_sd,
                        mask=src_ok[:, None] & col_ok[None, :],
                        other=0.0,
                    )
                    da = tl.dot(s.to(DOT), tl.trans(ddiff.to(DOT)), da, input_precision=PREC)
                tl.store(
                    da_base + src[:, None] * stride_dai + rows[None, :] * stride_dat,
                    da.to(da_ptr.dtype.element_ty),
                    mask=src_ok[:, None] & row_ok[None, :],
                )

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
        pid_d = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        src = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
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
            keep = row_ok
            if HAS_MASK:
                keep = keep & (tl.load(m_ptr + b * stride_mb + rows * stride_mt, mask=row_ok, other=0) != 0)
            if PROJECT:
                dc = tl.load(
                    dc_ptr + b * stride_cb + rows[:, None] * stride_ct + ranks[None, :] * stride_cr,
                    mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0,
                )
            else:
                dc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
            ddiff = _ddiff_tile(
                g_base, w_base, dc, rows, row_ok, keep, cols, col_ok, ranks, rank_ok,
                stride_gt, stride_gd, stride_wd, stride_wr, PROJECT, DOT, PREC,
            )  # fmt: skip
            a = tl.load(
                a_base + src[:, None] * stride_ai + rows[None, :] * stride_at,
                mask=src_ok[:, None] & row_ok[None, :],
                other=0.0,
            )  # A[src, rows]: (BLOCK_S, BLOCK_T)
            acc = tl.dot(a.to(DOT), ddiff.to(DOT), acc, input_precision=PREC)
        tl.store(
            ds_ptr + b * stride_dsb + src[:, None] * stride_dst + cols[None, :] * stride_dsd,
            acc.to(ds_ptr.dtype.element_ty),
            mask=src_ok[:, None] & col_ok[None, :],
        )

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
        SELECT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, R_PAD: tl.constexpr,
        DOT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """dW[b, cols] = sum_j diff_j[cols] dc_j^T + g_j[cols] c_j^T, reduced over base rows in blocks.

        c and dc are zero on masked rows, so those rows add nothing. One fp32 partial per example; the
        launcher sums them over the batch for a shared W.
        """
        pid_d = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
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
            tile_ok = row_ok[:, None] & col_ok[None, :]
            coeff_ok = row_ok[:, None] & rank_ok[None, :]
            h_tile = tl.load(
                h_base + rows[:, None] * stride_ht + cols[None, :] * stride_hd, mask=tile_ok, other=0.0
            ).to(tl.float32)
            mixed = _mixed_tile(
                h_tile, s_base, a_base, rows, row_ok, cols, col_ok, Ts,
                stride_st, stride_sd, stride_ai, stride_at,
                SELECT, BLOCK_S, BLOCK_T, BLOCK_D, DOT, PREC,
            )  # fmt: skip
            g = tl.load(g_base + rows[:, None] * stride_gt + cols[None, :] * stride_gd, mask=tile_ok, other=0.0)
            coeff = tl.load(
                c_ptr + b * stride_cb + rows[:, None] * stride_ct + ranks[None, :] * stride_cr,
                mask=coeff_ok,
                other=0.0,
            )
            dc = tl.load(
                dc_ptr + b * stride_cb + rows[:, None] * stride_ct + ranks[None, :] * stride_cr,
                mask=coeff_ok,
                other=0.0,
            )
            acc = tl.dot(tl.trans((mixed - h_tile).to(DOT)), dc.to(DOT), acc, input_precision=PREC)
            acc = tl.dot(tl.trans(g.to(DOT)), coeff.to(DOT), acc, input_precision=PREC)
        tl.store(
            dw_ptr + b * stride_vb + cols[:, None] * stride_vd + ranks[None, :] * stride_vr,
            acc,
            mask=col_ok[:, None] & rank_ok[None, :],
        )


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write comes from here (tests swap it for a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(Tb: int, Ts: int, r: int, dtype: torch.dtype) -> dict:
    """Tile sizes: dot operands need >= 16 per side; r is padded to a power of two >= 16.

    At r = 128 on sm_90 with 8 warps (checked with ptxas -v), 32 base rows x 64 features per tile keeps the
    bf16/fp16 kernels free of register spills (64 rows spill); exact fp32 dots need 32-feature tiles.
    """
    r_pad = max(16, triton.next_power_of_2(r)) if r else 16
    return dict(
        BLOCK_T=16 if Tb <= 16 else 32,
        BLOCK_D=32 if dtype == torch.float32 and r_pad >= 64 else 64,
        BLOCK_S=16 if Ts <= 16 else 32,
        R_PAD=r_pad,
        num_warps=8 if r_pad >= 64 else 4,
    )


def _dot_config(dtype: torch.dtype) -> dict:
    """fp32 inputs: exact fp32 dots; bf16/fp16: tensor-core dots in the input dtype, fp32 accumulators.

    Triton's CPU interpreter (TRITON_INTERPRET=1) multiplies bf16 blocks as raw 16-bit integers (numpy has
    no bf16), so there bf16 dots run in fp32; fp16 dots are exercised in the input dtype everywhere.
    """
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        dtype = torch.float32
    dot = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    return dict(DOT=dot, PREC="ieee" if dtype == torch.float32 else "tf32")


def _w3(W: torch.Tensor) -> tuple[int, int, int]:
    """(batch, D, r) strides of W; a shared (D, r) basis gets batch stride 0."""
    return (W.stride(0), W.stride(1), W.stride(2)) if W.dim() == 3 else (0, W.stride(0), W.stride(1))


class InterchangeFunction(torch.autograd.Function):
    """Fused Triton interchange with a fused Triton backward (see the module docstring for the math).

    apply(h, S, A, W, position_mask) with A or W possibly None; h, S: fp32, bf16 or fp16. Saves the inputs
    and, when W needs a gradient, the fp32 coefficients c = (s~ - h) W: (B, Tb, r); nothing of size
    (B, Tb, D) beyond the inputs.
    """

    @staticmethod
    def forward(ctx, h, S, A, W, position_mask):
        _check_inputs(h, S, A, W, position_mask)
        if not HAS_TRITON:
            raise RuntimeError("the fused interchange needs triton, which is not installed; use use_triton=False")
        if h.dtype not in TRITON_DTYPES:
            raise ValueError(f"the fused interchange supports {TRITON_DTYPES}, got h.dtype={h.dtype}")
        B, Tb, D = h.shape
        Ts = S.shape[1]
        r = W.shape[-1] if W is not None else 0
        cfg = _blocks(Tb, Ts, r, h.dtype)
        num_warps = cfg.pop("num_warps")
        dot = _dot_config(h.dtype)
        select = _IDENTITY if A is None else _WEIGHTED
        a_arg = A if A is not None else h  # never read in identity mode
        w_arg = W if W is not None else h  # never read without projection
        mask = position_mask.view(torch.uint8) if position_mask is not None else None
        m_arg = mask if mask is not None else h
        store_c = W is not None and ctx.needs_input_grad[3]  # c is read only by dW's kernel
        out = _empty((B, Tb, D), h.dtype, h.device)
        coeff = _empty((B, Tb, r), torch.float32, h.device) if store_c else None
        a_strides = A.stride() if A is not None else (0, 0, 0)
        w_strides = _w3(W) if W is not None else (0, 0, 0)
        m_strides = mask.stride() if mask is not None else (0, 0)
        c_strides = coeff.stride() if store_c else (0, 0, 0)
        grid = (triton.cdiv(Tb, cfg["BLOCK_T"]), B)
        _interchange_fwd_kernel[grid](
            h, S, a_arg, w_arg, m_arg, out, coeff if store_c else h,
            Tb, Ts, D, r,
            *h.stride(), *S.stride(), *a_strides, *w_strides, *m_strides, *out.stride(), *c_strides,
            SELECT=select, PROJECT=W is not None, HAS_MASK=mask is not None, STORE_C=store_c,
            **cfg, **dot, num_warps=num_warps,
        )  # fmt: skip
        ctx.save_for_backward(h, S, A, W, mask, coeff)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, S, A, W, mask, coeff = ctx.saved_tensors
        need_dh, need_ds, need_da, need_dw, _ = ctx.needs_input_grad
        need_da = need_da and A is not None
        need_dw = need_dw and W is not None
        g = grad_out.to(h.dtype).contiguous()
        B, Tb, D = h.shape
        Ts = S.shape[1]
        r = W.shape[-1] if W is not None else 0
        cfg = _blocks(Tb, Ts, r, h.dtype)
        num_warps = cfg.pop("num_warps")
        dot = _dot_config(h.dtype)
        select = _IDENTITY if A is None else _WEIGHTED
        project = W is not None
        a_arg = A if A is not None else h
        w_arg = W if W is not None else h
        m_arg = mask if mask is not None else h
        a_strides = A.stride() if A is not None else (0, 0, 0)
        w_strides = _w3(W) if W is not None else (0, 0, 0)
        m_strides = mask.stride() if mask is not None else (0, 0)
        dh = _empty((B, Tb, D), h.dtype, h.device) if need_dh else None
        dS = _empty(tuple(S.shape), S.dtype, S.device) if need_ds else None
        dA = _empty(tuple(A.shape), A.dtype, A.device) if need_da else None
        ds_strides = dS.stride() if dS is not None else (0, 0, 0)
        da_strides = dA.stride() if dA is not None else (0, 0, 0)
        store_dc = project and (need_dw or (need_ds and select == _WEIGHTED))
        dc = _empty((B, Tb, r), torch.float32, h.device) if store_dc else None
        c_strides = dc.stride() if dc is not None else (0, 0, 0)
        rows_grid = (triton.cdiv(Tb, cfg["BLOCK_T"]), B)
        _interchange_bwd_rows_kernel[rows_grid](
            g, h, S, a_arg, w_arg, m_arg,
            dc if dc is not None else g, dh if dh is not None else g,
            dS if dS is not None else g, dA if dA is not None else g,
            Tb, Ts, D, r,
            *g.stride(), *h.stride(), *S.stride(), *a_strides, *w_strides, *m_strides, *c_strides,
            *ds_strides, *da_strides,
            SELECT=select, PROJECT=project, HAS_MASK=mask is not None,
            NEED_DH=need_dh, NEED_DS=need_ds, NEED_DA=need_da, STORE_DC=store_dc,
            **cfg, **dot, num_warps=num_warps,
        )  # fmt: skip
        if need_ds and select == _WEIGHTED:
            src_grid = (triton.cdiv(D, cfg["BLOCK_D"]), triton.cdiv(Ts, cfg["BLOCK_S"]), B)
            _interchange_bwd_source_kernel[src_grid](
                g, A, w_arg, m_arg, dc if dc is not None else g, dS,
                Tb, Ts, D, r,
                *g.stride(), *a_strides, *w_strides, *m_strides, *c_strides, *ds_strides,
                PROJECT=project, HAS_MASK=mask is not None,
                **cfg, **dot, num_warps=num_warps,
            )  # fmt: skip
        dW = None
        if need_dw:
            partial = _empty((B, D, r), torch.float32, h.device)
            w_grid = (triton.cdiv(D, cfg["BLOCK_D"]), B)
            _interchange_bwd_weight_kernel[w_grid](
                g, h, S, a_arg, coeff, dc, partial,
                Tb, Ts, D, r,
                *g.stride(), *h.stride(), *S.stride(), *a_strides, *coeff.stride(), *partial.stride(),
                SELECT=select,
                **cfg, **dot, num_warps=num_warps,
            )  # fmt: skip
            dW = (partial if W.dim() == 3 else partial.sum(0)).to(W.dtype)
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
            reference; None picks Triton for CUDA tensors of a supported dtype when triton is installed.

    Returns:
        h': (B, Tb, D) in h's dtype.
    """
    if use_triton is None:
        use_triton = HAS_TRITON and h.is_cuda and h.dtype in TRITON_DTYPES
    if use_triton:
        return InterchangeFunction.apply(h, S, A, W, position_mask)
    return interchange_reference(h, S, A, W, position_mask)


class Interchange(torch.nn.Module):
    """nn.Module form of :func:`interchange` (stateless; the basis W comes from the subspace module).

    Args:
        use_triton: as in :func:`interchange`: None = Triton on CUDA, the reference elsewhere.
    """

    def __init__(self, use_triton: bool | None = None) -> None:
        super().__init__()
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
