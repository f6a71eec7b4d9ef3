"""Evaluation on held-out templates in every inference mode, beside the floor and the ceiling, and the results.

Per test batch the target and the editor run ONCE (``HyperDAS.evaluate_batch``); each mode then only selects,
patches and runs layers k..end. Beside the modes every report carries, on the same pairs:

- ``floor``: no intervention at all, what doing nothing scores (cause 0 / isolate 100 on known-prompt data);
- ``ceiling``: the whole vector of the last source entity token patched into the last base entity token, a
  ceiling on cause at this layer that ignores isolation.

Each mode's summary also says where its selection puts the mass it moves (``selection_stats``): the share
landing on base entity tokens, the share taken from source entity tokens, per position class, and the moved
mass itself. The subspace module's per-example vectors (ReflectSelect's reflection v) are saved for analysis
(subspace_analysis.safetensors, with a PCA plot by attribute), and how much the examples' subspaces share, per
pair of attributes (hyperdas.subspace_overlap; subspace_overlap.json and the report).

Each process evaluates a contiguous shard of the chosen test examples (padded to equal length, so every process
runs the same number of forwards, which a ZeRO-3-partitioned target needs); records are gathered by index.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hyperdas.config import EVAL_SPLITS
from hyperdas.data.batch import PairBatch
from hyperdas.metrics import label_exact_match, records_from_batch, summarize
from hyperdas.model import CEILING, FLOOR
from hyperdas.report import (
    render_report,
    save_curve_plot,
    save_pca_plot,
    save_position_plot,
    save_selection_heatmaps,
)
from hyperdas.selection_stats import selection_stats, summarize_selection
from hyperdas.subspace_overlap import SubspaceOverlap

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
HEATMAP_FILE = "selection_heatmap.png"
POSITIONS_FILE = "selection_positions.png"
ANALYSIS_FILE = "subspace_analysis.safetensors"
PCA_FILE = "subspace_pca.png"
OVERLAP_FILE = "subspace_overlap.json"
CURVE_PLOT = "learning_curve.png"
REFERENCES = (FLOOR, CEILING)


@dataclass
class Analysis:
    """The subspace module's per-example vectors over the test pairs evaluated (rank 0's shard), for analysis.

    Attributes:
        vectors: name -> (n, dim), e.g. ReflectSelect's "reflection" v (n, D), MaskSelect's "mask" (n, r).
        labels: per row: index (into the test split), attribute and attribute_type.
        overlap: {a: {b: mean cosine of two examples' patch operators}} by attribute (hyperdas.subspace_overlap),
            None for a module without per-example bases.
    """

    vectors: dict[str, torch.Tensor]
    labels: list[dict]
    overlap: dict[str, dict[str, float | None]] | None = None


@dataclass
class Evaluation:
    """metrics: {floor, ceiling, mode...: summarize(...)}; heatmaps: soft selections of a few evaluated pairs;
    analysis: the subspace vectors (None for a module without per-example vectors); split: the rows evaluated."""

    metrics: dict
    heatmaps: list[dict] = field(default_factory=list)
    analysis: Analysis | None = None
    split: str = "test"


def spread_indices(rows, limit: int | None, seed: int = 0) -> list[int]:
    """Up to ``limit`` row indices spread evenly over (attribute, attribute type) groups, in a seeded order.

    The groups take turns, each in its own shuffled order, so any prefix of the result covers every group as
    evenly as it can (the first N test rows are all of one kind: the builder writes them kind by kind).
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (attribute, kind) in enumerate(zip(rows["attribute"], rows["attribute_type"], strict=True)):
        groups.setdefault((attribute, kind), []).append(i)
    rng = random.Random(seed)
    queues = [rng.sample(members, len(members)) for _, members in sorted(groups.items())]
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop())
    return order if limit is None else order[:limit]


def _shard(indices: list[int], rank: int, world: int) -> list[int]:
    per = -(-len(indices) // world)
    mine = indices[rank * per : (rank + 1) * per]
    return mine + [indices[-1]] * (per - len(mine))  # pad so every process runs the same forwards


def _gather(records: list[dict]) -> list[dict]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    everyone: list[list[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    unique = {r["index"]: r for part in everyone for r in part}
    return [unique[i] for i in sorted(unique)]


@torch.no_grad()
def evaluate(
    engine,
    data,
    modes: list[str],
    batch_size: int,
    max_examples: int | None = None,
    heatmap_examples: int = 4,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    split: str = "test",
    ceiling: bool = True,
    analysis: bool = True,
) -> Evaluation:
    """Exact match of the first 3 label tokens (teacher-forced) on one split, per mode and reference.

    Args:
        engine: anything with ``evaluate_batch(batch, modes)`` (a training engine).
        data: ``RunData`` (test split and collator).
        modes: selection modes to evaluate.
        batch_size: examples per forward.
        max_examples: evaluate this many test examples, spread over attributes and kinds (None: all).
        heatmap_examples: how many test pairs' soft selections to picture: both kinds, half the pairs whose moved
            mass lands most on the base entity and half whose lands least (``pick_heatmap_pairs``).
        rank, world_size: this process's place; each evaluates its shard.
        seed: seeds which examples a ``max_examples`` subset and the heatmap take.
        split: "test" (held-out templates: the result) or "train" (the pairs trained on: beside the test
            split's score it measures how much of the fit generalises).
        ceiling: also score ``CEILING`` (False: only the floor beside the modes, one patched pass fewer).
        analysis: also collect the subspace vectors and their overlap (False: ``Evaluation.analysis`` is None,
            and no (D, D) overlap sums are formed; a learning curve never reads them).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if split not in EVAL_SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(EVAL_SPLITS)}")
    split_rows = getattr(data, split)
    chosen = spread_indices(split_rows, max_examples, seed)
    if not chosen:
        raise ValueError(f"the {split} split is empty: nothing to evaluate")
    mine = _shard(chosen, rank, world_size)
    model = engine.model
    was_training = model.training
    model.eval()
    names = [*(r for r in REFERENCES if ceiling or r != CEILING), *modes]
    records: dict[str, list[dict]] = {name: [] for name in names}
    stats: dict[str, list[dict]] = {mode: [] for mode in modes}
    heatmaps: dict[int, dict] = {}
    vectors: dict[str, list[torch.Tensor]] = {}
    labels: list[dict] = []
    described: set[int] = set()
    overlap = SubspaceOverlap()
    try:
        for start in tqdm(range(0, len(mine), batch_size), desc="eval", disable=rank != 0, leave=False):
            indices = mine[start : start + batch_size]
            batch = data.collate(split_rows, indices)
            out = engine.evaluate_batch(batch, modes, ceiling=ceiling)
            for name in names:
                logits, selection = out.logits[name], out.selections[name]
                correct = label_exact_match(logits.float(), batch.label_ids.to(logits.device)).cpu()
                for index, record in zip(indices, records_from_batch(batch, correct), strict=True):
                    records[name].append(record | {"index": index})
                if name in stats:
                    rows = selection_stats(selection.float().cpu(), batch)
                    stats[name].extend(r | {"index": i} for i, r in zip(indices, rows, strict=True))
            if rank == 0:
                soft = out.selections.get("soft")
                for b, index in enumerate(indices):
                    if soft is not None and heatmap_examples > 0 and index not in heatmaps:
                        heatmaps[index] = _heatmap_entry(batch, soft, b)
            if rank == 0 and analysis:
                fresh = [b for b, index in enumerate(indices) if index not in described]
                described.update(indices)
                for key, value in out.analysis.items():
                    vectors.setdefault(key, []).append(value.float().cpu()[fresh])
                if out.basis is not None and out.basis.dim() == 3 and fresh:
                    overlap.add(out.basis[fresh], [batch.attribute[b] for b in fresh])
                labels += [
                    {
                        "index": indices[b],
                        "attribute": batch.attribute[b],
                        "attribute_type": batch.attribute_type[b],
                    }
                    for b in fresh
                ]
    finally:
        model.train(was_training)
    metrics = {}
    for name in names:
        metrics[name] = summarize(_gather(records[name]))
        if name in stats:
            metrics[name]["selection"] = summarize_selection(_gather(stats[name]))
    table = overlap.table() or None
    collected = Analysis({k: torch.cat(v) for k, v in vectors.items()}, labels, table) if vectors else None
    pictured = []
    if heatmaps and "soft" in stats:
        shown = [r for r in stats["soft"] if r["index"] in heatmaps]
        for row in pick_heatmap_pairs(shown, heatmap_examples):
            entry = _decoded(heatmaps[row["index"]], data.collator.tokenizer)
            share = row["base_entity_share"]
            on_entity = "nothing moved" if share is None else f"{100 * share:.0f}% of moved mass on the base entity"
            pictured.append(entry | {"title": f"{entry['title']}: {on_entity}"})
    return Evaluation(metrics, pictured, collected, split)


def pick_heatmap_pairs(rows: list[dict], count: int) -> list[dict]:
    """Both kinds of pair in one picture: of the rows that move anything, the ceil(count/2) whose moved mass
    lands most on the base entity (``base_entity_share``), then the rest with the least, least first; rows that
    move nothing fill up only when too few move. Each half takes, within its own half of the moving rows, a new
    (attribute, attribute type) while one is left, so the picture spreads over attributes and kinds. Ties keep
    the rows' order."""
    moving = sorted((r for r in rows if r["base_entity_share"] is not None), key=lambda r: -r["base_entity_share"])
    picked: list[dict] = []

    def take(candidates: list[dict], wanted: int) -> None:
        seen: set[tuple] = set()
        for spread in (True, False):
            for row in candidates:
                kind = (row.get("attribute"), row.get("attribute_type"))
                if wanted and row not in picked and not (spread and kind in seen):
                    picked.append(row)
                    seen.add(kind)
                    wanted -= 1

    upper = (len(moving) + 1) // 2
    take(moving[:upper], (count + 1) // 2)
    take(moving, (count + 1) // 2 - len(picked))
    take(moving[upper:][::-1], count - len(picked))
    take(moving[::-1], count - len(picked))
    take([r for r in rows if r["base_entity_share"] is None], count - len(picked))
    return picked


def _heatmap_entry(batch: PairBatch, selection: torch.Tensor, b: int) -> dict:
    """Pair ``b``'s soft selection over its real tokens (labels left out) and its token ids, undecoded: every
    pair is kept until the pictured ones are picked, and only those are decoded (``_decoded``)."""
    base_real = batch.base_attention_mask[b].bool().cpu()
    source_real = batch.source_attention_mask[b].bool().cpu()
    label_count = int((batch.label_ids[b] != -100).sum())
    a = selection[b].float().cpu()[:, base_real]  # (Ts+1, Tb real)
    a = a[torch.cat([source_real, torch.tensor([True])])]
    base_ids = batch.base_input_ids[b][base_real].tolist()
    keep = len(base_ids) - label_count  # drop the teacher-forced label tokens from the picture
    return {
        "selection": a[:, :keep].numpy(),
        "base_ids": base_ids[:keep],
        "source_ids": batch.source_input_ids[b][source_real].tolist(),
        "title": f"{batch.attribute[b]} ({batch.attribute_type[b]})",
    }


def _decoded(entry: dict, tokenizer) -> dict:
    """A ``_heatmap_entry`` as ``save_selection_heatmaps`` takes it: token strings, SELF after the source's."""
    return {
        "selection": entry["selection"],
        "base_tokens": [tokenizer.decode([t]) for t in entry["base_ids"]],
        "source_tokens": [tokenizer.decode([t]) for t in entry["source_ids"]] + ["SELF"],
        "title": entry["title"],
    }


def write_evaluation(
    result: Evaluation, out_dir: Path, history: list[dict], run_config, curve: list[dict] | None = None
) -> None:
    """metrics.json, report.md, the selection heatmap and position plots, the subspace analysis (saved before
    anything is printed), and the learning curve's plot when ``curve`` holds points (train/learning_curve.py)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2) + "\n")
    figures = {}
    if result.heatmaps:
        save_selection_heatmaps(result.heatmaps, out_dir / HEATMAP_FILE)
        figures["heatmap"] = HEATMAP_FILE
    if any("selection" in summary for summary in result.metrics.values()):
        save_position_plot(result.metrics, out_dir / POSITIONS_FILE)
        figures["positions"] = POSITIONS_FILE
    if result.analysis is not None:
        tensors = {k: v.contiguous() for k, v in result.analysis.vectors.items()}
        tensors["index"] = torch.tensor([r["index"] for r in result.analysis.labels])
        save_file(tensors, str(out_dir / ANALYSIS_FILE), metadata={"labels": json.dumps(result.analysis.labels)})
        name, vectors = next(iter(result.analysis.vectors.items()))
        save_pca_plot(vectors, result.analysis.labels, name, out_dir / PCA_FILE)
        figures["pca"] = PCA_FILE
        if result.analysis.overlap is not None:
            (out_dir / OVERLAP_FILE).write_text(json.dumps(result.analysis.overlap, indent=2) + "\n")
    if curve:
        save_curve_plot(curve, out_dir / CURVE_PLOT)
        figures["curve"] = CURVE_PLOT
    overlap = result.analysis.overlap if result.analysis is not None else None
    report = render_report(
        result.metrics, history, run_config, figures, split=result.split, curve=curve, overlap=overlap
    )
    (out_dir / REPORT_FILE).write_text(report)
