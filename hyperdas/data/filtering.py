"""Per-model filtering: keep an example only if the target model already knows its label.

The model is teacher-forced on ``verify_text`` followed by the label tokens (causal: the base template
filled with the SOURCE entity; isolate: the base prompt), and the example is kept only if every label token
is the argmax of the logits before it (METHOD.md, "Data"). The verify prompt is tokenised exactly as the
collator tokenises a base prompt (BOS as the tokenizer adds it, then prefix and suffix separately), so an
isolate example is checked on the very tokens it is trained and evaluated on.

Batched, without gradients, left padded, sorted by length (little padding), and with logits computed at
the label positions only (``FrozenTarget.logits_at``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from hyperdas.data.collate import encode_with_label, label_tensors, leading_special_ids, left_pad, pad_id_of
from hyperdas.data.examples import label_value
from hyperdas.metrics import label_exact_match


@dataclass
class FilterCount:
    """How many candidates of one (split, attribute, attribute type) were checked, passed and kept.

    ``passed`` counts candidates the model got right; ``kept`` those that went into the data (the builder
    stops keeping once a kind has its share, so kept <= passed).
    """

    split: str
    attribute: str
    attribute_type: str
    total: int = 0
    passed: int = 0
    kept: int = 0


def verify_parts(example: Mapping[str, str]) -> tuple[str, str]:
    """``verify_text`` split into (prefix ending with its entity, suffix); the suffix is the base's."""
    text, suffix = example["verify_text"], example["input_suffix"]
    if not text.endswith(suffix):
        raise ValueError(f"verify_text {text!r} does not end with the base suffix {suffix!r}")
    return text[: len(text) - len(suffix)], suffix


def filter_examples(
    target, examples: Sequence[Mapping[str, str]], batch_size: int = 64, progress: bool | tqdm = True
) -> list[bool]:
    """Which examples the target predicts right: every label token is the teacher-forced argmax.

    Args:
        target: a ``FrozenTarget`` (or anything with ``tokenizer``, ``device`` and ``logits_at``).
        examples: rows with ``verify_text``, ``input_suffix``, ``attribute_type`` and the targets.
        batch_size: examples per forward pass.
        progress: True for a progress bar of its own, False for none, or a tqdm bar to advance.

    Returns:
        One bool per example, in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tokenizer = target.tokenizer
    lead, pad_id = leading_special_ids(tokenizer), pad_id_of(tokenizer)
    parts = [verify_parts(e) for e in examples]
    prefixes, suffixes, labels = encode_with_label(
        tokenizer, [p for p, _ in parts], [s for _, s in parts], [label_value(e) for e in examples]
    )
    prompts = [lead + p + s for p, s in zip(prefixes, suffixes, strict=True)]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]) + len(labels[i]))

    bar = progress if isinstance(progress, tqdm) else tqdm(total=len(examples), unit="ex", disable=not progress)
    keep = [False] * len(examples)
    device = target.device
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask, offsets = left_pad([prompts[i] + labels[i] for i in batch], pad_id)
        positions, label_ids = label_tensors(
            [labels[i] for i in batch], [off + len(prompts[i]) for off, i in zip(offsets, batch, strict=True)]
        )
        logits = target.logits_at(ids.to(device), mask.to(device), positions.to(device))
        for i, ok in zip(batch, label_exact_match(logits, label_ids.to(device), first_n=None).tolist(), strict=True):
            keep[i] = ok
        bar.update(len(batch))
    if bar is not progress:
        bar.close()
    return keep


def filter_report(examples: Sequence[Mapping[str, str]], keep: Sequence[bool]) -> list[dict[str, object]]:
    """Kept / total per split, attribute and attribute type, as JSON-ready rows (every passed example kept)."""
    counts: dict[tuple[str, str, str], FilterCount] = {}
    for example, ok in zip(examples, keep, strict=True):
        key = (example["split"], example["attribute"], example["attribute_type"])
        count = counts.setdefault(key, FilterCount(*key))
        count.total += 1
        count.passed += bool(ok)
        count.kept += bool(ok)
    return [asdict(counts[key]) for key in sorted(counts)]


def format_report(rows: Sequence[Mapping[str, object]]) -> str:
    """A plain-text table of report rows: kept, passed and total per split, attribute and type."""
    header = ("split", "attribute", "type", "kept", "passed", "total", "pass rate")
    lines = [header]
    for row in rows:
        rate = f"{row['passed'] / row['total']:.1%}" if row["total"] else "-"
        lines.append(
            (row["split"], row["attribute"], row["attribute_type"], row["kept"], row["passed"], row["total"], rate)
        )
    kept, passed, total = (sum(int(r[k]) for r in rows) for k in ("kept", "passed", "total"))
    lines.append(("all", "", "", kept, passed, total, f"{passed / total:.1%}" if total else "-"))
    widths = [max(len(str(line[c])) for line in lines) for c in range(len(header))]
    return "\n".join(
        "  ".join(
            str(v).ljust(w) if c < 3 else str(v).rjust(w) for c, (v, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )
