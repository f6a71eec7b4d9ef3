"""Exact match on the first label tokens, and cause / isolate / disentangle on hand-made cases."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from hyperdas.metrics import label_exact_match, records_from_batch, summarize


def _logits(predicted: list[list[int]], vocab: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), vocab).float()


def test_exact_match_on_the_first_three_label_tokens():
    labels = torch.tensor(
        [
            [1, 2, 3, 4],  # 4 tokens: only the first 3 count
            [1, 2, -100, -100],  # 2 tokens
            [5, -100, -100, -100],  # 1 token
            [1, 2, 3, 4],
            [1, 2, -100, -100],
        ]
    )
    predicted = [
        [1, 2, 3, 9],  # 4th wrong: still right
        [1, 2, 7, 7],  # padding ignored
        [5, 0, 0, 0],
        [1, 9, 3, 4],  # 2nd wrong
        [1, 3, 0, 0],  # 2nd wrong
    ]
    got = label_exact_match(_logits(predicted), labels)
    assert got.dtype == torch.bool and got.tolist() == [True, True, True, False, False]
    assert label_exact_match(_logits(predicted), labels, first_n=None).tolist() == [False, True, True, False, False]
    assert label_exact_match(_logits(predicted), labels, first_n=1).tolist() == [True, True, True, True, True]


def test_an_example_without_label_tokens_is_wrong():
    labels = torch.tensor([[-100, -100]])
    assert label_exact_match(_logits([[0, 0]]), labels).tolist() == [False]


def _records(attribute, kind, right, wrong, domain="city"):
    return [{"attribute": attribute, "attribute_type": kind, "correct": True, "domain": domain}] * right + [
        {"attribute": attribute, "attribute_type": kind, "correct": False, "domain": domain}
    ] * wrong


def test_summary_per_attribute_and_macro_overall():
    records = (
        _records("Country", "causal", 3, 1)  # cause 0.75
        + _records("Country", "isolate", 1, 1)  # isolate 0.5
        + _records("Continent", "causal", 1, 3)  # cause 0.25
        + _records("Continent", "isolate", 9, 1)  # isolate 0.9
    )
    summary = summarize(records)
    country, continent = summary["per_attribute"]["Country"], summary["per_attribute"]["Continent"]
    assert country == {"cause": 0.75, "isolate": 0.5, "disentangle": 0.625, "n_causal": 4, "n_isolate": 2}
    assert continent["disentangle"] == pytest.approx(0.575)
    overall = summary["overall"]
    # macro: every attribute weighs the same, whatever its number of examples
    assert overall["cause"] == pytest.approx(0.5)
    assert overall["isolate"] == pytest.approx(0.7)
    assert overall["disentangle"] == pytest.approx(0.6)
    assert (overall["n_causal"], overall["n_isolate"], overall["n_attributes"]) == (8, 12, 2)
    assert summary["per_domain"]["city"] == overall
    json.dumps(summary)


def test_an_attribute_without_isolate_examples_reports_none():
    records = _records("Country", "causal", 1, 1) + _records("Continent", "causal", 1, 0)
    records += _records("Continent", "isolate", 1, 3)
    summary = summarize(records)
    country = summary["per_attribute"]["Country"]
    assert country == {"cause": 0.5, "isolate": None, "disentangle": None, "n_causal": 2, "n_isolate": 0}
    overall = summary["overall"]
    assert overall["cause"] == pytest.approx(0.75)  # both attributes
    assert overall["isolate"] == pytest.approx(0.25)  # only Continent has isolate examples
    assert overall["disentangle"] == pytest.approx(0.5)
    only_causal = summarize(_records("Country", "causal", 1, 0))
    assert only_causal["overall"]["isolate"] is None and only_causal["overall"]["disentangle"] is None
    assert summarize([])["overall"]["cause"] is None


def test_per_domain_averages_and_records_from_a_batch():
    batch = SimpleNamespace(  # the three string fields of a PairBatch are all records_from_batch reads
        attribute=["Country", "Field", "Field"],
        attribute_type=["causal", "causal", "isolate"],
        domain=["city", "nobel_prize_winner", "nobel_prize_winner"],
    )
    records = records_from_batch(batch, torch.tensor([True, False, True]))
    assert records[1] == {
        "attribute": "Field",
        "attribute_type": "causal",
        "domain": "nobel_prize_winner",
        "correct": False,
    }
    summary = summarize(records)
    assert summary["per_domain"]["nobel_prize_winner"]["cause"] == 0.0
    assert summary["per_domain"]["nobel_prize_winner"]["isolate"] == 1.0
    assert summary["per_domain"]["city"]["cause"] == 1.0
    with pytest.raises(ValueError, match="unknown attribute_type 'both'"):
        summarize([{"attribute": "Country", "attribute_type": "both", "correct": True}])
