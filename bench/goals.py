"""The GPU run's goals (issue 12), read off its result files: each met, missed or not measured, with its figure.

    python bench/goals.py bench/results/nvidia-h200_<date>.json bench/results/nvidia-h200_<date>_step.json

| goal | measured as |
| --- | --- |
| interchange forward >= 80% of copy bandwidth | fused, HyperDAS case: achieved GB/s / copy GB/s of the same process |
| interchange forward+backward >= 3x eager | HyperDAS case: reference mean / fused mean |
| interchange forward+backward >= 5x pyvene | pyvene case: pyvene's LowRankRotatedSpaceIntervention mean / fused mean |
| selection head >= 10x lower peak memory | forward+backward: naive (pair tensor) peak / fused peak |
| selection head >= 3x faster than unfused | forward+backward: naive mean / fused mean |
| cross-attention at least as fast as SDPA flash | forward+backward, the slowest case: SDPA flash mean / Triton mean |
| two-pass step over the four-pass step | fused kernels: four-pass mean / two-pass mean (reported, no threshold) |
| batch ratio with checkpointing >= 4x | largest batch with editor + target checkpointing / largest plain batch |

A goal whose rows are absent (a CPU run, a skipped benchmark, a failed step) is "not measured", never met.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from make_tables import load_rows


@dataclass
class Goal:
    """One goal: what, the threshold (None: reported only), the measured figure (None: not measured)."""

    goal: str
    target: float | None
    figure: float | None = None
    detail: str = ""

    @property
    def status(self) -> str:
        if self.figure is None:
            return "not measured"
        if self.target is None:
            return "reported"
        return "met" if self.figure >= self.target else "MISSED"


def _find(rows: list[dict], **match) -> list[dict]:
    return [row for row in rows if all(row[key] == value for key, value in match.items())]


def _ratio(
    rows: list[dict],
    op: str,
    mode: str,
    slow: str,
    fast: str,
    case: str | None = None,
    value: Callable[[dict], float | None] = lambda row: row["mean"],
) -> tuple[float | None, str]:
    """value(slow path) / value(fast path) in the same file and case, the smallest over cases; and a detail."""
    ratios = []
    for fast_row in _find(rows, op=op, mode=mode, path=fast):
        if case is not None and fast_row["case"] != case:
            continue
        slow_rows = _find(rows, op=op, mode=mode, path=slow, case=fast_row["case"], file=fast_row["file"])
        if slow_rows and value(fast_row) and value(slow_rows[0]) is not None:
            ratios.append((value(slow_rows[0]) / value(fast_row), fast_row["case"]))
    if not ratios:
        return None, ""
    worst, worst_case = min(ratios)
    return worst, f"{len(ratios)} case(s); smallest at {worst_case}" if len(ratios) > 1 else worst_case


def evaluate(benchmark_rows: list[dict], step_results: list[dict]) -> list[Goal]:
    """Every goal, from make_tables.load_rows rows (kernels and step) and the step JSONs' largest_batch parts."""
    rows = benchmark_rows
    goals = []

    fractions = [
        row["info"].get("fraction_of_copy_bandwidth")
        for row in _find(rows, op="interchange", case="hyperdas", path="fused", mode="fwd")
    ]
    fraction = next((f for f in fractions if f is not None), None)
    goals.append(
        Goal(
            "interchange forward >= 80% of copy bandwidth",
            0.8,
            fraction,
            "fused, HyperDAS case" if fraction is not None else "",
        )
    )
    for target, slow, case in ((3.0, "reference", "hyperdas"), (5.0, "pyvene", "pyvene")):
        figure, detail = _ratio(rows, "interchange", "fwd_bwd", slow, "fused", case)
        name = "eager" if slow == "reference" else "pyvene"
        goals.append(Goal(f"interchange forward+backward >= {target:g}x {name}", target, figure, detail))

    figure, detail = _ratio(rows, "selection_head", "fwd_bwd", "naive", "fused", value=lambda row: row["peak"])
    goals.append(Goal("selection head >= 10x lower peak memory than unfused", 10.0, figure, detail))
    figure, detail = _ratio(rows, "selection_head", "fwd_bwd", "naive", "fused")
    goals.append(Goal("selection head >= 3x faster than unfused (fwd+bwd)", 3.0, figure, detail))

    figure, detail = _ratio(rows, "cross_attention", "fwd_bwd", "sdpa_flash", "triton")
    goals.append(Goal("cross-attention fwd+bwd at least as fast as SDPA flash", 1.0, figure, detail))

    fused_cases = sorted(
        {
            row["case"]
            for row in _find(rows, op="training_step")
            if "fused kernels" in row["case"] and "unfused" not in row["case"]
        }
    )
    figure, detail = _ratio(
        rows, "training_step", "fwd+bwd+adamw", "four_pass", "two_pass", fused_cases[0] if fused_cases else ""
    )
    goals.append(Goal("two-pass step speed-up over the four-pass step (fused)", None, figure, detail))

    ratio, detail = None, ""
    for result in step_results:
        batches = {entry["setting"]: entry for entry in result.get("largest_batch", [])}
        plain = batches.get("plain two-pass step", {}).get("largest_fit")
        checkpointed = batches.get("editor + target checkpointing", {}).get("largest_fit")
        if plain and checkpointed:
            ratio, detail = checkpointed / plain, f"{checkpointed} / {plain} pairs"
    goals.append(Goal("largest batch with checkpointing >= 4x the plain step's", 4.0, ratio, detail))
    return goals


def render(goals: list[Goal]) -> str:
    lines = ["| goal | figure | status | detail |", "| --- | ---: | --- | --- |"]
    for goal in goals:
        figure = "—" if goal.figure is None else f"{goal.figure:.3g}"
        lines.append(f"| {goal.goal} | {figure} | {goal.status} | {goal.detail} |")
    return "\n".join(lines)


def as_dicts(goals: list[Goal]) -> list[dict]:
    return [asdict(goal) | {"status": goal.status} for goal in goals]


def read(files: list[Path]) -> list[Goal]:
    """The goals from result files (pytest-benchmark JSON and training_step_at_scale.py JSON alike)."""
    step_results = []
    for file in files:
        data = json.loads(file.read_text())
        if isinstance(data, dict) and "largest_batch" in data:
            step_results.append(data)
    return evaluate(load_rows(files), step_results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="result JSON files of one run")
    args = parser.parse_args(argv)
    print(render(read(args.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
