"""Known prompts: the teacher-forced check per (entity, template), its universe and its cached table."""

from __future__ import annotations

import json
import random

import pytest
import torch

from hyperdas.data import known as known_module
from hyperdas.data.collate import Collator, label_token_ids
from hyperdas.data.examples import fill, make_examples
from hyperdas.data.known import (
    KnownPromptTable,
    Prompt,
    check_prompts,
    ensure_known,
    equal_length_batches,
    prompt_universe,
)
from hyperdas.data.ravel import load_domain
from hyperdas.targets import EMBEDDED_DEFAULT, load_target
from hyperdas.testing import PlantedTarget

CITY = load_domain("city")


@pytest.fixture(scope="module")
def prompts():
    return prompt_universe(CITY, ["Country", "Continent"], 3)[:60]


def test_a_planted_known_set_is_found_exactly(smollm2, prompts):
    planted = {p.entity for p in prompts[::3]}
    target = PlantedTarget(smollm2.tokenizer, planted)
    known = check_prompts(target, CITY, prompts, batch_size=7, progress=False)
    assert known == [p.entity in planted for p in prompts]
    assert target.rows_seen == len(prompts) and target.calls < len(prompts)  # batched, each prompt once


def test_equal_length_batches_never_mix_lengths_and_cover_each_index_once():
    lengths = [5, 3, 5, 9, 3, 5, 5, 1, 5]
    batches = equal_length_batches(lengths, 3)
    assert batches == [[7], [1, 4], [0, 2, 5], [6, 8], [3]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert equal_length_batches([], 4) == []


class _LabelLogits:
    """Wraps a real target and keeps each row's logits at its label positions, keyed by the row's tokens."""

    def __init__(self, target):
        self.inner, self.tokenizer, self.device = target, target.tokenizer, target.device
        self.seen: dict[tuple[int, ...], torch.Tensor] = {}

    def logits_at(self, input_ids, attention_mask, positions):
        logits = self.inner.logits_at(input_ids, attention_mask, positions)
        for b in range(len(input_ids)):
            self.seen[tuple(input_ids[b][attention_mask[b].bool()].tolist())] = logits[b].float().clone()
        return logits


def test_a_prompts_answer_in_bf16_is_the_same_alone_and_in_any_batch():
    """The bf16 check must not depend on which prompts share its batch: padded, 14 of these 40 rows' logits change
    (and a near-tie's argmax with them); a tiny random Llama is too narrow to show it, so this is SmolLM2 itself."""
    bf16 = load_target(EMBEDDED_DEFAULT, dtype=torch.bfloat16)
    prompts = prompt_universe(CITY, ["Country", "Continent"], 3)[:40]
    alone = _LabelLogits(bf16)
    for p in prompts:
        check_prompts(alone, CITY, [p], progress=False)
    for batch_size, shuffle_seed in ((64, 0), (5, 1), (3, 2)):
        order = list(prompts)
        random.Random(shuffle_seed).shuffle(order)
        batched = _LabelLogits(bf16)
        check_prompts(batched, CITY, order, batch_size=batch_size, progress=False)
        assert batched.seen.keys() == alone.seen.keys()
        for row, logits in alone.seen.items():  # alone, a row has no label padding: its label length
            assert torch.equal(batched.seen[row][: len(logits)], logits), "a prompt's logits changed with its batch"


def test_a_single_wrong_label_token_makes_a_prompt_unknown(smollm2, prompts):
    tok = smollm2.tokenizer
    texts = ["".join(fill(p.template, p.entity)) for p in prompts]
    labels = label_token_ids(tok, texts, [CITY.value(p.entity, p.attribute) for p in prompts])
    multi = next(i for i, ids in enumerate(labels) if len(ids) > 1)

    class BlindToLastToken(PlantedTarget):
        def logits_at(self, input_ids, attention_mask, positions):
            logits = super().logits_at(input_ids, attention_mask, positions)
            wrong = input_ids.gather(1, positions + 1) == labels[multi][-1]
            return torch.where(wrong[..., None], torch.roll(logits, 1, dims=-1), logits)

    known = check_prompts(BlindToLastToken(tok), CITY, prompts, batch_size=4, progress=False)
    assert known[multi] is False
    assert known == [labels[multi][-1] not in ids for ids in labels]


def test_prompts_are_checked_on_the_collators_base_tokens(smollm2):
    """An isolate example's base prompt is a known prompt: the check sees exactly the collator's base row."""
    tok = smollm2.tokenizer
    rows = make_examples("city", ["Country", "Continent"], 4, seed=5)
    isolate = [e for e in rows if e["attribute_type"] == "isolate"]
    batch = Collator(tok)(isolate)
    seen = []

    class Spy(PlantedTarget):
        def logits_at(self, input_ids, attention_mask, positions):
            seen.extend(input_ids[b][attention_mask[b].bool()].tolist() for b in range(len(input_ids)))
            return super().logits_at(input_ids, attention_mask, positions)

    as_prompts = [Prompt(e["queried_attribute"], e["template"], e["entity"]) for e in isolate]
    check_prompts(Spy(tok), CITY, as_prompts, batch_size=len(isolate), progress=False)
    rows = [batch.base_input_ids[b][batch.base_attention_mask[b].bool()].tolist() for b in range(len(isolate))]
    assert sorted(seen) == sorted(rows)


def test_the_embedded_default_knows_some_facts_and_not_others(smollm2):
    template = "%s is a city in the continent of"
    cases = [("Tokyo", "Asia", True), ("Paris", "Europe", True)]
    fake = {"Tokyo": {"Continent": "Africa"}, "Paris": {"Continent": "Europe"}}

    class Toy:
        name = "toy"

        @staticmethod
        def value(entity, attribute):
            return fake[entity][attribute]

    known = check_prompts(smollm2, Toy, [Prompt("Continent", template, e) for e, _, _ in cases], progress=False)
    assert known == [False, True]  # it does not answer Africa for Tokyo, it does answer Europe for Paris
    real = check_prompts(smollm2, CITY, [Prompt("Country", "%s is a city in the country of", "Berlin")], progress=False)
    assert real == [True]


def test_the_embedded_default_agrees_with_a_plain_forward(smollm2):
    """Batched, unpadded, logits-at-labels checking equals a one-prompt full forward's argmax check."""
    tok = smollm2.tokenizer
    prompts = prompt_universe(CITY, ["Continent"], 2)[:10]
    known = check_prompts(smollm2, CITY, prompts, batch_size=4, progress=False)
    for prompt, ok in zip(prompts, known, strict=True):
        prefix, suffix = fill(prompt.template, prompt.entity)
        row = tok(prefix, add_special_tokens=False).input_ids + tok(suffix, add_special_tokens=False).input_ids
        (label,) = label_token_ids(tok, [prefix + suffix], [CITY.value(prompt.entity, prompt.attribute)])
        with torch.no_grad():
            logits = smollm2.model(torch.tensor([row + label])).logits[0, len(row) - 1 : len(row) - 1 + len(label)]
        top2 = logits.topk(2, dim=-1).values
        if (top2[:, 0] - top2[:, 1]).min() > 1e-3:  # not a near-tie that padding could flip
            assert ok == (logits.argmax(-1).tolist() == label)
    assert any(known)


def test_the_universe_does_not_depend_on_seed_split_or_attribute_set():
    small = prompt_universe(CITY, ["Country"], 4)
    assert small == prompt_universe(CITY, ["Country"], 4)
    both = prompt_universe(CITY, ["Continent", "Country"], 4)
    assert set(small) <= set(both) and len(both) == 4 * (len(CITY.attribute_prompts["Country"]) + 43)
    assert set(small) <= set(prompt_universe(CITY, ["Country"], 9))  # a bigger universe contains a smaller one
    for p in small:
        assert CITY.value(p.entity, "Country")
    with pytest.raises(ValueError, match="entities_per_template must be at least 1"):
        prompt_universe(CITY, ["Country"], 0)


def test_the_table_checks_each_prompt_once_and_keeps_its_identity(smollm2, prompts, tmp_path):
    target = PlantedTarget(smollm2.tokenizer, {prompts[0].entity})
    table = KnownPromptTable("planted", "abc", "float32", "city", tmp_path)
    assert ensure_known(target, CITY, prompts[:20], table, progress=False) == 20
    assert ensure_known(target, CITY, prompts, table, progress=False) == len(prompts) - 20
    rows = target.rows_seen
    again = KnownPromptTable("planted", "abc", "float32", "city", tmp_path)  # read back from disk
    assert ensure_known(target, CITY, prompts, again, progress=False) == 0 and target.rows_seen == rows
    assert again.known(prompts[0]) and not again.known(prompts[-1])
    for other in (("planted", "abd", "float32"), ("planted", "abc", "bfloat16"), ("other", "abc", "float32")):
        assert KnownPromptTable(*other, "city", tmp_path).path != table.path
        assert not KnownPromptTable(*other, "city", tmp_path).table


def test_a_damaged_or_foreign_table_is_a_clear_error(tmp_path):
    table = KnownPromptTable("planted", "abc", "float32", "city", tmp_path)
    table.path.parent.mkdir(parents=True, exist_ok=True)
    table.path.write_text('{"identity": {"target"')
    with pytest.raises(ValueError, match="is damaged.*delete it"):
        KnownPromptTable("planted", "abc", "float32", "city", tmp_path)
    table.path.write_text(json.dumps({"identity": {"target": "x"}, "known": {}}))
    with pytest.raises(ValueError, match="belongs to"):
        KnownPromptTable("planted", "abc", "float32", "city", tmp_path)


def test_an_interrupted_check_keeps_the_prompts_checked_so_far(smollm2, prompts, tmp_path, monkeypatch):
    monkeypatch.setattr(known_module, "SAVE_EVERY", 8)
    target = PlantedTarget(smollm2.tokenizer)
    real = known_module.check_prompts
    calls = []

    def crash_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(known_module, "check_prompts", crash_on_third_chunk)
    table = KnownPromptTable("planted", "abc", "float32", "city", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        ensure_known(target, CITY, prompts, table, progress=False)
    saved = KnownPromptTable("planted", "abc", "float32", "city", tmp_path)
    assert len(saved.table) == 16  # two chunks of 8 were saved before the interrupt
