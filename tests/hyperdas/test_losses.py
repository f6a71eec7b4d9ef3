"""The training objective by hand: weighted label cross-entropy and the hinge sparsity penalty (METHOD.md)."""

from __future__ import annotations

import math

import torch

from hyperdas.model import LossWeights, sparsity_penalty, weighted_label_loss


def test_default_loss_weights_are_methods():
    assert (LossWeights().causal, LossWeights().isolate, LossWeights().sparsity) == (3.5, 0.5, 0.0)


def test_weighted_label_loss_by_hand():
    """Example 0 is causal (x3.5) with two label tokens, example 1 isolate (x0.5) with one (the other padded)."""
    logits = torch.tensor(
        [[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [5.0, 5.0, 5.0]]], dtype=torch.float64
    )  # (B=2, P=2, V=3)
    labels = torch.tensor([[0, 2], [1, -100]])

    def nll(row, label):
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    ce0 = (nll([2.0, 0.0, 0.0], 0) + nll([0.0, 1.0, 0.0], 2)) / 2
    ce1 = nll([0.0, 0.0, 3.0], 1)
    got = weighted_label_loss(logits, labels, torch.tensor([True, False]), LossWeights(causal=3.5, isolate=0.5))
    assert math.isclose(got.item(), (3.5 * ce0 + 0.5 * ce1) / 2, rel_tol=1e-14)
    swapped = weighted_label_loss(logits, labels, torch.tensor([False, True]), LossWeights(causal=3.5, isolate=0.5))
    assert math.isclose(swapped.item(), (0.5 * ce0 + 3.5 * ce1) / 2, rel_tol=1e-14)


def _selection(taken: list[float], tb: int = 4) -> torch.Tensor:
    """A (1, Ts+1, Tb) whose source row i sums to taken[i] over the base columns (SELF row left at 0.7)."""
    rows = [[t / tb] * tb for t in taken] + [[0.7] * tb]
    return torch.tensor([rows], dtype=torch.float64, requires_grad=True)


def test_sparsity_penalty_is_the_hinge_over_source_rows():
    a = _selection([1.5, 0.7, 1.0, 2.25])
    penalty = sparsity_penalty(a)
    assert math.isclose(penalty.item(), 0.5 + 0.0 + 0.0 + 1.25, rel_tol=1e-14)  # the SELF row (2.8) not counted
    penalty.backward()
    grad = a.grad[0, :, 0]
    assert grad.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]  # slope 1 above σ = 1, 0 below, none on SELF


def test_sparsity_penalty_is_continuous_at_one():
    """The reference added σ itself where σ > 1: a jump from 0 to 1 at σ = 1. The hinge goes through 0."""
    for delta in (1e-3, 1e-6):
        above = sparsity_penalty(_selection([1.0 + delta])).item()
        below = sparsity_penalty(_selection([1.0 - delta])).item()
        assert math.isclose(above, delta, rel_tol=1e-9) and below == 0.0


def test_sparsity_penalty_is_a_batch_mean():
    a = torch.cat([_selection([1.5]), _selection([3.0])]).detach()
    assert math.isclose(sparsity_penalty(a).item(), (0.5 + 2.0) / 2, rel_tol=1e-14)
