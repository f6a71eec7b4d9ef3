"""Subspace modules: map the editor's encoding e (B, D) to the basis W that the interchange patches.

The interchange (METHOD.md section 5) is h' = h + W Wᵀ (s̃ − h), so every module here returns either a basis
W (B, D, r) / (D, r), or None for "patch the whole vector". MaskSelect's R diag(m) Rᵀ is written as W Wᵀ with
W = R diag(√m), so one fused interchange serves all of them. R and W are float32 (float64 in float64 runs)
whatever the modules' weights are: under DeepSpeed bf16 the working weights are bf16, and W rounded to bf16
would be orthonormal only to 2^-9, not to float32 precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: the optimizer groups the parts below declare (``optimizer_group``; HyperDAS.param_groups sets their rates).
ROTATION_GROUP = "rotation"
MASK_GROUP = "mask"


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is (bf16/fp16 math here would lose orthonormality)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class OrthonormalBasis(nn.Module):
    """A learned (D, r) matrix with orthonormal columns, R = qr(P).Q with the signs fixed; or ``count`` of them,
    (count, D, r), each orthonormalised on its own (one per attribute: ``bases`` below).

    The parametrisation is explicit and cheap (O(D r²) each); the model evaluates it ONCE per forward. P starts
    orthonormal (orthogonal init), so R starts equal to P: never the all-zero, stuck-at-identity basis of
    the reference (which created it with torch.empty).
    """

    optimizer_group = ROTATION_GROUP  # R trains at its own rate, without weight decay

    def __init__(self, hidden_size: int, rank: int, count: int | None = None):
        super().__init__()
        shape = (hidden_size, rank) if count is None else (count, hidden_size, rank)
        self.weight = nn.Parameter(torch.empty(shape))
        for matrix in self.weight.data.view(-1, hidden_size, rank):
            nn.init.orthogonal_(matrix)

    def forward(self) -> torch.Tensor:
        """R: (D, r) or (count, D, r) in float32 (float64 for a float64 weight), RᵀR = I to that precision."""
        q, r = torch.linalg.qr(at_least_fp32(self.weight))
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))  # (r,) or (count, r)
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        return q * signs.unsqueeze(-2)


def pick_bases(rotation: torch.Tensor, attribute_index: torch.Tensor | None) -> torch.Tensor:
    """R for each example: the shared (D, r) as it is, or row ``attribute_index`` (B,) of a (A, D, r) bank."""
    if rotation.dim() == 2:
        if attribute_index is not None:
            raise ValueError("attribute_index given to a module with one shared basis")
        return rotation
    if attribute_index is None:
        raise ValueError(
            f"this module keeps one basis per attribute ({rotation.shape[0]}): every example needs its attribute"
        )
    return rotation[attribute_index]  # (B, D, r)


class SwiGLU(nn.Module):
    """RMSNorm then a SwiGLU MLP, D -> hidden -> out."""

    def __init__(self, hidden_size: int, inner: int, out: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.gate = nn.Linear(hidden_size, inner, bias=False)
        self.up = nn.Linear(hidden_size, inner, bias=False)
        self.down = nn.Linear(inner, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ReflectSelect(nn.Module):
    """W = H_K ··· H_1 R, H_k = I − 2 v_k v_kᵀ, v_k = u_k/‖u_k‖, (u_1 … u_K) = SwiGLU(RMSNorm(e)).

    Householder reflections of a shared orthonormal basis R, chosen per example; K = 1 is the paper's
    W = (I − 2vvᵀ) R = R − 2 v (vᵀR). Each reflection is applied in the right-hand form, W ← W − 2 v_k (v_kᵀ W),
    O(B·D·r) each; no (B, D, D) Householder matrix is ever made. W keeps orthonormal columns because reflections
    are orthogonal. One reflection leaves the r − 1 directions of span(R) orthogonal to v in place, so any two
    examples' subspaces share r − 2 dimensions (hyperdas.subspace_overlap); K reflections leave r − K, so K lets
    the examples' subspaces differ in up to 2K of r dimensions.

    ``bases`` (not the paper's): one R per attribute, R_a, picked by the attribute the pair's instruction names, so
    W = H_K ··· H_1 R_a: each attribute gets a subspace of its own, as MDAS trains one per attribute, and the
    editor still reflects it per example. None: the one shared R.
    """

    def __init__(self, hidden_size: int, rank: int, reflections: int = 1, bases: int | None = None):
        super().__init__()
        if reflections < 1:
            raise ValueError(f"reflections must be >= 1, got {reflections}")
        self.rotation = OrthonormalBasis(hidden_size, rank, bases)
        self.reflections = reflections
        self.reflector = SwiGLU(hidden_size, hidden_size, reflections * hidden_size)

    def reflection(self, encoding: torch.Tensor) -> torch.Tensor:
        """v (B, K·D): each example's K unit reflection vectors, v_1 first."""
        u = at_least_fp32(self.reflector(encoding))
        u = u.view(*u.shape[:-1], self.reflections, -1)  # (B, K, D)
        return (u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)).flatten(-2)

    def describe(self, encoding: torch.Tensor) -> dict[str, torch.Tensor]:
        """What an analysis of the chosen subspaces reads per example: the reflection vectors v (B, K·D)."""
        return {"reflection": self.reflection(encoding)}

    def forward(self, encoding: torch.Tensor, attribute_index: torch.Tensor | None = None) -> torch.Tensor:
        """encoding: (B, D), attribute_index: (B,) long with per-attribute bases -> W: (B, D, r), at least float32
        (R evaluated once for the batch)."""
        basis = pick_bases(self.rotation(), attribute_index)  # (D, r) shared, or (B, D, r)
        vs = self.reflection(encoding).unflatten(-1, (self.reflections, -1))  # (B, K, D)
        v = vs[:, 0]
        if basis.dim() == 2:
            # H_1 R from the shared (D, r) R, as with one reflection before K existed (the same rounding, bitwise)
            w = basis[None] - 2.0 * v[:, :, None] * (v @ basis)[:, None, :]  # (B, D, r)
        else:
            w = basis - 2.0 * v[:, :, None] * (v[:, None, :] @ basis)  # (B, D, r)
        for k in range(1, self.reflections):
            v = vs[:, k]
            w = w - 2.0 * v[:, :, None] * (v[:, None, :] @ w)  # H_k W
        return w


