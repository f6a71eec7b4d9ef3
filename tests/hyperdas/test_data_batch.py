"""The typed batch: built from a dict of its fields or not at all, and moved with every tensor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hyperdas.data.batch import PairBatch
from hyperdas.testing import make_batch


def _fields(batch: PairBatch) -> dict:
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None}


def test_a_dict_of_the_fields_is_taken_and_a_typo_or_a_missing_field_is_refused():
    batch = make_batch(50, batch=3)
    fields = _fields(batch)
    again = PairBatch.from_mapping(fields)
    assert all(torch.equal(getattr(again, k), v) for k, v in fields.items())
    assert PairBatch.from_mapping(batch) is batch
    with pytest.raises(ValueError, match=r"unknown batch fields \['label_idz'\]"):
        PairBatch.from_mapping({**fields, "label_idz": fields["label_ids"]})
    without = {k: v for k, v in fields.items() if k != "source_attention_mask"}
    with pytest.raises(ValueError, match=r"needs the fields \['source_attention_mask'\]"):
        PairBatch.from_mapping(without)
    no_labels = {k: v for k, v in fields.items() if k not in ("label_ids", "label_positions")}
    assert not PairBatch.from_mapping(no_labels).has_labels and batch.has_labels


def test_to_moves_every_tensor_and_shares_the_string_lists():
    batch = make_batch(50, batch=5, tb=11, ts=6)
    batch.attribute = list("abcde")
    moved = batch.to(torch.device("meta"))
    assert all(v.device.type == "meta" for v in _fields(moved).values() if isinstance(v, torch.Tensor))
    assert moved.attribute is batch.attribute and batch.base_input_ids.device.type == "cpu"
