"""The subspaces' overlap by attribute, against pairwise cosines computed one pair at a time."""

from __future__ import annotations

import itertools

import pytest
import torch

from hyperdas.subspace import ReflectSelect
from hyperdas.subspace_overlap import SubspaceOverlap


def _pairwise_mean(bases: torch.Tensor, groups: list[str], a: str, b: str) -> float:
    """mean of trace(P_i P_j) / (‖P_i‖_F ‖P_j‖_F) over i in a, j in b, i ≠ j, with the (D, D) operators formed."""
    ops = [w @ w.T for w in bases.double()]
    values = [
        float(torch.trace(ops[i] @ ops[j]) / (ops[i].norm() * ops[j].norm()))
        for i, j in itertools.product(range(len(groups)), repeat=2)
        if groups[i] == a and groups[j] == b and i != j
    ]
    return sum(values) / len(values)


def test_the_table_is_the_mean_pairwise_cosine_of_the_operators():
    """Odd shapes (D=11, r=3), bases neither orthonormal nor of equal norm, groups interleaved and added in two
    batches: every cell equals the mean over explicit pairs."""
    g = torch.Generator().manual_seed(0)
    bases = torch.randn(9, 11, 3, generator=g) * torch.rand(9, 1, 1, generator=g) * 5
    groups = ["Country", "Continent", "Country", "Language", "Continent", "Country", "Language", "Continent", "Country"]
    overlap = SubspaceOverlap()
    overlap.add(bases[:4], groups[:4])
    overlap.add(bases[4:], groups[4:])
    table = overlap.table()
    assert list(table) == ["Continent", "Country", "Language"]
    for a, b in itertools.product(table, repeat=2):
        assert table[a][b] == pytest.approx(_pairwise_mean(bases, groups, a, b), rel=1e-10), (a, b)


def test_same_subspace_is_one_orthogonal_is_zero_and_a_lone_example_has_no_diagonal():
    eye = torch.eye(6, dtype=torch.float64)
    first, second, rotated = eye[:, :2], eye[:, 2:4], eye[:, :2] @ torch.tensor([[0.6, -0.8], [0.8, 0.6]]).double()
    overlap = SubspaceOverlap()
    overlap.add(torch.stack([first, rotated, second]), ["a", "a", "b"])
    table = overlap.table()
    assert table["a"]["a"] == pytest.approx(1.0)  # a rotation within the subspace is the same subspace
    assert table["a"]["b"] == pytest.approx(0.0, abs=1e-15)
    assert table["b"]["b"] is None


def test_reflect_select_subspaces_share_all_but_two_dimensions():
    """W = (I − 2vvᵀ) R for any v: every pair overlaps by at least (r − 2)/r (here 5/7), and random reflections
    of a random basis come close to that bound."""
    torch.manual_seed(0)
    module = ReflectSelect(17, 7).double()
    with torch.no_grad():
        bases = module(torch.randn(12, 17, dtype=torch.float64) * 3)
    overlap = SubspaceOverlap()
    overlap.add(bases, ["x"] * 6 + ["y"] * 6)
    values = [v for row in overlap.table().values() for v in row.values()]
    assert min(values) >= 5 / 7 - 1e-12
    pairs = [_pairwise_mean(bases[[i, j]], ["x", "y"], "x", "y") for i in range(12) for j in range(i + 1, 12)]
    assert min(pairs) >= 5 / 7 - 1e-12 and min(pairs) < 5 / 7 + 0.1


def test_k_reflections_let_two_subspaces_share_as_few_as_r_minus_2k_dimensions():
    """With K = 3 reflections of a rank-7 basis in D = 17 the bound falls to (7 − 6)/7, and random reflections go
    well below the one-reflection bound 5/7 (on average too; a single pair may land near it by chance)."""
    torch.manual_seed(1)
    module = ReflectSelect(17, 7, reflections=3).double()
    with torch.no_grad():
        bases = module(torch.randn(12, 17, dtype=torch.float64) * 3)
    pairs = [_pairwise_mean(bases[[i, j]], ["x", "y"], "x", "y") for i in range(12) for j in range(i + 1, 12)]
    assert min(pairs) >= 1 / 7 - 1e-12 and min(pairs) < 5 / 7 - 0.2 and sum(pairs) / len(pairs) < 5 / 7


def test_a_basis_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"basis must be \(B, D, r\) with B = 2 groups, got \(5, 3\)"):
        SubspaceOverlap().add(torch.zeros(5, 3), ["a", "b"])
