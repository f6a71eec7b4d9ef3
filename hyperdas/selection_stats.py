"""Where a selection moves information: how much of it lands on the entity tokens of base and source.

For one example with selection A (Ts+1, Tb) (row Ts is SELF), base entity tokens E_b and source entity
tokens E_s (their first..last token indices from the collator):

- moved = Σ_{i<Ts} Σ_j A_ij, the number of base positions' worth of information taken from the source;
- base_entity_share = Σ_{j∈E_b} Σ_{i<Ts} A_ij / moved, the share landing on the base entity's tokens;
- last_entity_share = Σ_{i<Ts} A_{i, last(E_b)} / moved, the share landing on the last base entity token;
- source_entity_share = Σ_{i∈E_s} Σ_j A_ij / moved, the share taken from the source entity's tokens;
- entity_to_entity_share = Σ_{i∈E_s} Σ_{j∈E_b} A_ij / moved.

A localising selection puts these shares near 1; a selection that injects the answer through other tokens (the
word "continent", an in-context example's value) puts them low while the task metric can still look good.

Per position class the same moved mass is split by where it lands (base) and where it comes from (source):
``before`` the entity (the template's head, an in-context example), the ``entity`` tokens before its last,
the ``last`` entity token, and ``after`` it (the suffix, where selectable).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from statistics import fmean

import torch

from hyperdas.data.batch import entity_span_mask

SHARES = ("base_entity_share", "last_entity_share", "source_entity_share", "entity_to_entity_share")
POSITION_CLASSES = ("before", "entity", "last", "after")


def _classes(length: int, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, length) class index of every position: 0 before the entity, 1 entity, 2 its last token, 3 after."""
    pos = torch.arange(length)[None]
    return torch.where(
        pos < first[:, None], 0, torch.where(pos < last[:, None], 1, torch.where(pos == last[:, None], 2, 3))
    )


def selection_stats(selection: torch.Tensor, batch: Mapping[str, object]) -> list[dict[str, object]]:
    """Per-example statistics of a selection (B, Ts+1, Tb) against the batch's entity spans (see module doc)."""
    ts, tb = selection.shape[1] - 1, selection.shape[2]
    taken = selection[:, :ts].double()  # (B, Ts, Tb)
    base_first, base_last = batch.base_entity_first.cpu(), batch.base_entity_last.cpu()
    source_first, source_last = batch.source_entity_first.cpu(), batch.source_entity_last.cpu()
    in_base = entity_span_mask(base_first, base_last, tb)  # (B, Tb)
    in_source = entity_span_mask(source_first, source_last, ts)  # (B, Ts)
    moved = taken.sum(dim=(1, 2))
    into_base = (taken * in_base[:, None, :]).sum(dim=(1, 2))
    into_last = taken[torch.arange(len(base_last)), :, base_last].sum(dim=1)
    from_source = (taken * in_source[:, :, None]).sum(dim=(1, 2))
    entity_pairs = (taken * in_source[:, :, None] * in_base[:, None, :]).sum(dim=(1, 2))
    into = taken.sum(dim=1)  # (B, Tb): mass landing on each base position
    out_of = taken.sum(dim=2)  # (B, Ts): mass taken from each source position
    base_class = _classes(tb, base_first, base_last)
    source_class = _classes(ts, source_first, source_last)
    rows = []
    for b in range(selection.shape[0]):
        m = float(moved[b])
        shares = (into_base[b], into_last[b], from_source[b], entity_pairs[b])
        row = {name: (float(v) / m if m > 1e-9 else None) for name, v in zip(SHARES, shares, strict=True)}
        row |= {"moved": m, "attribute": batch.attribute[b], "attribute_type": batch.attribute_type[b]}
        for side, mass, cls in (("base", into[b], base_class[b]), ("source", out_of[b], source_class[b])):
            for c, name in enumerate(POSITION_CLASSES):
                row[f"{side}_{name}"] = float(mass[cls == c].sum()) / m if m > 1e-9 else None
        rows.append(row)
    return rows


def _means(rows: list[Mapping[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {"moved": fmean(float(r["moved"]) for r in rows) if rows else None, "n": len(rows)}
    positional = [f"{side}_{c}" for side in ("base", "source") for c in POSITION_CLASSES]
    for name in (*SHARES, *positional):
        present = [float(r[name]) for r in rows if r[name] is not None]
        out[name] = fmean(present) if present else None
    return out


def summarize_selection(rows: Iterable[Mapping[str, object]]) -> dict[str, object]:
    """Means of ``selection_stats`` rows: overall and per (attribute, attribute type) as "attribute/kind"."""
    rows = list(rows)
    groups: dict[str, list[Mapping[str, object]]] = {}
    for row in rows:
        groups.setdefault(f"{row['attribute']}/{row['attribute_type']}", []).append(row)
    return {"overall": _means(rows), "per_group": {k: _means(v) for k, v in sorted(groups.items())}}
