"""Tokenisation and collation of RAVEL examples into the tensors one HyperDAS step reads.

Every prompt is tokenised in parts without special tokens, and the tokenizer's own leading special tokens
(BOS) are put in front exactly as the tokenizer would for a whole prompt: once for Llama-3
(``<|begin_of_text|>``), never for SmolLM2 (its tokenizer adds none). Tokenising the prefix on its own makes
its last token the last entity token, so that token is always selectable. (The reference added BOS a second
time, its suffix lengths were off by one and the last entity token could never be selected.)

The batch (``Collator.__call__``) is a ``hyperdas.data.batch.PairBatch``; its fields and shapes are listed there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from hyperdas.data.batch import PairBatch
from hyperdas.data.examples import label_text, label_value
from hyperdas.metrics import IGNORE_INDEX


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a whole prompt: [BOS] for Llama-3, [] for SmolLM2.

    Found by comparing ``tokenizer("x")`` with ``tokenizer("x", add_special_tokens=False)``; trailing special
    tokens (an EOS some tokenizers append) are not part of a prompt and are ignored.
    """
    whole = tokenizer("x").input_ids
    bare = tokenizer("x", add_special_tokens=False).input_ids
    for start in range(len(whole) - len(bare) + 1):
        if whole[start : start + len(bare)] == bare:
            return list(whole[:start])
    raise ValueError(f"cannot find where the tokenizer's special tokens end: {whole} vs {bare}")


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batched tokenizer call)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]


def label_token_ids(tokenizer, prompts: Sequence[str], values: Sequence[str]) -> list[list[int]]:
    """The label tokens of ``value`` after ``prompt``: tokenise them together, take the tokens after the prompt.

    Where the tokenizer merges the prompt's last characters with the label's first ones (SmolLM2 makes one
    token of ``"-`` in ``"lat": "-26``), the prompt's tokens are not a prefix of the whole's; the label is then
    ``label_text`` tokenised alone, a valid tokenisation of the same text, appended to the prompt's tokens.
    """
    texts = [label_text(p, v) for p, v in zip(prompts, values, strict=True)]
    whole = encode_texts(tokenizer, [p + t for p, t in zip(prompts, texts, strict=True)])
    heads = encode_texts(tokenizer, prompts)
    labels = []
    for ids, head, text in zip(whole, heads, texts, strict=True):
        if ids[: len(head)] == head and len(ids) > len(head):
            labels.append(ids[len(head) :])
        else:
            labels.append(encode_texts(tokenizer, [text])[0])
    return labels


