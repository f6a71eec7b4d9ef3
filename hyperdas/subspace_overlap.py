"""How much the subspaces chosen for different examples share, per pair of attributes.

Example i patches with the operator P_i = W_i W_iᵀ (D, D) (W_i: its basis, (D, r)). Two examples' overlap is the
cosine of their operators,

    cos(P_i, P_j) = <P_i, P_j>_F / (‖P_i‖_F ‖P_j‖_F) = ‖W_iᵀ W_j‖²_F / (‖W_iᵀ W_i‖_F ‖W_jᵀ W_j‖_F),

1 when both patch the same subspace alike, 0 when the subspaces are orthogonal; for orthonormal W of rank r it is
‖W_iᵀ W_j‖²_F / r, the mean squared cosine of their principal angles. The mean over i in group a and j in group b
is <Q̄_a, Q̄_b>_F with Q̄_a the mean of P_i / ‖P_i‖_F over a, so one (D, D) sum per group is kept and no n² pairs
are formed; within a group the n_a pairs of an example with itself (cosine 1) are left out.

ReflectSelect's W = (I − 2vvᵀ) R equals R on span(R) ∩ v⊥, so any two of its subspaces share at least r − 2
dimensions and overlap by at least (r − 2)/r, whatever the editor does: one reflection cannot give different
attributes different subspaces. With K reflections the bound is (r − 2K)/r. MaskSelect's W = R diag(√m) can
(disjoint masks overlap by 0).
"""

from __future__ import annotations

import torch


class SubspaceOverlap:
    """Per-group sums of the normalised operators P_i / ‖P_i‖_F, added batch by batch; ``table`` averages."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}  # group -> (D, D) float64
        self._counts: dict[str, int] = {}

    def add(self, basis: torch.Tensor, groups: list[str]) -> None:
        """basis: (B, D, r) per-example W; groups: B names (e.g. the attribute each instruction names)."""
        if basis.dim() != 3 or basis.shape[0] != len(groups):
            raise ValueError(f"basis must be (B, D, r) with B = {len(groups)} groups, got {tuple(basis.shape)}")
        w = basis.detach().to(torch.float64)  # the sums stay on the basis' device (a GPU forms them there)
        norm = torch.linalg.matrix_norm(w.transpose(1, 2) @ w)  # ‖WᵀW‖_F = ‖P‖_F: (B,)
        w = w / norm.clamp_min(1e-300).sqrt()[:, None, None]  # so that W Wᵀ = P / ‖P‖_F
        for group in dict.fromkeys(groups):
            rows = [b for b, g in enumerate(groups) if g == group]
            flat = w[rows].transpose(0, 1).reshape(w.shape[1], -1)  # (D, n·r)
            operator_sum = flat @ flat.T  # Σ_i P_i / ‖P_i‖_F: (D, D)
            if group in self._sums:
                self._sums[group] += operator_sum
            else:
                self._sums[group] = operator_sum
            self._counts[group] = self._counts.get(group, 0) + len(rows)

    def table(self) -> dict[str, dict[str, float | None]]:
        """{a: {b: mean cos(P_i, P_j) over i in a, j in b, i ≠ j}}; None where a group has one example only."""
        names = sorted(self._sums)
        out: dict[str, dict[str, float | None]] = {}
        for a in names:
            out[a] = {}
            for b in names:
                inner = float((self._sums[a] * self._sums[b]).sum())  # Σ_i Σ_j cos(P_i, P_j)
                na, nb = self._counts[a], self._counts[b]
                if a == b:
                    out[a][b] = (inner - na) / (na * (na - 1)) if na > 1 else None
                else:
                    out[a][b] = inner / (na * nb)
        return out
