"""The learning curve: soft-mode scores on fixed subsets of BOTH splits, taken every N steps during training.

One point is {"step", "seconds", "train": {...}, "test": {...}}, each split holding the overall cause / isolate /
disentangle of the floor (no intervention) and of the soft selection on the same ``curve_examples`` pairs
(``spread_indices`` with the run's seed: the same pairs at every point, and the test ones the first of the
final evaluation's order), and the number of pairs. Beside each other the two splits say
when the editor stops learning what carries over to held-out templates and starts memorising its training
pairs, which a score at the end alone cannot.

A point changes nothing about training: it runs under no_grad in eval mode (restored after) and inside a
forked RNG state, so the run's weights and log are bitwise those of the same run without a curve (tested).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from hyperdas.train.evaluate import evaluate

CURVE_FILE = "learning_curve.jsonl"
#: the splits of every point, in the order they are scored.
CURVE_SPLITS = ("train", "test")
#: what each split of a point holds: the reference and the mode, each {cause, isolate, disentangle}.
CURVE_ENTRIES = ("floor", "soft")


def curve_point(engine, data, step: int, examples: int, batch_size: int, rank: int, world_size: int, seed: int) -> dict:
    """Score the model as it is now on ``examples`` pairs of each split (soft mode and the floor).

    Args:
        engine: the training engine (``evaluate_batch`` and ``model``).
        data: ``RunData`` with both splits.
        step: the optimizer steps taken so far (recorded, not used).
        examples: pairs per split, spread over attributes and kinds; the same pairs at every step.
        batch_size, rank, world_size, seed: as ``evaluate`` takes them (every process must call this).

    Returns:
        {"step", "seconds" (spent on this point), "train": {entry: overall metrics, "pairs": n}, "test": {...}}.
    """
    started = time.perf_counter()
    point: dict = {"step": step}
    devices = [engine.device] if torch.device(engine.device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for split in CURVE_SPLITS:
            result = evaluate(
                engine,
                data,
                modes=["soft"],
                batch_size=batch_size,
                max_examples=examples,
                heatmap_examples=0,
                rank=rank,
                world_size=world_size,
                seed=seed,
                split=split,
                ceiling=False,
                analysis=False,
            )
            point[split] = {
                name: {key: result.metrics[name]["overall"][key] for key in ("cause", "isolate", "disentangle")}
                for name in CURVE_ENTRIES
            }
            point[split]["pairs"] = min(examples, len(getattr(data, split)))
    point["seconds"] = round(time.perf_counter() - started, 2)
    return point


def read_curve(out_dir: Path) -> list[dict]:
    """The points a run folder holds ([] when it has no curve)."""
    path = Path(out_dir) / CURVE_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