class MaskSelect(nn.Module):
    """h' = h + ((s̃ − h) R ⊙ σ(MLP(e)/τ)) Rᵀ, i.e. W = R diag(√m), m = σ(MLP(e)/τ) ∈ (0, 1)^r.

    τ is annealed linearly from 50 to 0.1 over training (``set_temperature``), so the soft mask hardens. The
    current τ is part of the state dict (``_extra_state``), so a saved model is loaded at the temperature it
    was trained to, not at the starting 50.
    """

    def __init__(self, hidden_size: int, rank: int, temperature: float = 50.0):
        super().__init__()
        self.rotation = OrthonormalBasis(hidden_size, rank)
        self.mask_logits = SwiGLU(hidden_size, hidden_size, rank)
        self.mask_logits.optimizer_group = MASK_GROUP
        self.temperature = temperature

    def set_temperature(self, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError(f"MaskSelect temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def _scaled_logits(self, encoding: torch.Tensor) -> torch.Tensor:
        return at_least_fp32(self.mask_logits(encoding)) / self.temperature  # z/τ: (B, r)

    def mask(self, encoding: torch.Tensor) -> torch.Tensor:
        """m (B, r) in (0, 1): how much of each basis direction each example patches."""
        return torch.sigmoid(self._scaled_logits(encoding))

    def describe(self, encoding: torch.Tensor) -> dict[str, torch.Tensor]:
        """What an analysis of the chosen subspaces reads per example: the mask m (B, r)."""
        return {"mask": self.mask(encoding)}

    def get_extra_state(self) -> torch.Tensor:
        """τ for the state dict: a float64 scalar tensor (not a buffer, so casting the module leaves it exact)."""
        return torch.tensor(self.temperature, dtype=torch.float64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.set_temperature(float(state))

    def forward(self, encoding: torch.Tensor, attribute_index: torch.Tensor | None = None) -> torch.Tensor:
        """encoding: (B, D) -> W: (B, D, r), at least float32 (one shared R: ``attribute_index`` must be None).

        √m is computed as exp(½·log σ(z/τ)): its gradient ½·√m·(1 − m) is finite everywhere, where sqrt(m)'s
        1/(2√m) is infinite once σ underflows to 0 (z/τ below about −103 in fp32), and inf · σ'(≈0) is NaN.
        """
        root = torch.exp(0.5 * F.logsigmoid(self._scaled_logits(encoding)))  # √m: (B, r)
        return pick_bases(self.rotation(), attribute_index)[None] * root[:, None, :]


class StaticDAS(nn.Module):
    """Distributed alignment search: one learned basis for every example, W = R (D, r); with ``bases``, one per
    attribute, W = R_a (B, D, r), the subspaces MDAS trains (here beside a learned selection)."""

    def __init__(self, hidden_size: int, rank: int, bases: int | None = None):
        super().__init__()
        self.rotation = OrthonormalBasis(hidden_size, rank, bases)

    def describe(self, encoding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}  # the same basis for every example (of an attribute): nothing per example to analyse

    def forward(self, encoding: torch.Tensor, attribute_index: torch.Tensor | None = None) -> torch.Tensor:
        """encoding: (B, D), unused -> W = R: (D, r), or R_a per example (B, D, r), at least float32."""
        return pick_bases(self.rotation(), attribute_index)


class FullSubspace(nn.Module):
    """Patch the whole vector (W = I): returns None, which the interchange reads as h' = s̃."""

    rotation = None

    def describe(self, encoding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, encoding: torch.Tensor, attribute_index: torch.Tensor | None = None) -> None:
        return None


def build_subspace(
    name: str,
    hidden_size: int,
    rank: int,
    temperature: float = 50.0,
    reflections: int = 1,
    bases: int | None = None,
) -> nn.Module:
    """The subspace module called ``name`` (one of config.SUBSPACE_MODULES); ``reflections`` is ReflectSelect's K,
    ``bases`` the number of per-attribute bases of ReflectSelect or DAS (None: one shared basis)."""
    if bases is not None and name not in ("ReflectSelect", "DAS"):
        raise ValueError(f"one basis per attribute applies to ReflectSelect and DAS, not {name}")
    if name == "ReflectSelect":
        return ReflectSelect(hidden_size, rank, reflections, bases)
    if name == "MaskSelect":
        return MaskSelect(hidden_size, rank, temperature)
    if name == "DAS":
        return StaticDAS(hidden_size, rank, bases)
    if name == "full":
        return FullSubspace()
    raise ValueError(f"unknown subspace module {name!r}; allowed: ReflectSelect, MaskSelect, DAS, full")
