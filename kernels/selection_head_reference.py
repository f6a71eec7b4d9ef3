"""The HyperDAS selection head in plain PyTorch: the literal oracle and the factorised CPU path.

The head scores every (source token i, base token j) pair and normalises over the SOURCE axis, with an extra
SELF row (i = Ts, "keep the base"), so that every column of A (B, Ts+1, Tb) sums to 1 (METHOD.md section 3):

    logit_ij  = 1/(H sqrt(hd)) sum_h RoPE_{p_q}(q_h) . RoPE_{p_j}(kb_jh + ks_ih)      for i < Ts
    logit_Ts,j = 1/(H sqrt(hd)) sum_h RoPE_{p_q}(q_h) . RoPE_{p_j}(kself_jh)
    A[:, :, j] = softmax_i(logit_:,j)    (-inf where source i or base j is not selectable, i < Ts)

`selection_head_naive` materialises the pair keys as the authors' code does (the oracle);
`selection_head_torch` rotates the query by the relative angle p_j - p_q instead and never forms them (see
selection_head.py for the factorisation and the fused op).
"""

from __future__ import annotations

import math

import torch

from hyperdas.kernels.common import apply_rope, rope_cos_sin


def check_inputs(
    base_keys: torch.Tensor,
    source_keys: torch.Tensor,
    self_keys: torch.Tensor,
    query: torch.Tensor,
    base_positions: torch.Tensor,
    query_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    base_mask: torch.Tensor,
    source_mask: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """Validate the contract's shapes and dtypes; return (B, Ts, Tb, H, hd)."""
    if base_keys.dim() != 4:
        raise ValueError(f"base_keys must be (B, Tb, H, hd), got shape {tuple(base_keys.shape)}")
    B, Tb, H, hd = base_keys.shape
    if hd % 2:
        raise ValueError(f"head_dim must be even for RoPE, got hd={hd}")
    if source_keys.dim() != 4 or source_keys.shape[0] != B or source_keys.shape[2:] != (H, hd):
        raise ValueError(
            f"source_keys must be (B, Ts, H, hd) = ({B}, Ts, {H}, {hd}), got shape {tuple(source_keys.shape)}"
        )
    Ts = source_keys.shape[1]
    expected = {
        "self_keys": (self_keys, (B, Tb, H, hd)),
        "query": (query, (B, H, hd)),
        "base_positions": (base_positions, (B, Tb)),
        "query_positions": (query_positions, (B,)),
        "inv_freq": (inv_freq, (hd // 2,)),
        "base_mask": (base_mask, (B, Tb)),
        "source_mask": (source_mask, (B, Ts)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} (B={B}, Ts={Ts}, Tb={Tb}, H={H}, hd={hd}), got {tuple(tensor.shape)}"
            )
    if Ts < 1 or Tb < 1:
        raise ValueError(f"need at least one source and one base token, got Ts={Ts}, Tb={Tb}")
    for name, tensor in (
        ("base_keys", base_keys),
        ("source_keys", source_keys),
        ("self_keys", self_keys),
        ("query", query),
        ("inv_freq", inv_freq),
    ):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    for name, tensor in (("base_positions", base_positions), ("query_positions", query_positions)):
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")
    for name, tensor in (("base_mask", base_mask), ("source_mask", source_mask)):
        if tensor.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got dtype {tensor.dtype}")
    devices = {
        t.device
        for t in (
            base_keys,
            source_keys,
            self_keys,
            query,
            base_positions,
            query_positions,
            inv_freq,
            base_mask,
            source_mask,
        )
    }
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    return B, Ts, Tb, H, hd


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the PyTorch paths compute in: at least float32 (float64 when an input is float64)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def rope_rotate(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """RoPE_p(x) (hyperdas.kernels.common) of every head, computed in at least float32.

    Args:
        x: (..., H, hd) vectors to rotate; the heads axis is the second to last.
        positions: integer positions broadcastable with x.shape[:-2].
        inv_freq: (hd/2,) inverse frequencies.
        inverse: rotate by -p instead, i.e. apply RoPE_pᵀ (RoPE_p is orthogonal).

    Returns:
        The rotated x, in float32 (float64 when x or inv_freq is float64).
    """
    dtype = _work_dtype(x, inv_freq)
    cos, sin = rope_cos_sin(positions[..., None], inv_freq, dtype)  # (..., 1, hd): one angle for every head
    return apply_rope(x.to(dtype), cos, -sin if inverse else sin)


def selection_head_naive(
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
    """The literal, unfused selection head (the oracle): materialise every pair key, rotate, dot, softmax.

    K_ij = RoPE_{p_j}(kb_j + ks_i) for i < Ts and K_Ts,j = RoPE_{p_j}(kself_j), all (B, Ts+1, Tb, H, hd);
    q̂ = RoPE_{p_q}(q); logit_ij = mean_h(q̂_h . K_ij,h) / sqrt(hd), -inf where source i or base j is not
    selectable (i < Ts); A = softmax over i.

    Args:
        base_keys: (B, Tb, H, hd) W_k W1 b_j.
        source_keys: (B, Ts, H, hd) W_k W2 s_i.
        self_keys: (B, Tb, H, hd) W_k b_j, the SELF row's keys.
        query: (B, H, hd) W_q e, before RoPE.
        base_positions: (B, Tb) integer RoPE position of each base column.
        query_positions: (B,) integer RoPE position of the query (the last instruction token's, real tokens
            counted from 0, so left padding does not shift it).
        inv_freq: (hd/2,) RoPE inverse frequencies.
        base_mask: (B, Tb) bool, selectable base positions.
        source_mask: (B, Ts) bool, selectable source tokens.

    Returns:
        A: (B, Ts+1, Tb) float32 (float64 when the inputs are float64); every column sums to 1.
    """
    B, Ts, Tb, H, hd = check_inputs(
        base_keys, source_keys, self_keys, query, base_positions, query_positions, inv_freq, base_mask, source_mask
    )
    dtype = _work_dtype(base_keys, source_keys, self_keys, query, inv_freq)
    pair_keys = base_keys.to(dtype)[:, None] + source_keys.to(dtype)[:, :, None]  # (B, Ts, Tb, H, hd)
    pair_keys = rope_rotate(pair_keys, base_positions[:, None, :], inv_freq)
    own_keys = rope_rotate(self_keys.to(dtype), base_positions, inv_freq)  # (B, Tb, H, hd)
    keys = torch.cat((pair_keys, own_keys[:, None]), dim=1)  # (B, Ts+1, Tb, H, hd)
    rotated_query = rope_rotate(query.to(dtype), query_positions, inv_freq)  # (B, H, hd)
    logits = (keys * rotated_query[:, None, None]).sum(-1).mean(-1) / math.sqrt(hd)  # (B, Ts+1, Tb)
    selectable = source_mask[:, :, None] & base_mask[:, None, :]  # (B, Ts, Tb)
    keep = torch.cat((selectable, selectable.new_ones(B, 1, Tb)), dim=1)  # (B, Ts+1, Tb)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=1)


def selection_head_torch(
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
    """The selection head without pair tensors: a per-column term plus one batched matmul.

    q̃_j = concat_h RoPE_{p_j - p_q}ᵀ q_h (B, Tb, H·hd); logit_ij = (q̃_j . kb_j + q̃_j . ks_i) / (H sqrt(hd)) for
    i < Ts, logit_Ts,j = q̃_j . kself_j / (H sqrt(hd)); masked and column-softmaxed as in
    `selection_head_naive`. Arguments and result are those of `selection_head_naive`.
    """
    B, Ts, Tb, H, hd = check_inputs(
        base_keys, source_keys, self_keys, query, base_positions, query_positions, inv_freq, base_mask, source_mask
    )
    dtype = _work_dtype(base_keys, source_keys, self_keys, query, inv_freq)
    scale = 1.0 / (H * math.sqrt(hd))
    relative = base_positions - query_positions[:, None]  # (B, Tb): RoPE_{p_q} then RoPE_{p_j}ᵀ
    q_rot = rope_rotate(query.to(dtype)[:, None].expand(B, Tb, H, hd), relative, inv_freq, inverse=True)
    q_rot = q_rot.reshape(B, Tb, H * hd)  # (B, Tb, D) with D = H·hd
    column = (q_rot * base_keys.to(dtype).reshape(B, Tb, H * hd)).sum(-1)  # (B, Tb)
    own = (q_rot * self_keys.to(dtype).reshape(B, Tb, H * hd)).sum(-1)  # (B, Tb)
    cross = torch.bmm(source_keys.to(dtype).reshape(B, Ts, H * hd), q_rot.transpose(1, 2))  # (B, Ts, Tb)
    logits = (cross + column[:, None, :]) * scale
    selectable = source_mask[:, :, None] & base_mask[:, None, :]  # (B, Ts, Tb)
    logits = torch.cat((logits.masked_fill(~selectable, float("-inf")), (own * scale)[:, None]), dim=1)
    return torch.softmax(logits, dim=1)  # (B, Ts+1, Tb)
