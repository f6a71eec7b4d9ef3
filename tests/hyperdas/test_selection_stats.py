"""Where a selection moves information, on hand-made selections whose answer is known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hyperdas.selection_stats import selection_stats, summarize_selection


def _batch(n: int = 1) -> SimpleNamespace:
    """The PairBatch fields selection_stats reads: base of 6 tokens with the entity at 2..3, source of 5 tokens
    with the entity at 1..2."""
    return SimpleNamespace(
        base_entity_first=torch.tensor([2] * n),
        base_entity_last=torch.tensor([3] * n),
        source_entity_first=torch.tensor([1] * n),
        source_entity_last=torch.tensor([2] * n),
        attribute=["Country"] * n,
        attribute_type=["causal"] * n,
    )


def _keep_all(ts: int = 5, tb: int = 6) -> torch.Tensor:
    a = torch.zeros(1, ts + 1, tb)
    a[0, ts] = 1.0
    return a


def test_entity_to_entity_moves_score_one():
    a = _keep_all()
    a[0, 5, 3] = 0.0
    a[0, 2, 3] = 1.0  # last source entity token into the last base entity token
    (row,) = selection_stats(a, _batch())
    assert row["moved"] == pytest.approx(1.0)
    for name in ("base_entity_share", "last_entity_share", "source_entity_share", "entity_to_entity_share"):
        assert row[name] == pytest.approx(1.0), name
    assert row["base_last"] == pytest.approx(1.0) and row["source_last"] == pytest.approx(1.0)


def test_injecting_through_the_template_scores_zero_on_the_entity():
    a = _keep_all()
    a[0, 5, 0] = 0.25  # the base's first template token takes 3/4 from the source's last (suffix) token
    a[0, 4, 0] = 0.75
    a[0, 5, 5] = 0.5  # and the base's last token half from the source's first token
    a[0, 0, 5] = 0.5
    (row,) = selection_stats(a, _batch())
    assert row["moved"] == pytest.approx(1.25)
    assert row["base_entity_share"] == 0 and row["source_entity_share"] == 0 and row["entity_to_entity_share"] == 0
    assert row["base_before"] == pytest.approx(0.6) and row["base_after"] == pytest.approx(0.4)
    assert row["source_after"] == pytest.approx(0.6) and row["source_before"] == pytest.approx(0.4)


def test_nothing_moved_has_no_shares_and_summaries_average_what_exists():
    (still,) = selection_stats(_keep_all(), _batch())
    assert still["moved"] == 0 and still["base_entity_share"] is None
    moved = _keep_all()
    moved[0, 5, 2], moved[0, 1, 2] = 0.5, 0.5  # half of source entity token 1 into base entity token 2
    rows = selection_stats(torch.cat([_keep_all(), moved]), _batch(2))
    summary = summarize_selection(rows)
    assert summary["overall"]["n"] == 2 and summary["overall"]["moved"] == pytest.approx(0.25)
    assert summary["overall"]["base_entity_share"] == pytest.approx(1.0)  # the empty row is left out
    assert summary["overall"]["last_entity_share"] == pytest.approx(0.0)
    assert set(summary["per_group"]) == {"Country/causal"}
