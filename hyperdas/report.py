"""Human-readable results: the cause / isolate / disentangle table and the selection heatmap."""

from __future__ import annotations

from pathlib import Path

import yaml

from hyperdas.config import plain_values


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


#: what the reference rows of a metrics table mean (hyperdas.model.FLOOR / CEILING)
REFERENCE_NOTES = {
    "floor": "no intervention at all: what doing nothing scores on the same pairs",
    "ceiling": "whole vector of the last source entity token into the last base entity token (cause ceiling, "
    "isolation ignored)",
}


def above_floor(metrics: dict) -> list[str]:
    """One line per mode: how far its overall cause and disentangle are above the floor's, in points."""
    floor = metrics.get("floor")
    if floor is None:
        return []
    lines = []
    for mode, summary in metrics.items():
        if mode in REFERENCE_NOTES or summary["overall"]["disentangle"] is None:
            continue
        d = 100 * (summary["overall"]["disentangle"] - floor["overall"]["disentangle"])
        c = 100 * (summary["overall"]["cause"] - floor["overall"]["cause"])
        lines.append(f"- {mode}: disentangle {d:+.1f} points over the floor (cause {c:+.1f})")
    return lines


def selection_table(metrics: dict) -> str:
    """Markdown: where each mode's selection moves information (hyperdas.selection_stats), overall."""
    lines = [
        "| mode | moved | on base entity | on last base entity token | from source entity | entity to entity |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, summary in metrics.items():
        stats = summary.get("selection")
        if stats is None:
            continue
        m = stats["overall"]
        moved = "n/a" if m["moved"] is None else f"{m['moved']:.2f}"
        lines.append(
            f"| {mode} | {moved} | {_pct(m['base_entity_share'])} | {_pct(m['last_entity_share'])} | "
            f"{_pct(m['source_entity_share'])} | {_pct(m['entity_to_entity_share'])} |"
        )
    return "\n".join(lines)


def position_table(metrics: dict) -> str:
    """Markdown: per mode, the moved mass split by base position class it lands on and source class it leaves."""
    from hyperdas.selection_stats import POSITION_CLASSES

    head = [f"base {c}" for c in POSITION_CLASSES] + [f"source {c}" for c in POSITION_CLASSES]
    lines = ["| mode | " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * len(head)) + " |"]
    for mode, summary in metrics.items():
        if "selection" in summary:
            m = summary["selection"]["overall"]
            cells = [_pct(m[f"{side}_{c}"]) for side in ("base", "source") for c in POSITION_CLASSES]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(points: list[dict]) -> str:
    """Markdown: the learning curve (train.learning_curve), one row per point, soft beside the floor per split."""
    lines = [
        "| step | train split: soft (cause / isolate / disentangle) | train floor | test split: soft | test floor |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]

    def cells(entry: dict) -> str:
        return " / ".join(_pct(entry[key]) for key in ("cause", "isolate", "disentangle"))

    for point in points:
        train, test = point["train"], point["test"]
        lines.append(
            f"| {point['step']} | {cells(train['soft'])} | {_pct(train['floor']['disentangle'])} "
            f"| {cells(test['soft'])} | {_pct(test['floor']['disentangle'])} |"
        )
    return "\n".join(lines)


def overlap_table(overlap: dict[str, dict[str, float | None]]) -> str:
    """Markdown: the attribute x attribute table of hyperdas.subspace_overlap's mean cosines."""
    names = list(overlap)
    lines = ["| attribute | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for a in names:
        cells = ("-" if overlap[a][b] is None else f"{overlap[a][b]:.3f}" for b in names)
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(
    metrics: dict,
    history: list[dict],
    run_config,
    figures: dict[str, str] | None = None,
    split: str = "test",
    curve: list[dict] | None = None,
    overlap: dict[str, dict[str, float | None]] | None = None,
) -> str:
    """report.md: results beside floor and ceiling, selection statistics, training summary, figures, config.

    Args:
        figures: "heatmap", "positions", "pca", "curve" -> file names of the figures written beside the report.
        split: the rows evaluated; "train" is said in the title and the first line, so it is not read as a result.
        curve: the learning curve's points (train.learning_curve), if the run took any.
        overlap: the subspaces' overlap by attribute (hyperdas.subspace_overlap), if the module chooses per example.
    """
    figures = figures or {}
    evaluated = (
        "Held-out templates (test split)"
        if split == "test"
        else f"The {split} split: pairs the model was TRAINED on, not a result; compare with the test split's report"
    )
    parts = [
        "# HyperDAS run report" + ("" if split == "test" else f" ({split} split)"),
        "",
        f"{evaluated}, teacher-forced exact match of the "
        "first 3 label tokens. Overall = mean over attributes; disentangle = (cause + isolate) / 2.",
        "",
    ]
    parts += [f"- **{name}**: {note}" for name, note in REFERENCE_NOTES.items() if name in metrics]
    parts += ["", metrics_table(metrics), ""]
    parts += above_floor(metrics) + [""]
    if any("selection" in summary for summary in metrics.values()):
        parts += [
            "## Where the selection moves information",
            "",
            "Moved: base positions' worth of information taken from the source (mean per pair). The shares are "
            "of that moved mass: landing on the base entity's tokens, taken from the source entity's tokens, and "
            "both at once. A selection that localises has them near 100.",
            "",
            selection_table(metrics),
            "",
            "By position class (where the moved mass lands in the base, where it comes from in the source): before "
            "the entity, the entity's other tokens, its last token, after it.",
            "",
            position_table(metrics),
            "",
        ]
        if "positions" in figures:
            parts += [f"![positions]({figures['positions']})", ""]
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
    if curve:
        parts += [
            "## Learning curve",
            "",
            f"Soft mode and the floor, overall, on the same pairs of each split at every point "
            f"({curve[0]['train']['pairs']} train and {curve[0]['test']['pairs']} test pairs; "
            "learning_curve.jsonl): the train split's pairs were trained on, the test split's templates never "
            "were. Where train rises and test does not, the editor memorises.",
            "",
            curve_table(curve),
            "",
        ]
        parts += [f"![curve]({figures['curve']})", ""] if "curve" in figures else []
    if "pca" in figures:
        parts += [
            "## The subspaces chosen per example",
            "",
            "The first two principal components of the subspace module's per-example vectors (ReflectSelect: the "
            "reflection vectors v, K of them concatenated) over the test pairs, by attribute named in the "
            "instruction; the vectors are in subspace_analysis.safetensors.",
            "",
            f"![pca]({figures['pca']})",
            "",
        ]
    if overlap:
        parts += [
            "How much two examples' subspaces share: the mean cosine of their patch operators W Wᵀ (1 = the same "
            "subspace, 0 = orthogonal; for orthonormal W, the mean squared cosine of the principal angles), by "
            "the attribute each instruction names (subspace_overlap.json). ReflectSelect's with K reflections of "
            "one shared basis is at least (r − 2K)/r by construction: with the paper's K = 1, one reflection of a "
            "shared basis cannot give attributes subspaces of their own (model.basis_per_attribute gives each "
            "attribute its own basis).",
            "",
            overlap_table(overlap),
            "",
        ]
    heatmap_file = figures.get("heatmap")
    if heatmap_file:
        parts += [
            "## Where the concept is taken from",
            "",
            "Soft selection A over base tokens (columns) and source tokens + SELF (rows) for a few test pairs:",
            "",
            f"![selection]({heatmap_file})",
            "",
        ]
    config = plain_values(run_config)
    parts += ["## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(parts)


def baseline_report(metrics: dict, config: dict, seconds: float) -> str:
    """report.md of a DAS/MDAS sweep: results beside floor and per-layer ceiling, seconds per layer, config."""
    method = config["method"]
    lines = [
        f"# {method.upper()} baseline (RAVEL), layers {config['layers']}",
        "",
        "Held-out templates (test split), teacher-forced exact match of the first 3 label tokens, the same pairs and "
        "metric as the HyperDAS run with this run config. One rotated subspace of rank "
        f"{config['rank']} per attribute at the last entity token (pyvene's LowRankRotatedSpaceIntervention); "
        + (
            "trained on the attribute's causal examples only."
            if method == "das"
            else "trained on the attribute's causal and isolate examples."
        ),
        "",
        f"- **floor**: {REFERENCE_NOTES['floor']}",
        "- **ceiling@Lk**: " + REFERENCE_NOTES["ceiling"] + " at layer k",
        "",
        metrics_table(metrics),
        "",
        *above_floor(metrics),
        "",
        "| entry | seconds (training and evaluation of every attribute at that layer) |",
        "| --- | ---: |",
        *[f"| {name} | {m['seconds']:.0f} |" for name, m in metrics.items() if "seconds" in m],
        "",
        f"{seconds:.0f} s in all, target loading, data and the state cache included.",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def comparison_table(runs: dict[str, dict]) -> str:
    """Markdown: one row per (run, entry) with cause / isolate / disentangle per attribute and overall.

    Args:
        runs: run name -> its metrics.json. The floor is shown once (from the first run that has it).
    """
    attributes = sorted({a for metrics in runs.values() for m in metrics.values() for a in m["per_attribute"]})
    header = ["run", "entry", *[f"{a} c / i / d" for a in attributes], "overall c / i / d"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---", "---"] + ["---:"] * (len(header) - 2)) + " |"]
    floor_shown = False

    def cells(m):
        return f"{_pct(m['cause'])} / {_pct(m['isolate'])} / {_pct(m['disentangle'])}"

    for run, metrics in runs.items():
        for entry, summary in metrics.items():
            if entry == "floor":
                if floor_shown:
                    continue
                floor_shown = True
            per = summary["per_attribute"]
            row = [run, entry, *[cells(per[a]) if a in per else "" for a in attributes], cells(summary["overall"])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def save_position_plot(metrics: dict, path: Path) -> None:
    """Bars per mode: the share of moved mass by base and source position class (``position_table``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hyperdas.selection_stats import POSITION_CLASSES

    modes = [m for m, summary in metrics.items() if "selection" in summary]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    width = 0.8 / max(len(modes), 1)
    for ax, side in zip(axes, ("base", "source"), strict=True):
        for i, mode in enumerate(modes):
            overall = metrics[mode]["selection"]["overall"]
            values = [overall[f"{side}_{c}"] or 0.0 for c in POSITION_CLASSES]
            ax.bar([x + i * width for x in range(len(POSITION_CLASSES))], values, width, label=mode)
        ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(POSITION_CLASSES))], POSITION_CLASSES)
        ax.set_title(f"{side} positions ({'where it lands' if side == 'base' else 'where it comes from'})")
    axes[0].set_ylabel("share of moved mass")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_curve_plot(points: list[dict], path: Path) -> None:
    """Disentangle against step, soft on each split, with each split's floor dashed (train.learning_curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for split, colour in (("train", "tab:blue"), ("test", "tab:orange")):
        soft = [100 * p[split]["soft"]["disentangle"] for p in points]
        floor = [100 * p[split]["floor"]["disentangle"] for p in points]
        ax.plot(steps, soft, "o-", color=colour, label=f"{split}: soft")
        ax.plot(steps, floor, "--", color=colour, alpha=0.6, label=f"{split}: floor")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("disentangle (%)")
    ax.set_title("learning curve: trained-on pairs vs held-out templates")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_pca_plot(vectors, labels: list[dict], name: str, path: Path) -> None:
    """The first two principal components of per-example vectors (n, dim), coloured by attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    x = vectors.double() - vectors.double().mean(dim=0)
    _, s, v = torch.linalg.svd(x, full_matrices=False)
    points = (x @ v[:2].T).numpy() if v.shape[0] >= 2 else torch.zeros(len(x), 2).numpy()
    explained = (s[:2] ** 2 / (s**2).sum()).tolist() if len(s) >= 2 else [0.0, 0.0]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for attribute in sorted({r["attribute"] for r in labels}):
        for kind, marker in (("causal", "o"), ("isolate", "x")):
            rows = [i for i, r in enumerate(labels) if r["attribute"] == attribute and r["attribute_type"] == kind]
            if rows:
                ax.scatter(points[rows, 0], points[rows, 1], s=12, marker=marker, label=f"{attribute} ({kind})")
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}%)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}%)")
    ax.set_title(f"{name} per test pair")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        ax.set_xticks(
            range(len(entry["base_tokens"])), [repr(t)[1:-1] for t in entry["base_tokens"]], rotation=90, fontsize=7
        )
        ax.set_yticks(range(len(entry["source_tokens"])), [repr(t)[1:-1] for t in entry["source_tokens"]], fontsize=7)
        ax.set_xlabel("base token")
        ax.set_ylabel("source token (+ SELF)")
        ax.set_title(entry["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
