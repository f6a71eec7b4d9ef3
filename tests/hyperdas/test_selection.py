"""Inference modes of the selection on hand-made A (B=1, Ts=3 source tokens + SELF, Tb=4 base positions)."""

from __future__ import annotations

import pytest
import torch

from hyperdas.selection import apply_selection_mode, sharpen, straight_through

# rows: source 0, 1, 2, SELF; columns: base 0..3. Every column sums to 1.
A = torch.tensor(
    [
        [
            [0.10, 0.50, 0.05, 0.30],
            [0.60, 0.20, 0.05, 0.25],
            [0.10, 0.10, 0.10, 0.05],
            [0.20, 0.20, 0.80, 0.40],
        ]
    ]
)
ALL_BASE = torch.tensor([[True, True, True, True]])
ALL_SOURCE = torch.tensor([[True, True, True]])


def one_hot_columns(rows: list[int]) -> torch.Tensor:
    out = torch.zeros(1, 4, len(rows))
    out[0, rows, torch.arange(len(rows))] = 1.0
    return out


def test_soft_is_unchanged():
    assert torch.equal(apply_selection_mode(A, "soft", ALL_BASE, ALL_SOURCE), A)


def test_column_argmax():
    got = apply_selection_mode(A, "column_argmax", ALL_BASE, ALL_SOURCE)
    assert torch.equal(got, one_hot_columns([1, 0, 3, 3]))


def test_column_argmax_keeps_unselectable_columns_self():
    base = torch.tensor([[True, False, True, True]])
    got = apply_selection_mode(A, "column_argmax", base, ALL_SOURCE)
    assert torch.equal(got, one_hot_columns([1, 3, 3, 3]))


def test_bidding_argmax():
    # source 0 bids 0.50 for base 1; source 1 bids 0.60 for base 0; source 2 bids 0.10 for base 0 (tie: first).
    # SELF floored at 0.1: column 0: max(src1 0.60, self 0.20) -> 1; column 1: src0 0.50 vs self 0.20 -> 0;
    # column 2: no bid, self 0.80; column 3: no bid, self 0.40.
    got = apply_selection_mode(A, "bidding_argmax", ALL_BASE, ALL_SOURCE)
    assert torch.equal(got, one_hot_columns([1, 0, 3, 3]))


def test_bidding_argmax_differs_from_column_argmax_where_a_source_bids_elsewhere():
    # source 0 is the column max of both columns, but it bids only for its best base position (column 0);
    # column 1 then goes to source 1's bid 0.40 over SELF 0.15, where column_argmax gives source 0 (0.45).
    a = torch.tensor([[[0.50, 0.45], [0.10, 0.40], [0.40, 0.15]]])
    both = torch.tensor([[True, True]])
    column = apply_selection_mode(a, "column_argmax", both, both)
    bidding = apply_selection_mode(a, "bidding_argmax", both, both)
    want_column, want_bidding = torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)
    want_column[0, 0, :] = 1.0
    want_bidding[0, 0, 0] = want_bidding[0, 1, 1] = 1.0
    assert torch.equal(column, want_column)
    assert torch.equal(bidding, want_bidding)


def test_bidding_argmax_ignores_bids_of_unselectable_sources():
    a = torch.tensor([[[0.50, 0.45], [0.10, 0.40], [0.40, 0.15]]])
    got = apply_selection_mode(a, "bidding_argmax", torch.tensor([[True, True]]), torch.tensor([[False, True]]))
    want = torch.zeros(1, 3, 2)
    want[0, 2, 0] = want[0, 1, 1] = 1.0  # column 0: source 0 may not bid, SELF 0.40 wins
    assert torch.equal(got, want)


def test_bidding_argmax_self_floor_wins_against_weak_bids():
    weak = torch.tensor([[[0.05, 0.0], [0.0, 0.06], [0.95, 0.94]]])  # Ts=2; SELF row high
    weak[0, 2] = torch.tensor([0.0, 0.0])  # SELF weight 0 is floored to 0.1, which beats both bids
    got = apply_selection_mode(weak, "bidding_argmax", torch.tensor([[True, True]]), torch.tensor([[True, True]]))
    want = torch.zeros(1, 3, 2)
    want[0, 2] = 1.0
    assert torch.equal(got, want)


def test_global_argmax_patches_only_the_best_pair():
    got = apply_selection_mode(A, "global_argmax", ALL_BASE, ALL_SOURCE)
    assert torch.equal(got, one_hot_columns([1, 3, 3, 3]))  # (source 1, base 0) = 0.60 is the best pair


def test_global_argmax_ignores_unselectable_sources():
    source = torch.tensor([[True, False, True]])
    got = apply_selection_mode(A, "global_argmax", ALL_BASE, source)
    assert torch.equal(got, one_hot_columns([3, 0, 3, 3]))  # best remaining: (source 0, base 1) = 0.50


def test_groundtruth_maps_last_entity_token_to_last_entity_token():
    got = apply_selection_mode(A, "groundtruth", ALL_BASE, ALL_SOURCE, torch.tensor([2]), torch.tensor([0]))
    assert torch.equal(got, one_hot_columns([3, 3, 0, 3]))


def test_groundtruth_needs_entity_positions():
    with pytest.raises(ValueError, match="groundtruth"):
        apply_selection_mode(A, "groundtruth", ALL_BASE, ALL_SOURCE)


@pytest.mark.parametrize("mode", ["column_argmax", "bidding_argmax", "global_argmax"])
def test_hard_modes_give_one_hot_columns(mode):
    g = torch.Generator().manual_seed(3)
    soft = torch.rand(2, 6, 7, generator=g).softmax(dim=1)
    got = apply_selection_mode(soft, mode, torch.ones(2, 7, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(got.sum(dim=1), torch.ones(2, 7))
    assert set(got.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.13, 2.0])
def test_sharpen_is_the_softmax_of_the_logits_over_tau(temperature):
    """softmax(z / τ) computed directly from logits with masked (-inf) entries, against sharpen(softmax(z), τ)."""
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 7, dtype=torch.float64) * 3
    logits[0, 1, 2] = logits[1, :4, 6] = float("-inf")  # masked source tokens, one column with SELF only
    logits.requires_grad_(True)
    expected = torch.softmax(logits / temperature, dim=1)
    got = sharpen(torch.softmax(logits, dim=1), temperature)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    assert float(got[0, 1, 2].detach()) == 0.0 and torch.equal(got[1, 4, 6], torch.tensor(1.0, dtype=torch.float64))
    upstream = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), logits)
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), logits)
    assert torch.isfinite(grad_got).all()
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-10, atol=1e-12)


def test_a_low_temperature_makes_soft_columns_their_argmax():
    hard = apply_selection_mode(A, "column_argmax", ALL_BASE, ALL_SOURCE)
    torch.testing.assert_close(sharpen(A, 0.01), hard, atol=1e-6, rtol=0)


def test_straight_through_is_the_hard_value_exactly_and_passes_the_gradient_to_the_soft_selection():
    """Value: the one-hot columns bit for bit (the patch is the hard mode's). Gradient: whatever reaches the
    selection goes to A unchanged, as if A had been used at the hard point."""
    soft = A.clone().requires_grad_(True)
    hard = apply_selection_mode(soft, "column_argmax", ALL_BASE, ALL_SOURCE)
    selection = straight_through(hard, soft)
    assert torch.equal(selection.detach(), one_hot_columns([1, 0, 3, 3]))
    upstream = torch.arange(16.0).view(1, 4, 4) - 7.5
    selection.backward(upstream)
    torch.testing.assert_close(soft.grad, upstream, rtol=0, atol=0)
