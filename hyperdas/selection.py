"""Token-position selection: which source token each base position takes its concept from (METHOD.md §3).

A (B, Ts+1, Tb): A[:, i, j] is how much base position j takes from source token i; row Ts ("SELF") is how
much it keeps itself; every column sums to 1 (softmax over the SOURCE axis). The soft A trains; the hard
inference modes turn it into one-hot columns for evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyperdas.config import SELECTION_MODES
from hyperdas.kernels.selection_head import fused_selection_head


class SelectionHead(nn.Module):
    """Scores pairs (source token i, base token j) against the editor's encoding.

    With b̂_j, ŝ_i the L2-normalised base/source states at layer k and e the encoding:
    c_ij = W1 b̂_j + W2 ŝ_i (i < Ts), c_{Ts,j} = b̂_j; K_ij = RoPE_{p_j}(W_k c_ij); q = RoPE_{p_q}(W_q e) at
    the last instruction token's position p_q; logit_ij = mean_h q_h · K_ij,h / √hd, masked; A = softmax
    over i. Because c is linear, the three projections W_k W1 b̂, W_k W2 ŝ and W_k b̂ are computed once per
    token and the pair tensor (B, Ts, Tb, D) of the reference is never formed (the fused kernel or its matmul
    form does the rest).
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(
                f"num_editing_heads {num_heads} must divide hidden size {hidden_size} into an even head size"
            )
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.base_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # W1
        self.source_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # W2
        self.key_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # W_k
        self.query_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # W_q

    def forward(
        self,
        encoding: torch.Tensor,
        base_states: torch.Tensor,
        source_states: torch.Tensor,
        base_positions: torch.Tensor,
        query_positions: torch.Tensor,
        inv_freq: torch.Tensor,
        base_mask: torch.Tensor,
        source_mask: torch.Tensor,
        use_triton: bool | None = None,
    ) -> torch.Tensor:
        """Selection weights.

        Args:
            encoding: e (B, D).
            base_states: raw base states at layer k (B, Tb, D); source_states: (B, Ts, D).
            base_positions: (B, Tb) RoPE positions of the base tokens.
            query_positions: (B,) RoPE position of the last instruction token (left padding not counted).
            inv_freq: (hd/2,) RoPE inverse frequencies.
            base_mask: (B, Tb) bool selectable base positions; source_mask: (B, Ts) bool.
            use_triton: force the fused kernel (True) or the PyTorch path (False); None = on CUDA.

        Returns:
            A: (B, Ts+1, Tb) float32, columns summing to 1.
        """
        b_hat = F.normalize(base_states, dim=-1)
        s_hat = F.normalize(source_states, dim=-1)
        split = (*base_states.shape[:2], self.num_heads, self.head_dim)
        base_keys = self.key_proj(self.base_proj(b_hat)).view(split)  # (B, Tb, H, hd)
        self_keys = self.key_proj(b_hat).view(split)  # (B, Tb, H, hd)
        source_keys = self.key_proj(self.source_proj(s_hat)).view(
            *source_states.shape[:2], self.num_heads, self.head_dim
        )  # (B, Ts, H, hd)
        query = self.query_proj(encoding).view(encoding.shape[0], self.num_heads, self.head_dim)  # (B, H, hd)
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
            use_triton=use_triton,
        )


def sharpen(weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / τ) from A = softmax(logits), columns over the source axis: A^(1/τ) / Σ_i A^(1/τ).

    weights: (B, Ts+1, Tb), columns summing to 1 -> the same shape. Exact in the logits (the softmax's
    normaliser cancels), computed as a log-softmax of log A / τ; zero (masked) entries stay zero.
    """
    if temperature == 1.0:
        return weights
    zero = weights <= 0
    log_a = torch.log(weights.clamp_min(torch.finfo(weights.dtype).tiny)).masked_fill(zero, float("-inf"))
    return torch.softmax(log_a / temperature, dim=1)


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The hard selection in the forward, the soft one's gradient in the backward: hard + (A − sg(A)).

    hard, soft: (B, Ts+1, Tb). The value is ``hard`` exactly (A − sg(A) is 0, not a rounding of it), so a
    straight-through forward patches what the hard mode patches; ∂/∂A is the gradient the patch would get
    w.r.t. a selection evaluated at ``hard`` (the interchange is linear in the selection).
    """
    return hard + (soft - soft.detach())


def apply_selection_mode(
    weights: torch.Tensor,
    mode: str,
    base_mask: torch.Tensor,
    source_mask: torch.Tensor,
    base_entity_last: torch.Tensor | None = None,
    source_entity_last: torch.Tensor | None = None,
    self_floor: float = 0.1,
) -> torch.Tensor:
    """Turn the soft selection into the selection an inference mode uses.

    Args:
        weights: soft A (B, Ts+1, Tb), columns summing to 1.
        mode: "soft" (A as is), "column_argmax" (one-hot per base column), "bidding_argmax" (each source
            token keeps only its best base position, SELF floored at ``self_floor``, then column argmax),
            "global_argmax" (only the single best source->base pair is patched), "groundtruth" (last entity
            token of the source into the last entity token of the base).
        base_mask, source_mask: (B, Tb), (B, Ts) bool selectable positions.
        base_entity_last, source_entity_last: (B,) long, needed by "groundtruth".

    Returns:
        (B, Ts+1, Tb) float32 selection; unselectable base columns are always SELF.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown selection mode {mode!r}; allowed: {list(SELECTION_MODES)}")
    if mode == "soft":
        return weights
    b, rows, tb = weights.shape
    ts = rows - 1
    keep_self = torch.zeros_like(weights)
    keep_self[:, ts] = 1.0
    if mode == "column_argmax":
        hard = F.one_hot(weights.argmax(dim=1), rows).transpose(1, 2).to(weights.dtype)
    elif mode == "bidding_argmax":
        source_rows = weights[:, :ts]
        best_base = source_rows.argmax(dim=2, keepdim=True)  # (B, Ts, 1): each source token's bid
        bids = torch.zeros_like(source_rows).scatter(2, best_base, source_rows.gather(2, best_base))
        bids = bids * source_mask[:, :, None]
        self_row = weights[:, ts:].clamp_min(self_floor)
        hard = F.one_hot(torch.cat([bids, self_row], 1).argmax(dim=1), rows).transpose(1, 2).to(weights.dtype)
    elif mode == "global_argmax":
        pair_ok = source_mask[:, :, None] & base_mask[:, None, :]
        scores = weights[:, :ts].masked_fill(~pair_ok, -1.0).flatten(1)  # (B, Ts*Tb)
        best = scores.argmax(dim=1)
        i, j = best // tb, best % tb
        hard = keep_self.clone()
        rows_b = torch.arange(b, device=weights.device)
        has_pair = pair_ok.flatten(1).any(dim=1)
        hard[rows_b[has_pair], ts, j[has_pair]] = 0.0
        hard[rows_b[has_pair], i[has_pair], j[has_pair]] = 1.0
    else:  # groundtruth
        if base_entity_last is None or source_entity_last is None:
            raise ValueError("selection mode 'groundtruth' needs base_entity_last and source_entity_last")
        hard = keep_self.clone()
        rows_b = torch.arange(b, device=weights.device)
        hard[rows_b, ts, base_entity_last] = 0.0
        hard[rows_b, source_entity_last, base_entity_last] = 1.0
    return torch.where(base_mask[:, None, :], hard, keep_self)
