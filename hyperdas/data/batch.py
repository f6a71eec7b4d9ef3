"""The collated batch one HyperDAS step reads: ``PairBatch``, B examples of (base, source, instruction).

Everything is left padded. The collator (``hyperdas.data.collate.Collator``) builds it from dataset rows; the
model, the literal oracle, the evaluation and the baselines read its fields by name, so a misspelt field is an
AttributeError at the line that misspells it rather than a KeyError somewhere downstream.

=============================  ==========  ===================================================================
field                          shape       meaning
=============================  ==========  ===================================================================
base_input_ids                 (B, Tb)     BOS? + prefix + suffix + label tokens (teacher forcing), long
base_attention_mask            (B, Tb)     1 on real tokens, long
base_intervention_mask         (B, Tb)     selectable base positions: the prefix tokens (and the suffix with
                                           ``include_base_suffix``); never BOS, padding or labels; bool
source_input_ids               (B, Ts)     BOS? + counterfactual prefix + counterfactual suffix, long
source_attention_mask          (B, Ts)     long
source_intervention_mask       (B, Ts)     selectable source positions: the counterfactual prefix; bool
instruction_input_ids          (B, Te)     BOS? + edit instruction (the editor reads its last token), long
instruction_attention_mask     (B, Te)     long
label_positions                (B, P)      index into Tb of the logits predicting each label token (its
                                           index - 1); padded entries repeat the last real one; long
label_ids                      (B, P)      label token ids, -100 on padding; P = longest label; long
base_entity_last               (B,)        index of the last base entity token (last prefix token), long
base_entity_first              (B,)        index of the first base entity token, long
source_entity_last             (B,)        index of the last source entity token, long
source_entity_first            (B,)        index of the first source entity token, long
is_causal                      (B,)        bool
attribute, domain,             lists       one string per example
attribute_type
=============================  ==========  ===================================================================

Labels, entity positions, ``is_causal`` and the string lists are optional (None): a batch built by hand for
inference needs only the six (B, T) tensors of base and source and the instruction's two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch


def entity_span_mask(first: torch.Tensor, last: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: True on each row's entity tokens, first[b]..last[b] inclusive (first, last: (B,))."""
    index = torch.arange(length, device=first.device)
    return (index >= first[:, None]) & (index <= last[:, None])


@dataclass
class PairBatch:
    """B collated (base, source, instruction) examples; the fields and their shapes are the module's table."""

    base_input_ids: torch.Tensor
    base_attention_mask: torch.Tensor
    base_intervention_mask: torch.Tensor
    source_input_ids: torch.Tensor
    source_attention_mask: torch.Tensor
    source_intervention_mask: torch.Tensor
    instruction_input_ids: torch.Tensor
    instruction_attention_mask: torch.Tensor
    label_positions: torch.Tensor | None = None
    label_ids: torch.Tensor | None = None
    base_entity_last: torch.Tensor | None = None
    base_entity_first: torch.Tensor | None = None
    source_entity_last: torch.Tensor | None = None
    source_entity_first: torch.Tensor | None = None
    is_causal: torch.Tensor | None = None
    attribute: list[str] | None = None
    domain: list[str] | None = None
    attribute_type: list[str] | None = None

    @classmethod
    def from_mapping(cls, fields: Mapping[str, object]) -> PairBatch:
        """A batch from a dict of its fields (the authors' code and hand-built batches); unknown keys are refused."""
        if isinstance(fields, cls):
            return fields
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise ValueError(f"unknown batch fields {unknown}; allowed: {allowed}")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in fields]
        if missing:
            raise ValueError(f"a batch needs the fields {missing}")
        return cls(**fields)

    def __len__(self) -> int:
        return self.base_input_ids.shape[0]

    @property
    def has_labels(self) -> bool:
        return self.label_ids is not None

    def entity_mask(self, run: str, last_only: bool = False) -> torch.Tensor:
        """(B, T) bool of ``run`` ("base" or "source"): True on each row's entity tokens, first..last (on the
        last one alone with ``last_only``)."""
        first, last = getattr(self, f"{run}_entity_first"), getattr(self, f"{run}_entity_last")
        if first is None or last is None:
            raise ValueError(
                f"this batch has no {run} entity positions ({run}_entity_first, {run}_entity_last), which a "
                "selection restricted to the entity needs: the collator sets them; a hand-built batch must too"
            )
        return entity_span_mask(last if last_only else first, last, getattr(self, f"{run}_input_ids").shape[1])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """The batch with every tensor on ``device`` (the string lists are shared)."""
        return dataclasses.replace(
            self,
            **{
                f.name: value.to(device, non_blocking=non_blocking)
                for f in dataclasses.fields(self)
                if isinstance(value := getattr(self, f.name), torch.Tensor)
            },
        )
