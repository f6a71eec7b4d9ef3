"""Which (entity, template) prompts the target knows, checked once per prompt and cached (METHOD.md, "Data").

A prompt is one template of an attribute filled with one entity, e.g. ("Continent", "%s is a city in the
continent of", "Tokyo"). It is **known** when the target, teacher-forced on the prompt followed by the entity's
value, gives every label token as its argmax. Examples are then paired only from known prompts
(``hyperdas.data.pairs``), so no pair needs a forward pass of its own, and a new pairing, seed, split or
attribute set over the same prompts costs none.

Which prompts are checked is the **prompt universe** of a domain: for every template of an attribute, a
sample of ``entities_per_template`` entities that have a value for it, seeded by (domain, attribute, template)
alone. The universe therefore does not depend on the run's seed, the requested attribute set or the split,
and a larger universe contains every smaller one, so the table only ever grows.

The table lives at ``cache_root()/"known"/<target>-<fingerprint>-<dtype>-<domain>-v<KNOWN_FORMAT_VERSION>.json``:
{prompt key: known}. Checking is batched and computes logits at the label positions only
(``FrozenTarget.logits_at``); the prompt is tokenised exactly as the collator tokenises a base prompt, so a
prompt is checked on the very tokens it is trained and evaluated on. A batch holds rows of one length only, so no
row is ever padded: in bf16 a padded row's near-tie argmax can flip with the padding its batch happens to need,
which would make "known" depend on which other prompts were checked beside it. Without padding each row's answer
is that of the prompt run alone.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from hyperdas.cache import cache_root
from hyperdas.data.collate import encode_with_label, label_tensors, leading_special_ids, left_pad, pad_id_of
from hyperdas.data.examples import fill
from hyperdas.data.ravel import RavelDomain
from hyperdas.metrics import label_exact_match

#: Bump when what "known" means or how a prompt is tokenised changes, so old tables are not reused.
KNOWN_FORMAT_VERSION = 2  # v2: rows checked unpadded (v1 tables depend on their batches' padding)


@dataclass(frozen=True, order=True)
class Prompt:
    """One template of ``attribute`` filled with ``entity``; known when the target answers the entity's value."""

    attribute: str
    template: str
    entity: str

    @property
    def key(self) -> str:
        return f"{self.attribute}\t{self.template}\t{self.entity}"


def prompt_universe(domain: RavelDomain, attributes: Iterable[str], entities_per_template: int) -> list[Prompt]:
    """The prompts a sampler may use: per template of each attribute, a seeded sample of entities with a value.

    Args:
        domain: the RAVEL domain.
        attributes: the attributes whose templates are filled (both splits' templates).
        entities_per_template: entities per template; all of them where fewer have a value.

    Returns:
        Prompts in a fixed order (attribute, template, entity sample order).
    """
    if entities_per_template < 1:
        raise ValueError(f"entities_per_template must be at least 1, got {entities_per_template}")
    prompts = []
    for attribute in attributes:
        entities = domain.entities_with(attribute)
        for template in domain.attribute_prompts[attribute]:
            rng = random.Random(f"{domain.name}/{attribute}/{template}")
            chosen = entities if len(entities) <= entities_per_template else rng.sample(entities, entities_per_template)
            prompts.extend(Prompt(attribute, template, entity) for entity in chosen)
    return prompts


