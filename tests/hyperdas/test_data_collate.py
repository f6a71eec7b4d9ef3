"""The collator's batch contract, for a tokenizer without BOS (SmolLM2) and one that adds it (Llama-3 style)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hyperdas.data.collate import Collator, dataloader, label_token_ids, leading_special_ids
from hyperdas.data.examples import label_text, label_value, make_examples
from hyperdas.targets import embedded_default_folder

KEYS = {
    "base_input_ids",
    "base_attention_mask",
    "base_intervention_mask",
    "source_input_ids",
    "source_attention_mask",
    "source_intervention_mask",
    "label_positions",
    "label_ids",
    "instruction_input_ids",
    "instruction_attention_mask",
    "base_entity_last",
    "base_entity_first",
    "source_entity_last",
    "source_entity_first",
    "is_causal",
    "attribute",
    "domain",
    "attribute_type",
}


@pytest.fixture(scope="module")
def examples():
    rows = make_examples("city", ["Country", "Continent"], 6, seed=11)
    rows += make_examples("verb", ["Past Tense", "Singular"], 2, seed=11)
    return rows


@pytest.fixture(scope="module", params=["smollm2", "with_bos"])
def tokenizer(request, smollm2):
    if request.param == "smollm2":
        return smollm2.tokenizer
    from transformers import AutoTokenizer

    # SmolLM2's tokenizer made to add BOS to every prompt, as Llama-3's does with <|begin_of_text|>
    return AutoTokenizer.from_pretrained(embedded_default_folder(), add_bos_token=True)


def _real(batch, name, b):
    return getattr(batch, f"{name}_input_ids")[b][getattr(batch, f"{name}_attention_mask")[b].bool()].tolist()


def test_bos_is_added_exactly_as_for_a_whole_prompt(tokenizer, examples):
    lead = leading_special_ids(tokenizer)
    batch = Collator(tokenizer)(examples)
    bos = tokenizer.bos_token_id
    for b, e in enumerate(examples):
        whole = tokenizer(e["input_prefix"] + e["input_suffix"]).input_ids
        base = _real(batch, "base", b)
        source = _real(batch, "source", b)
        instruction = _real(batch, "instruction", b)
        assert whole[: len(lead)] == base[: len(lead)] == source[: len(lead)] == instruction[: len(lead)] == lead
        for row in (base, source, instruction):
            assert row.count(bos) == len(lead)  # once for a BOS tokenizer, never for SmolLM2
        assert instruction[len(lead) :] == tokenizer(e["edit_instruction"], add_special_tokens=False).input_ids
    assert lead == ([bos] if tokenizer.add_bos_token else [])


def test_the_last_entity_token_is_selectable(tokenizer, examples):
    """The reference's defect (double BOS, suffix off by one) made this token unselectable."""
    batch = Collator(tokenizer)(examples)
    for b, e in enumerate(examples):
        for name, entity, last in (
            ("base", e["entity"], batch.base_entity_last[b]),
            ("source", e["counterfactual_entity"], batch.source_entity_last[b]),
        ):
            assert getattr(batch, f"{name}_intervention_mask")[b, last]
            token = tokenizer.decode([int(getattr(batch, f"{name}_input_ids")[b, last])])
            assert token.strip() and entity.endswith(token.strip()), (entity, token)
            assert not getattr(batch, f"{name}_intervention_mask")[b, last + 1 :].any()


def test_the_entity_spans_spell_the_entities(tokenizer, examples):
    batch = Collator(tokenizer)(examples)
    for b, e in enumerate(examples):
        for name, entity in (("base", e["entity"]), ("source", e["counterfactual_entity"])):
            first, last = int(getattr(batch, f"{name}_entity_first")[b]), int(getattr(batch, f"{name}_entity_last")[b])
            span = tokenizer.decode(getattr(batch, f"{name}_input_ids")[b, first : last + 1].tolist())
            before = tokenizer.decode(getattr(batch, f"{name}_input_ids")[b, first + 1 : last + 1].tolist())
            assert entity in span and entity not in before, (entity, span)  # the shortest span that spells it
            assert getattr(batch, f"{name}_intervention_mask")[b, first : last + 1].all()


