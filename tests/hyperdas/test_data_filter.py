"""Per-model filtering: teacher-forced argmax on every label token, at the right positions, with a report."""

from __future__ import annotations

import pytest
import torch

from hyperdas.data.collate import Collator, label_token_ids
from hyperdas.data.examples import label_value, make_examples
from hyperdas.data.filtering import filter_examples, filter_report, format_report, verify_parts


class OracleTarget:
    """A stand-in target whose argmax at position p is the token at p + 1 (it knows every continuation),
    except for the ``blind`` token ids, where it predicts token 0. Counts its forward calls."""

    def __init__(self, tokenizer, blind: set[int] = frozenset(), name: str = "oracle"):
        self.tokenizer, self.blind, self.name = tokenizer, set(blind), name
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.calls = 0
        self.vocab = len(tokenizer)

    def logits_at(self, input_ids, attention_mask, positions):
        self.calls += 1
        assert attention_mask[:, -1].all(), "rows must be left padded"
        following = input_ids.gather(1, positions + 1)  # (B, P)
        following = torch.where(torch.isin(following, torch.tensor(sorted(self.blind), dtype=torch.long)), 0, following)
        return torch.nn.functional.one_hot(following, self.vocab).float()


@pytest.fixture(scope="module")
def examples():
    return make_examples("city", ["Country", "Continent"], 8, seed=5)


def test_the_oracle_keeps_everything(smollm2, examples):
    oracle = OracleTarget(smollm2.tokenizer)
    assert filter_examples(oracle, examples, batch_size=7, progress=False) == [True] * len(examples)
    assert oracle.calls == -(-len(examples) // 7)


def test_a_single_wrong_label_token_rejects(smollm2, examples):
    tok = smollm2.tokenizer
    labels = label_token_ids(tok, [e["verify_text"] for e in examples], [label_value(e) for e in examples])
    multi = next(i for i, ids in enumerate(labels) if len(ids) > 1)
    blind = {labels[multi][-1]}  # only the LAST token of one label
    keep = filter_examples(OracleTarget(tok, blind), examples, batch_size=4, progress=False)
    assert keep[multi] is False
    assert keep == [not (blind & set(ids)) for ids in labels]


def test_isolate_examples_are_checked_on_their_training_tokens(smollm2, examples):
    """The filter's verify prompt of an isolate example is the collator's base prompt, token for token."""
    tok = smollm2.tokenizer
    isolate = [e for e in examples if e["attribute_type"] == "isolate"]
    batch = Collator(tok)(isolate)
    seen = []

    class Spy(OracleTarget):
        def logits_at(self, input_ids, attention_mask, positions):
            seen.extend(input_ids[b][attention_mask[b].bool()].tolist() for b in range(len(input_ids)))
            return super().logits_at(input_ids, attention_mask, positions)

    filter_examples(Spy(tok), isolate, batch_size=len(isolate), progress=False)
    rows = [batch["base_input_ids"][b][batch["base_attention_mask"][b].bool()].tolist() for b in range(len(isolate))]
    assert sorted(seen) == sorted(rows)


def test_causal_verify_text_is_the_base_template_with_the_source_entity(examples):
    for e in examples:
        prefix, suffix = verify_parts(e)
        assert suffix == e["input_suffix"]
        expected = e["counterfactual_entity"] if e["attribute_type"] == "causal" else e["entity"]
        assert prefix.endswith(expected)


def test_report_counts_per_split_attribute_and_type(examples):
    keep = [i % 3 == 0 for i in range(len(examples))]
    rows = filter_report(examples, keep)
    assert len(rows) == 2 * 2 * 2
    assert all(r["total"] == 8 for r in rows)
    assert sum(r["kept"] for r in rows) == sum(keep)
    table = format_report(rows)
    assert "Country" in table and "isolate" in table and f"{sum(keep)}" in table.splitlines()[-1]


def test_the_embedded_default_knows_some_facts_and_not_others(smollm2):
    def example(prefix, suffix, value):
        return {
            "verify_text": prefix + suffix,
            "input_suffix": suffix,
            "attribute_type": "isolate",
            "target": value,
            "counterfactual_target": "",
        }

    cases = [
        ("Tokyo", " is a city in the continent of", "Asia", True),
        ("Tokyo", " is a city in the continent of", "Africa", False),
        ("Paris", " is a city in the country of", "France", True),
        ("Paris", " is a city in the country of", "Germany", False),
        ("Berlin", " is a city in the country of", "Germany", True),
    ]
    keep = filter_examples(smollm2, [example(*c[:3]) for c in cases], batch_size=2, progress=False)
    assert keep == [c[3] for c in cases]


def test_the_embedded_default_agrees_with_a_plain_forward(smollm2):
    """Batched, left-padded, logits-at-labels filtering equals a one-example full forward's argmax check."""
    examples = make_examples("city", ["Continent"], 2, splits=["test"], seed=2)
    keep = filter_examples(smollm2, examples, batch_size=4, progress=False)
    tok = smollm2.tokenizer
    for e, kept in zip(examples, keep, strict=True):
        prefix, suffix = verify_parts(e)
        prompt = tok(prefix, add_special_tokens=False).input_ids + tok(suffix, add_special_tokens=False).input_ids
        (label,) = label_token_ids(tok, [e["verify_text"]], [label_value(e)])
        with torch.no_grad():
            logits = smollm2.model(torch.tensor([prompt + label])).logits[
                0, len(prompt) - 1 : len(prompt) - 1 + len(label)
            ]
        top2 = logits.topk(2, dim=-1).values
        if (top2[:, 0] - top2[:, 1]).min() > 1e-3:  # not a near-tie that padding could flip
            assert kept == (logits.argmax(-1).tolist() == label)
    assert any(keep)
