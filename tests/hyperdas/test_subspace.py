"""Subspace modules: the basis R stays orthonormal whatever the weights' dtype, and MaskSelect's temperature."""

from __future__ import annotations

import pytest
import torch

from hyperdas.subspace import MaskSelect, OrthonormalBasis, ReflectSelect, StaticDAS

D, R = 96, 12


def _orthonormality_error(w: torch.Tensor) -> float:
    """max |WᵀW − I| over every example of a (B, D, r) or (D, r) basis."""
    gram = w.transpose(-1, -2) @ w
    return (gram - torch.eye(w.shape[-1], dtype=w.dtype)).abs().max().item()


# Householder QR in float32 gives |QᵀQ − I| ≈ c·√D·u, u = 2^-24 ≈ 6e-8 (Higham, Accuracy and Stability of
# Numerical Algorithms, Thm 19.4, with the usual √ growth in place of the worst case D·r; measured c ≤ 0.82 at
# D = 96..4096). 8·√D·u leaves 10x margin, and one bf16 rounding of R (2^-9 per entry) lands 300x above it.
FP32_ORTHONORMAL = 8 * D**0.5 * 2.0**-24


@pytest.mark.parametrize("module", [ReflectSelect, MaskSelect, StaticDAS])
def test_basis_stays_orthonormal_to_fp32_with_bf16_weights(module):
    """Under DeepSpeed bf16 the working weights are bf16: R (and W, but for MaskSelect's mask) must still be
    orthonormal to float32 precision, so R is returned in float32, not rounded back to the weights' dtype."""
    torch.manual_seed(0)
    sub = module(D, R).to(torch.bfloat16)
    rotation = sub.rotation()
    assert rotation.dtype == torch.float32
    assert _orthonormality_error(rotation) < FP32_ORTHONORMAL
    encoding = torch.randn(3, D).to(torch.bfloat16)
    basis = sub(encoding)
    assert basis.dtype == torch.float32
    if module is not MaskSelect:  # W = R diag(√m) is orthogonal, not orthonormal
        assert _orthonormality_error(basis) < FP32_ORTHONORMAL
    rounded = rotation.to(torch.bfloat16).float()
    assert _orthonormality_error(rounded) > 100 * FP32_ORTHONORMAL  # what the bound tells apart


def test_basis_is_the_qr_of_its_weight_even_in_float64():
    """After optimizer steps the weight P is no longer orthonormal: R must be re-orthonormalised every time
    (float64 included), with span(R[:, :k]) = span(P[:, :k]): P = R U with U upper triangular, diag(U) > 0."""
    basis = OrthonormalBasis(D, R).double()
    with torch.no_grad():
        basis.weight.add_(0.3 * torch.randn(D, R, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    rotation = basis()
    assert rotation.dtype == torch.float64
    assert _orthonormality_error(rotation) < 1e-13
    upper = rotation.T @ basis.weight
    torch.testing.assert_close(rotation @ upper, basis.weight, rtol=0, atol=1e-13)
    assert upper.tril(-1).abs().max() < 1e-13 and (upper.diagonal() > 0).all()


def test_basis_gradient_goes_through_the_qr():
    """The gradient of a loss of R reaches P through the QR: scaling a column of P by 1 + α leaves R as it is,
    so along that direction the gradient is zero, Σ_d dL/dP_dk · P_dk = 0 for every column k (it would be
    Σ_d target_dk P_dk, far from 0, if R were P itself)."""
    basis = OrthonormalBasis(D, R).double()
    target = torch.randn(D, R, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (basis() * target).sum().backward()
    grad = basis.weight.grad
    scaling = (grad * basis.weight).sum(dim=0)  # d/dα L(P diag(1 + α)) at α = 0: R does not change
    assert scaling.abs().max() < 1e-12
    assert grad.abs().max() > 1e-3


def test_mask_select_temperature_is_in_the_state_dict_and_stays_float64():
    sub = MaskSelect(D, R)
    sub.set_temperature(0.1)
    state = sub.state_dict()
    assert state["_extra_state"].dtype == torch.float64 and float(state["_extra_state"]) == 0.1
    fresh = MaskSelect(D, R).to(torch.bfloat16)  # casting the module must not round the temperature
    fresh.load_state_dict(state)
    assert fresh.temperature == 0.1
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        fresh.set_temperature(0.0)


def test_mask_select_gradient_stays_finite_where_the_mask_underflows_to_zero():
    """Columns whose z/τ lies far below −103 have σ(z/τ) = 0 in fp32, where d√m/dm = 1/(2√m) is infinite and the
    chain rule gives inf · 0 = NaN. W must still equal R·diag(√σ(z/τ)) (checked in float64, where nothing
    underflows at these values) and every gradient must be finite."""
    torch.manual_seed(0)
    sub = MaskSelect(D, R, temperature=0.5)
    with torch.no_grad():
        sub.mask_logits.down.weight.mul_(2000.0)  # logits of a few hundred: some columns at z/τ << −103
    encoding = torch.randn(5, D)
    logits = sub.mask_logits(encoding) / 0.5
    assert (logits < -120).any() and (logits > -60).any()  # both underflowing and ordinary columns
    w = sub(encoding)
    expected = sub.rotation().double()[None] * torch.sigmoid(logits.double()).sqrt()[:, None, :]
    torch.testing.assert_close(w.double(), expected, rtol=1e-5, atol=1e-30)
    (w * torch.randn_like(w)).sum().backward()
    for name, param in sub.named_parameters():
        assert torch.isfinite(param.grad).all(), name
