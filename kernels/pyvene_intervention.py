"""A drop-in for pyvene's LowRankRotatedSpaceIntervention that runs the fused interchange op.

pyvene's class (0.1.8) keeps an orthogonally parametrised rotation R: (E, r) and computes, for base and
source representations b, s: (..., E) at matching positions,

    out = b + ((s - b) R) R^T

which is the interchange h' = h + W W^T (s~ - h) with the identity selection (s~_j = s_j) and W = R. This
subclass keeps pyvene's constructor, parametrisation and state-dict keys and replaces only the forward, so a
pyvene user swaps one class name:

    config = pyvene.IntervenableConfig(
        representations=[{"layer": 8, "component": "block_output", "low_rank_dimension": 16}],
        intervention_types=FusedLowRankRotatedSpaceIntervention,
    )

pyvene is an optional dependency of hyperdas: importing this module without it raises an ImportError that
says how to install it. Nothing else in hyperdas.kernels imports this module.
"""

from __future__ import annotations

import torch

try:
    from pyvene.models.interventions import LowRankRotatedSpaceIntervention
except ImportError as err:
    raise ImportError(
        "hyperdas.kernels.pyvene_intervention is a drop-in for pyvene, which is not installed; "
        "install it with `pip install --no-deps pyvene==0.1.8` (as install.sh does)"
    ) from err

from .interchange import interchange

SubspaceList = list[list[int]]


class FusedLowRankRotatedSpaceIntervention(LowRankRotatedSpaceIntervention):
    """pyvene's low-rank rotated-space interchange, computed by the fused op (Triton on CUDA).

    Math: out = b + (s - b) R R^T with R = rotate_layer.weight: (E, r) (or the columns of R that
    `subspaces` selects, per example). Leading dimensions of b and s are flattened into rows of one
    interchange call with the identity selection; the result has b's shape and dtype.

    Args:
        use_triton: passed to :func:`hyperdas.kernels.interchange.interchange` (None = Triton on CUDA).
        **kwargs: pyvene's intervention arguments (embed_dim, low_rank_dimension, subspace_partition, ...).
    """

    def __init__(self, use_triton: bool | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.use_triton = use_triton

    def _columns(self, subspaces: SubspaceList, batch: int) -> list[list[int]]:
        """Columns of R per example, as pyvene reads `subspaces` (partition indices or raw columns)."""
        if len(subspaces) != batch:
            raise ValueError(f"subspaces has {len(subspaces)} entries, expected one per example ({batch})")
        per_example = [subspaces[0]] * batch if self.use_fast else list(subspaces)
        if self.subspace_partition is None:
            return [list(cols) for cols in per_example]
        return [[c for part in parts for c in self.subspace_partition[part]] for parts in per_example]

    def forward(
        self,
        base: torch.Tensor,
        source: torch.Tensor,
        subspaces: SubspaceList | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """base, source: (B, ..., E) -> (B, ..., E): base + (source - base) R R^T, fused."""
        weight = self.rotate_layer.weight  # R: (E, r), orthonormal columns
        E = weight.shape[0]
        if base.shape[-1] != E or source.shape != base.shape:
            raise ValueError(
                f"base and source must both be (..., {E}) (the rotation's embed_dim), "
                f"got base {tuple(base.shape)} and source {tuple(source.shape)}"
            )
        src = source.to(base.dtype)
        if subspaces is None:
            h = base.reshape(1, -1, E)  # every row of every example against one shared basis
            out = interchange(h, src.reshape(1, -1, E), None, weight, use_triton=self.use_triton)
            return out.reshape(base.shape)
        columns = self._columns(subspaces, base.shape[0])
        if len({len(cols) for cols in columns}) != 1:
            raise ValueError(f"every example must select the same number of columns, got {columns}")
        if all(cols == columns[0] for cols in columns):
            basis = weight[:, columns[0]]  # (E, k) shared
        else:
            basis = torch.stack([weight[:, cols] for cols in columns])  # (B, E, k)
        B = base.shape[0]
        h = base.reshape(B, -1, E)
        out = interchange(h, src.reshape(B, -1, E), None, basis, use_triton=self.use_triton)
        return out.reshape(base.shape)

    def __str__(self) -> str:
        return "FusedLowRankRotatedSpaceIntervention()"
