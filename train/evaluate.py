"""Evaluation on held-out templates in every inference mode, and the run folder's results.

Each process evaluates a contiguous shard of the test split (padded to equal length, so every process runs
the same number of forwards, which a ZeRO-3-partitioned target needs); records are gathered by example index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hyperdas.metrics import label_exact_match, records_from_batch, summarize
from hyperdas.report import render_report, save_selection_heatmaps

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
HEATMAP_FILE = "selection_heatmap.png"


@dataclass
class Evaluation:
    """metrics: {mode: summarize(...)}; heatmaps: soft selections of the first test pairs, with their tokens."""

    metrics: dict
    heatmaps: list[dict] = field(default_factory=list)


def _shard(n: int, rank: int, world: int) -> list[int]:
    per = -(-n // world)
    mine = list(range(rank * per, min((rank + 1) * per, n)))
    return mine + [n - 1] * (per - len(mine))  # pad so every process runs the same forwards


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
) -> Evaluation:
    """Exact match of the first 3 label tokens (teacher-forced) on the test split, per selection mode.

    Args:
        engine: anything with ``forward(batch, mode=...)`` returning logits and selection (a training engine).
        data: ``RunData`` (test split and collator).
        modes: selection modes to evaluate.
        batch_size: examples per forward.
        max_examples: evaluate the first N test examples only.
        heatmap_examples: how many test pairs' soft selections to keep for the heatmap.
        rank, world_size: this process's place; each evaluates its shard.
    """
    n = len(data.test) if max_examples is None else min(max_examples, len(data.test))
    if n == 0:
        raise ValueError("the test split is empty: nothing to evaluate")
    mine = _shard(n, rank, world_size)
    model = engine.model
    was_training = model.training
    model.eval()
    metrics: dict = {}
    heatmaps: list[dict] = []
    try:
        for mode in modes:
            records = []
            chunks = range(0, len(mine), batch_size)
            for start in tqdm(chunks, desc=f"eval {mode}", disable=rank != 0, leave=False):
                indices = mine[start : start + batch_size]
                batch = data.collate(data.test, indices)
                out = engine.forward(batch, mode=mode)
                correct = label_exact_match(out.logits.float(), batch["label_ids"].to(out.logits.device)).cpu()
                for index, record in zip(indices, records_from_batch(batch, correct), strict=True):
                    records.append(record | {"index": index})
                if mode == "soft" and len(heatmaps) < heatmap_examples and rank == 0:
                    heatmaps.extend(_heatmap_entries(batch, out.selection, data.collator.tokenizer, heatmap_examples))
            metrics[mode] = summarize(_gather(records))
    finally:
        model.train(was_training)
    return Evaluation(metrics, heatmaps[:heatmap_examples])


def _heatmap_entries(batch: dict, selection: torch.Tensor, tokenizer, limit: int) -> list[dict]:
    entries = []
    for b in range(min(limit, selection.shape[0])):
        base_real = batch["base_attention_mask"][b].bool()
        source_real = batch["source_attention_mask"][b].bool()
        label_count = int((batch["label_ids"][b] != -100).sum())
        a = selection[b].float().cpu()[:, base_real.cpu()]  # (Ts+1, Tb real)
        rows = torch.cat([source_real.cpu(), torch.tensor([True])])
        a = a[rows]
        base_ids = batch["base_input_ids"][b][base_real].tolist()
        keep = len(base_ids) - label_count  # drop the teacher-forced label tokens from the picture
        entries.append(
            {
                "selection": a[:, :keep].numpy(),
                "base_tokens": [tokenizer.decode([t]) for t in base_ids[:keep]],
                "source_tokens": [tokenizer.decode([t]) for t in batch["source_input_ids"][b][source_real].tolist()]
                + ["SELF"],
                "title": f"{batch['attribute'][b]} ({batch['attribute_type'][b]})",
            }
        )
    return entries


def write_evaluation(result: Evaluation, out_dir: Path, history: list[dict], run_config) -> None:
    """metrics.json, report.md and the selection heatmap PNG (saved before anything is printed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2) + "\n")
    if result.heatmaps:
        save_selection_heatmaps(result.heatmaps, out_dir / HEATMAP_FILE)
    (out_dir / REPORT_FILE).write_text(
        render_report(result.metrics, history, run_config, HEATMAP_FILE if result.heatmaps else None)
    )
