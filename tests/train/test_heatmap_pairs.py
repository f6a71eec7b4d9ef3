"""Which test pairs the selection heatmap pictures (train/evaluate.pick_heatmap_pairs)."""

from __future__ import annotations

from hyperdas.train.evaluate import pick_heatmap_pairs


def _rows(shares):
    return [{"index": i, "base_entity_share": s} for i, s in enumerate(shares)]


def test_the_heatmap_shows_the_most_and_the_least_localising_pairs():
    rows = _rows([0.5, 0.9, None, 0.1, 0.8, 0.3])
    assert [r["index"] for r in pick_heatmap_pairs(rows, 4)] == [1, 4, 3, 5]
    assert [r["index"] for r in pick_heatmap_pairs(rows, 3)] == [1, 4, 3]
    assert [r["index"] for r in pick_heatmap_pairs(rows, 1)] == [1]
    assert pick_heatmap_pairs(rows, 0) == []


def test_pairs_that_move_nothing_fill_up_only_when_too_few_move():
    rows = _rows([None, 0.2, None])
    assert [r["index"] for r in pick_heatmap_pairs(rows, 3)] == [1, 0, 2]
    assert [r["index"] for r in pick_heatmap_pairs(rows, 8)] == [1, 0, 2]


def test_each_half_spreads_over_attributes_and_kinds_while_it_can():
    rows = [
        {"index": i, "base_entity_share": s, "attribute": a, "attribute_type": k}
        for i, (s, a, k) in enumerate(
            [
                (0.9, "Country", "causal"),
                (0.8, "Country", "causal"),
                (0.7, "Continent", "causal"),
                (0.2, "Country", "isolate"),
                (0.1, "Country", "isolate"),
                (0.05, "Continent", "isolate"),
            ]
        )
    ]
    assert [r["index"] for r in pick_heatmap_pairs(rows, 4)] == [0, 2, 5, 4]
    assert [r["index"] for r in pick_heatmap_pairs(rows, 6)] == [0, 2, 1, 5, 4, 3]
    assert [r["index"] for r in pick_heatmap_pairs(rows, 2)] == [0, 5]
