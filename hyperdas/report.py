"""Human-readable results: the cause / isolate / disentangle table and the selection heatmap."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def metrics_table(metrics: dict) -> str:
    """Markdown: one row per (mode, attribute) and an overall row per mode; values in percent."""
    lines = [
        "| mode | attribute | cause | isolate | disentangle | n causal | n isolate |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, summary in metrics.items():
        rows = list(summary["per_attribute"].items()) + [("**overall**", summary["overall"])]
        for attribute, m in rows:
            lines.append(
                f"| {mode} | {attribute} | {_pct(m['cause'])} | {_pct(m['isolate'])} | {_pct(m['disentangle'])} "
                f"| {m['n_causal']} | {m['n_isolate']} |"
            )
    return "\n".join(lines)


def render_report(metrics: dict, history: list[dict], run_config, heatmap_file: str | None) -> str:
    """report.md: results table, training curve summary, heatmap, and the exact configuration."""
    parts = ["# HyperDAS run report", "", "Held-out templates (test split), teacher-forced exact match of the "
             "first 3 label tokens. Overall = mean over attributes; disentangle = (cause + isolate) / 2.", ""]
    parts += [metrics_table(metrics), ""]
    if history:
        first, last = history[0], history[-1]
        parts += [
            "## Training",
            "",
            f"{last['step']} optimizer steps in {last['seconds']:.0f} s; "
            f"loss {first['loss']:.3f} -> {last['loss']:.3f} "
            f"(cross-entropy {first['ce']:.3f} -> {last['ce']:.3f}). Per-step log: train_log.jsonl.",
            "",
        ]
    if heatmap_file:
        parts += [
            "## Where the concept is taken from",
            "",
            "Soft selection A over base tokens (columns) and source tokens + SELF (rows) for a few test pairs:",
            "",
            f"![selection]({heatmap_file})",
            "",
        ]
    config = dataclasses.asdict(run_config) if dataclasses.is_dataclass(run_config) else run_config
    parts += ["## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(parts)


def save_selection_heatmaps(entries: list[dict], path: Path) -> None:
    """One heatmap per pair: A (source tokens + SELF) x (base tokens), the paper's "nna" / "Paris" picture.

    Args:
        entries: dicts with "selection" (rows, cols) array, "base_tokens", "source_tokens", "title".
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(entries), figsize=(4.2 * len(entries), 4.6), squeeze=False)
    for ax, entry in zip(axes[0], entries, strict=True):
        ax.imshow(entry["selection"], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(entry["base_tokens"])), [repr(t)[1:-1] for t in entry["base_tokens"]], rotation=90,
                      fontsize=7)
        ax.set_yticks(range(len(entry["source_tokens"])), [repr(t)[1:-1] for t in entry["source_tokens"]],
                      fontsize=7)
        ax.set_xlabel("base token")
        ax.set_ylabel("source token (+ SELF)")
        ax.set_title(entry["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