def encode_with_label(
    tokenizer, prefixes: Sequence[str], suffixes: Sequence[str], values: Sequence[str]
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Token ids of each prompt's prefix, its suffix, and the label ``value`` that continues prefix + suffix.

    The one tokenisation of a teacher-forced prompt: the collator's base rows and the filter's verify rows
    both come from here, so an example is filtered on the very tokens it is trained on.
    """
    prompts = [p + s for p, s in zip(prefixes, suffixes, strict=True)]
    return (
        encode_texts(tokenizer, prefixes),
        encode_texts(tokenizer, suffixes),
        label_token_ids(tokenizer, prompts, values),
    )


def entity_token_counts(
    tokenizer, prefixes: Sequence[str], entities: Sequence[str], prefix_ids: Sequence[Sequence[int]]
) -> list[int]:
    """How many of each prefix's last tokens spell its entity (the prefix ends with the entity).

    The tokens of the prefix without its entity are usually a prefix of the whole prefix's tokens; where the
    tokenizer merged across the boundary, the entity starts at the token that covers its first character.
    """
    heads = encode_texts(tokenizer, [p[: len(p) - len(e)] for p, e in zip(prefixes, entities, strict=True)])
    counts = []
    for ids, head, entity in zip(prefix_ids, heads, entities, strict=True):
        if list(ids[: len(head)]) == head and len(ids) > len(head):
            counts.append(len(ids) - len(head))
            continue
        n = 1
        while n < len(ids) and entity.strip() not in tokenizer.decode(list(ids[-n:])):
            n += 1
        counts.append(n)
    return counts


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Left-pad token rows: (ids (B, T) long, attention mask (B, T) long, per-row offsets T - len(row))."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for b, row in enumerate(rows):
        offset = width - len(row)
        ids[b, offset:] = torch.tensor(row, dtype=torch.long)
        mask[b, offset:] = 1
        offsets.append(offset)
    return ids, mask, offsets


def label_tensors(
    labels: Sequence[Sequence[int]], first_label_index: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label_positions (B, P), label_ids (B, P)) from each row's label tokens and padded index of the first.

    The logits at index i predict token i + 1, so label token j of a row is predicted at first + j - 1.
    Padded entries repeat the row's last real position (a valid index) and carry ``IGNORE_INDEX``.
    """
    width = max(len(row) for row in labels)
    positions = torch.zeros((len(labels), width), dtype=torch.long)
    ids = torch.full((len(labels), width), IGNORE_INDEX, dtype=torch.long)
    for b, (row, first) in enumerate(zip(labels, first_label_index, strict=True)):
        n = len(row)
        positions[b, :n] = torch.arange(first - 1, first - 1 + n)
        positions[b, n:] = first - 2 + n
        ids[b, :n] = torch.tensor(row, dtype=torch.long)
    return positions, ids


class Collator:
    """Turns a list of dataset rows into a ``PairBatch``.

    Args:
        tokenizer: the target's tokenizer (the editor shares it).
        include_base_suffix: let the base suffix tokens be selected too (default: the prefix only).
    """

    def __init__(self, tokenizer, include_base_suffix: bool = False):
        self.tokenizer = tokenizer
        self.include_base_suffix = include_base_suffix
        self.lead = leading_special_ids(tokenizer)
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, rows: Sequence[Mapping[str, str]]) -> PairBatch:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        tok, lead = self.tokenizer, self.lead
        column = {key: [row[key] for row in rows] for key in rows[0]}
        prefixes, suffixes, labels = encode_with_label(
            tok, column["input_prefix"], column["input_suffix"], [label_value(row) for row in rows]
        )
        source_prefixes = encode_texts(tok, column["counterfactual_input_prefix"])
        source_suffixes = encode_texts(tok, column["counterfactual_input_suffix"])

        base_ids, base_mask, base_off = left_pad(
            [lead + p + s + lab for p, s, lab in zip(prefixes, suffixes, labels, strict=True)], self.pad_id
        )
        source_ids, source_mask, source_off = left_pad(
            [lead + p + s for p, s in zip(source_prefixes, source_suffixes, strict=True)], self.pad_id
        )
        instruction_ids, instruction_mask, _ = left_pad(
            [lead + ids for ids in encode_texts(tok, column["edit_instruction"])], self.pad_id
        )

        base_select = torch.zeros_like(base_mask, dtype=torch.bool)
        source_select = torch.zeros_like(source_mask, dtype=torch.bool)
        base_span = entity_token_counts(tok, column["input_prefix"], column["entity"], prefixes)
        source_span = entity_token_counts(
            tok, column["counterfactual_input_prefix"], column["counterfactual_entity"], source_prefixes
        )
        base_last, source_last, first_label = [], [], []
        for b in range(len(rows)):
            start = base_off[b] + len(lead)
            stop = start + len(prefixes[b])
            base_select[b, start : stop + (len(suffixes[b]) if self.include_base_suffix else 0)] = True
            base_last.append(stop - 1)
            first_label.append(stop + len(suffixes[b]))
            start = source_off[b] + len(lead)
            source_select[b, start : start + len(source_prefixes[b])] = True
            source_last.append(start + len(source_prefixes[b]) - 1)
        label_positions, label_ids = label_tensors(labels, first_label)

        return PairBatch(
            base_input_ids=base_ids,
            base_attention_mask=base_mask,
            base_intervention_mask=base_select,
            source_input_ids=source_ids,
            source_attention_mask=source_mask,
            source_intervention_mask=source_select,
            instruction_input_ids=instruction_ids,
            instruction_attention_mask=instruction_mask,
            label_positions=label_positions,
            label_ids=label_ids,
            base_entity_last=torch.tensor(base_last, dtype=torch.long),
            base_entity_first=torch.tensor(base_last, dtype=torch.long) - torch.tensor(base_span) + 1,
            source_entity_last=torch.tensor(source_last, dtype=torch.long),
            source_entity_first=torch.tensor(source_last, dtype=torch.long) - torch.tensor(source_span) + 1,
            is_causal=torch.tensor([t == "causal" for t in column["attribute_type"]], dtype=torch.bool),
            attribute=column["attribute"],
            domain=column["domain"],
            attribute_type=column["attribute_type"],
        )


def dataloader(dataset, collator: Collator, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over a dataset split (a ``datasets.Dataset`` or a list of rows) that yields batch dicts.

    Shuffling is seeded, so the same seed gives the same batches.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collator)