def check_prompts(
    target, domain: RavelDomain, prompts: Sequence[Prompt], batch_size: int = 64, progress: bool | tqdm = True
) -> list[bool]:
    """Which prompts the target knows: teacher-forced on prompt + value, every label token is the argmax.

    Args:
        target: a ``FrozenTarget`` (or anything with ``tokenizer``, ``device`` and ``logits_at``).
        domain: the domain the prompts' entities belong to (their values).
        prompts: the prompts to check.
        batch_size: the most prompts per forward pass (a batch holds prompts of one token length only).
        progress: True for a progress bar of its own, False for none, or a tqdm bar to advance.

    Returns:
        One bool per prompt, in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not prompts:
        return []
    tokenizer = target.tokenizer
    lead, pad_id = leading_special_ids(tokenizer), pad_id_of(tokenizer)
    parts = [fill(p.template, p.entity) for p in prompts]
    prefixes, suffixes, labels = encode_with_label(
        tokenizer, [a for a, _ in parts], [b for _, b in parts], [domain.value(p.entity, p.attribute) for p in prompts]
    )
    rows = [lead + a + b for a, b in zip(prefixes, suffixes, strict=True)]
    bar = progress if isinstance(progress, tqdm) else tqdm(total=len(prompts), unit="prompt", disable=not progress)
    known = [False] * len(prompts)
    device = target.device
    for batch in equal_length_batches([len(r) + len(lab) for r, lab in zip(rows, labels, strict=True)], batch_size):
        ids, mask, offsets = left_pad([rows[i] + labels[i] for i in batch], pad_id)
        assert mask.all(), "a checking batch must hold rows of one length (no padding)"
        positions, label_ids = label_tensors(
            [labels[i] for i in batch], [off + len(rows[i]) for off, i in zip(offsets, batch, strict=True)]
        )
        logits = target.logits_at(ids.to(device), mask.to(device), positions.to(device))
        hits = label_exact_match(logits, label_ids.to(device), first_n=None).tolist()
        for i, ok in zip(batch, hits, strict=True):
            known[i] = bool(ok)
        bar.update(len(batch))
    if bar is not progress:
        bar.close()
    return known


def equal_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` whose rows all have one length, shortest first."""
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(i)
    return [
        group[start : start + batch_size]
        for _, group in sorted(by_length.items())
        for start in range(0, len(group), batch_size)
    ]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:] or "target"


class KnownPromptTable:
    """The cached {prompt: known} table of one (target, target fingerprint, dtype, domain, format version).

    Args:
        target_name: the target's name (``FrozenTarget.name``).
        fingerprint: ``hyperdas.targets.target_fingerprint`` of the target (its config and weights).
        dtype: the dtype the target runs in ("bfloat16", ...): argmax near-ties differ between dtypes.
        domain: the RAVEL domain.
        root: the folder of tables (default ``cache_root()/"known"``).
    """

    def __init__(self, target_name: str, fingerprint: str, dtype: str, domain: str, root: str | Path | None = None):
        folder = Path(root) if root is not None else cache_root() / "known"
        self.path = folder / f"{_slug(target_name)}-{fingerprint}-{dtype}-{domain}-v{KNOWN_FORMAT_VERSION}.json"
        self.identity = {
            "target": target_name,
            "fingerprint": fingerprint,
            "dtype": dtype,
            "domain": domain,
            "format": KNOWN_FORMAT_VERSION,
        }
        self.table: dict[str, bool] = {}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"the known-prompt table {self.path} is damaged ({err}); delete it and it is rebuilt"
                ) from err
            if saved.get("identity") != self.identity:
                raise ValueError(f"{self.path} belongs to {saved.get('identity')}, not {self.identity}; delete it")
            self.table = {k: bool(v) for k, v in saved["known"].items()}

    def missing(self, prompts: Iterable[Prompt]) -> list[Prompt]:
        """The prompts not checked yet, each once, in order."""
        seen, out = set(), []
        for p in prompts:
            if p.key not in self.table and p.key not in seen:
                seen.add(p.key)
                out.append(p)
        return out

    def known(self, prompt: Prompt) -> bool:
        """Whether ``prompt`` is known (KeyError if it was never checked)."""
        return self.table[prompt.key]

    def update(self, prompts: Sequence[Prompt], known: Sequence[bool]) -> None:
        """Record checked prompts and save the table atomically (a temporary file renamed into place)."""
        for p, ok in zip(prompts, known, strict=True):
            self.table[p.key] = bool(ok)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        partial.write_text(json.dumps({"identity": self.identity, "known": self.table}))
        partial.replace(self.path)


#: prompts checked between two saves of the table, so an interrupted check keeps most of its work
SAVE_EVERY = 1024


def ensure_known(
    target,
    domain: RavelDomain,
    prompts: Sequence[Prompt],
    table: KnownPromptTable,
    batch_size: int = 64,
    progress: bool = True,
) -> int:
    """Check the prompts ``table`` lacks with ``target`` and record them; returns how many were checked."""
    todo = table.missing(prompts)
    if todo:
        bar = tqdm(total=len(todo), unit="prompt", desc=f"known prompts ({domain.name})", disable=not progress)
        for start in range(0, len(todo), SAVE_EVERY):
            chunk = todo[start : start + SAVE_EVERY]
            table.update(chunk, check_prompts(target, domain, chunk, batch_size=batch_size, progress=bar))
        bar.close()
    return len(todo)