def test_masks_cover_the_prefix_only(tokenizer, examples):
    lead = leading_special_ids(tokenizer)
    batch = Collator(tokenizer)(examples)
    for b, e in enumerate(examples):
        for name, prefix in (("base", e["input_prefix"]), ("source", e["counterfactual_input_prefix"])):
            mask = getattr(batch, f"{name}_intervention_mask")[b]
            assert mask.dtype == torch.bool
            assert not (mask & ~getattr(batch, f"{name}_attention_mask")[b].bool()).any()  # never padding
            selected = getattr(batch, f"{name}_input_ids")[b][mask].tolist()
            assert selected == tokenizer(prefix, add_special_tokens=False).input_ids
            assert tokenizer.decode(selected) == prefix
            first = mask.shape[0] - len(_real(batch, name, b))
            assert not mask[first : first + len(lead)].any()  # never BOS
    with_suffix = Collator(tokenizer, include_base_suffix=True)(examples)
    for b, e in enumerate(examples):
        selected = with_suffix.base_input_ids[b][with_suffix.base_intervention_mask[b]].tolist()
        assert tokenizer.decode(selected) == e["input_prefix"] + e["input_suffix"]
        labels = with_suffix.label_positions[b][with_suffix.label_ids[b] != -100] + 1
        assert not with_suffix.base_intervention_mask[b, labels].any()  # labels never selectable


def test_labels_are_teacher_forced_continuations(tokenizer, examples):
    batch = Collator(tokenizer)(examples)
    positions, ids = batch.label_positions, batch.label_ids
    assert positions.shape == ids.shape and positions.dtype == ids.dtype == torch.long
    for b, e in enumerate(examples):
        real = ids[b] != -100
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()
        # logits at position p predict token p + 1, and the label tokens end the base row
        assert torch.equal(batch.base_input_ids[b, positions[b, :n] + 1], ids[b, :n])
        assert positions[b, n - 1] == batch.base_input_ids.shape[1] - 2
        assert (positions[b, n:] == positions[b, n - 1]).all()  # padding points at a valid index
        prompt = e["input_prefix"] + e["input_suffix"]
        assert tokenizer.decode(ids[b, :n].tolist()) == label_text(prompt, label_value(e))
    assert batch.is_causal.tolist() == [e["attribute_type"] == "causal" for e in examples]
    assert batch.attribute == [e["attribute"] for e in examples]
    assert {f.name for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None} == KEYS  # all filled


def test_label_tokens_follow_the_prompt(smollm2):
    tok = smollm2.tokenizer
    json_prompt = '{"city": "Aalborg", "country": "'
    plain = "Aalborg is a city in the country of"
    json_label, plain_label = label_token_ids(tok, [json_prompt, plain], ["Denmark", "Denmark"])
    assert [tok.decode([t]) for t in json_label] == ["Den", "mark"]
    assert [tok.decode([t]) for t in plain_label] == [" Denmark"]
    # '"' and '-' merge into one token: the label is tokenised alone after the prompt's own tokens
    (merged,) = label_token_ids(tok, ['"lat": "'], ["-26"])
    assert tok.decode(merged) == "-26"


def test_left_padding_and_dataloader(smollm2, examples):
    collator = Collator(smollm2.tokenizer)
    batches = list(dataloader(examples, collator, batch_size=5, shuffle=True, seed=1))
    again = list(dataloader(examples, collator, batch_size=5, shuffle=True, seed=1))
    assert len(batches) == -(-len(examples) // 5) and all(
        torch.equal(a.base_input_ids, b.base_input_ids) for a, b in zip(batches, again, strict=True)
    )
    for batch in batches:
        for name in ("base", "source", "instruction"):
            mask = getattr(batch, f"{name}_attention_mask")
            assert mask.dtype == torch.long and mask[:, -1].all()  # left padded: every row ends with a token
            assert (mask.diff(dim=1) >= 0).all()


def test_empty_batch_is_refused(smollm2):
    with pytest.raises(ValueError, match="empty batch"):
        Collator(smollm2.tokenizer)([])
