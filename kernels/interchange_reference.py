"""The interchange intervention in plain PyTorch: the oracle of the fused kernels and the CPU path.

For one example, with base states h: (Tb, D), source states S: (Ts, D), selection weights A: (Ts+1, Tb)
(row Ts is SELF, every column sums to 1) and an orthonormal basis W: (D, r):

    s~_j = sum_{i<Ts} A_ij S_i + A_{Ts,j} h_j      (what base position j is moved towards)
    h'_j = h_j + W W^T (s~_j - h_j)                (rotate into the subspace, swap, rotate back)

W may be per example (B, D, r), shared (D, r), or None (h'_j = s~_j); A may be None, the identity selection
(s~_j = S_j, Ts == Tb). Where position_mask[b, j] is False, h'_j = h_j. The fused op is in interchange.py.
"""

from __future__ import annotations

import torch


def check_inputs(
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
    check_inputs(h, S, A, W, position_mask)
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
