"""RAVEL metrics: teacher-forced exact match, and cause / isolate / disentangle per attribute.

An example is correct when the teacher-forced argmax equals its first min(3, length) label tokens (METHOD.md,
"Metrics"). For an attribute A:

- cause(A) = accuracy on A's causal examples (the source's value of A must come out);
- isolate(A) = accuracy on A's isolate examples (the base's value of another attribute must stay);
- disentangle(A) = (cause(A) + isolate(A)) / 2.

Overall (and per domain) values are macro averages: the mean over attributes of their per-attribute
cause and isolate, each attribute weighing the same however many examples it has; overall disentangle is
(overall cause + overall isolate) / 2, which equals the mean of the per-attribute disentangle values when
every attribute has both kinds of examples. An attribute without examples of one kind reports that metric
and its disentangle as None (null in JSON), and is left out of the averages of that metric; a metric no
attribute has is None overall too. Counts of examples are reported beside every value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean

import torch

from hyperdas.data.batch import PairBatch

IGNORE_INDEX = -100
#: an example is correct when the teacher-forced argmax equals this many first label tokens (fewer if shorter).
FIRST_LABEL_TOKENS = 3


def label_exact_match(
    logits: torch.Tensor, label_ids: torch.Tensor, first_n: int | None = FIRST_LABEL_TOKENS
) -> torch.Tensor:
    """Whether the teacher-forced argmax matches each example's first label tokens exactly.

    Args:
        logits: (B, P, V), the logits at the positions that predict each label token.
        label_ids: (B, P) long, the label tokens; ``IGNORE_INDEX`` (-100) marks padding.
        first_n: compare the first min(first_n, length) real label tokens; None compares all of them.

    Returns:
        (B,) bool. An example without any real label token is counted wrong.
    """
    real = label_ids != IGNORE_INDEX
    if first_n is not None:
        real &= real.long().cumsum(-1) <= first_n
    hit = (logits.argmax(-1) == label_ids) | ~real
    return hit.all(-1) & real.any(-1)


def records_from_batch(batch: PairBatch, correct: torch.Tensor) -> list[dict[str, object]]:
    """Per-example records (attribute, attribute_type, domain, correct) from a collated batch and its (B,) result."""
    columns = (batch.attribute, batch.attribute_type, batch.domain, correct.tolist())
    return [
        {"attribute": a, "attribute_type": t, "domain": d, "correct": bool(c)}
        for a, t, d, c in zip(*columns, strict=True)
    ]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def _disentangle(cause: float | None, isolate: float | None) -> float | None:
    return None if cause is None or isolate is None else (cause + isolate) / 2


def _macro(per_attribute: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    cause = _mean([m["cause"] for m in per_attribute.values()])
    isolate = _mean([m["isolate"] for m in per_attribute.values()])
    return {
        "cause": cause,
        "isolate": isolate,
        "disentangle": _disentangle(cause, isolate),
        "n_causal": sum(m["n_causal"] for m in per_attribute.values()),
        "n_isolate": sum(m["n_isolate"] for m in per_attribute.values()),
        "n_attributes": len(per_attribute),
    }


def summarize(records: Iterable[Mapping[str, object]]) -> dict[str, object]:
    """Cause, isolate and disentangle per attribute, per domain (where records name one) and overall.

    Args:
        records: one mapping per example with ``attribute``, ``attribute_type`` ("causal" or "isolate") and
            ``correct`` (bool); an optional ``domain`` adds per-domain averages.

    Returns:
        {"per_attribute": {attribute: metrics}, "per_domain": {domain: metrics}, "overall": metrics}, where
        per-attribute metrics are {cause, isolate, disentangle, n_causal, n_isolate} and the averaged ones add
        n_attributes; see the module docstring for how averages and missing kinds are reported.
    """
    hits: dict[str, dict[str, list[bool]]] = {}
    domains: dict[str, set[str]] = {}
    for record in records:
        kind = record["attribute_type"]
        if kind not in ("causal", "isolate"):
            raise ValueError(f"unknown attribute_type {kind!r}; allowed: causal, isolate")
        attribute = str(record["attribute"])
        hits.setdefault(attribute, {"causal": [], "isolate": []})[kind].append(bool(record["correct"]))
        if record.get("domain") is not None:
            domains.setdefault(str(record["domain"]), set()).add(attribute)

    per_attribute = {}
    for attribute, by_kind in sorted(hits.items()):
        cause = fmean(by_kind["causal"]) if by_kind["causal"] else None
        isolate = fmean(by_kind["isolate"]) if by_kind["isolate"] else None
        per_attribute[attribute] = {
            "cause": cause,
            "isolate": isolate,
            "disentangle": _disentangle(cause, isolate),
            "n_causal": len(by_kind["causal"]),
            "n_isolate": len(by_kind["isolate"]),
        }
    return {
        "per_attribute": per_attribute,
        "per_domain": {d: _macro({a: per_attribute[a] for a in sorted(names)}) for d, names in sorted(domains.items())},
        "overall": _macro(per_attribute),
    }
