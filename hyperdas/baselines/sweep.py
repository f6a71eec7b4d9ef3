"""A DAS / MDAS layer sweep on a run's data, from cached target states (never recomputing the frozen prefix).

The target runs ONCE per prompt (``StateCache`` with only the swept layers kept); each layer k then trains one
``LastEntityDAS`` per attribute from its cached layer-k states through target layers k..end only, and is
evaluated on the same held-out test pairs, with the same metric, as HyperDAS. Beside every layer the sweep
reports the full-vector patch at the last entity token (``ceiling@Lk``, cause at that layer with isolation
ignored) and, once, the floor (no intervention).

- DAS (RAVEL): attribute A's subspace trained on A's causal examples only.
- MDAS (RAVEL's multi-task DAS): trained on A's causal examples and its isolate examples (which query the other
  attributes and must not change), weighted ``causal_weight`` / ``isolate_weight`` like HyperDAS's loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hyperdas.baselines.das import LastEntityDAS, full_vector_patch, patched_label_logits
from hyperdas.data.batch import PairBatch
from hyperdas.metrics import label_exact_match, records_from_batch, summarize
from hyperdas.model import FLOOR, LossWeights, weighted_label_loss
from hyperdas.state_cache import StateCache
from hyperdas.targets import precision_context

METHODS = ("das", "mdas")


@dataclass
class BaselineConfig:
    """One sweep. Defaults match the main job's HyperDAS run where they mean the same (r, weights, batch).

    Attributes:
        method: "das" (causal examples only) or "mdas" (causal and isolate examples).
        layers: the layers k swept (each patches hidden_states[k], the output of decoder layer k-1).
        rank: r, the subspace size.
        epochs: passes over each attribute's training examples.
        batch_size: pairs per optimizer step.
        lr: AdamW learning rate of the rotation (no weight decay).
        causal_weight, isolate_weight: per-example loss weights (MDAS; DAS sees causal examples only).
        eval_batch_size: pairs per evaluation forward.
        seed: seeds the initialisation and the order of the examples.
    """

    method: str = "mdas"
    layers: list[int] = field(default_factory=lambda: [4, 8, 12, 16])
    rank: int = 32
    epochs: int = 4
    batch_size: int = 16
    lr: float = 2e-3
    causal_weight: float = 3.5
    isolate_weight: float = 0.5
    eval_batch_size: int = 64
    seed: int = 0

    def validate(self, num_layers: int, hidden_size: int) -> BaselineConfig:
        """The config itself, or a ValueError naming the bad value and what is allowed."""
        if self.method not in METHODS:
            raise ValueError(f"baseline method {self.method!r}; allowed: {list(METHODS)}")
        if not self.layers:
            raise ValueError(f"no layer to sweep; allowed: 1..{num_layers}")
        for layer in self.layers:
            if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= num_layers:
                raise ValueError(
                    f"layer {layer!r} out of range for a {num_layers}-layer target: allowed 1..{num_layers}"
                )
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers repeat: {self.layers}")
        if not 1 <= self.rank <= hidden_size:
            raise ValueError(f"rank {self.rank} out of range for hidden size {hidden_size}: allowed 1..{hidden_size}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        return self


def _training_rows(train, attribute: str, method: str) -> list[int]:
    kinds = ("causal",) if method == "das" else ("causal", "isolate")
    return [
        i
        for i, (a, t) in enumerate(zip(train["attribute"], train["attribute_type"], strict=True))
        if a == attribute and t in kinds
    ]


def _layer_states(cache: StateCache, batch: PairBatch, slot: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    base, source = cache.states_for(batch, device)
    return base[:, :, slot], source[:, :, slot]


def train_das(
    target,
    cache: StateCache,
    train,
    collate,
    attribute: str,
    layer: int,
    config: BaselineConfig,
    progress: bool = False,
) -> LastEntityDAS:
    """One attribute's subspace at one layer, trained from cached states (see module docstring)."""
    slot = cache.layers.index(layer)
    device = target.device
    torch.manual_seed(config.seed * 1_000_003 + layer * 101 + sum(map(ord, attribute)))
    das = LastEntityDAS(target.hidden_size, config.rank).to(device)
    optimizer = torch.optim.AdamW(das.parameters(), lr=config.lr, weight_decay=0.0)
    rows = _training_rows(train, attribute, config.method)
    weights = LossWeights(config.causal_weight, config.isolate_weight, 0.0)
    generator = torch.Generator().manual_seed(config.seed * 7919 + layer)
    steps = [(epoch, start) for epoch in range(config.epochs) for start in range(0, len(rows), config.batch_size)]
    order = {}
    for epoch, start in tqdm(steps, desc=f"{config.method} L{layer} {attribute}", disable=not progress, leave=False):
        if epoch not in order:
            order[epoch] = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
        batch = collate(train, order[epoch][start : start + config.batch_size])
        h, s = _layer_states(cache, batch, slot, device)
        with precision_context(target.dtype, device):
            logits = patched_label_logits(target, layer, das, h, s, batch)
            loss = weighted_label_loss(logits, batch.label_ids.to(device), batch.is_causal.to(device), weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return das


@torch.no_grad()
def evaluate_patch(
    target, cache: StateCache, test, collate, indices: list[int], layer: int, patch, batch_size: int
) -> list[dict]:
    """Records (attribute, attribute_type, domain, correct) of test rows ``indices`` under ``patch`` at ``layer``."""
    slot = cache.layers.index(layer)
    device = target.device
    records = []
    for start in range(0, len(indices), batch_size):
        batch = collate(test, indices[start : start + batch_size])
        h, s = _layer_states(cache, batch, slot, device)
        with precision_context(target.dtype, device):
            logits = patched_label_logits(target, layer, patch, h, s, batch)
        correct = label_exact_match(logits.float(), batch.label_ids.to(device)).cpu()
        records += records_from_batch(batch, correct)
    return records


def run_sweep(
    target, train, test, collate, config: BaselineConfig, cache: StateCache, progress: bool = True
) -> dict[str, dict]:
    """Train and evaluate every (layer, attribute); returns {floor, ceiling@Lk, method@Lk: summary + seconds}.

    Args:
        target: the frozen target.
        train, test: the run's splits (``datasets.Dataset`` or lists of rows with the RAVEL fields).
        collate: ``(split, indices) -> batch`` (``RunData.collate``).
        config: the sweep.
        cache: a ``StateCache`` of this target holding ``config.layers`` for every train and test prompt.
        progress: show progress bars.
    """
    cache.check_target(target)
    if cache.layers != list(config.layers):
        raise ValueError(f"the state cache holds layers {cache.layers}, the sweep needs {config.layers}")
    attributes = sorted(set(train["attribute"]))
    test_rows = {a: [i for i, b in enumerate(test["attribute"]) if b == a] for a in attributes}
    everything = [i for rows in test_rows.values() for i in rows]
    metrics: dict[str, dict] = {}
    floor = evaluate_patch(target, cache, test, collate, everything, config.layers[0], None, config.eval_batch_size)
    metrics[FLOOR] = summarize(floor)
    for layer in config.layers:
        start = time.perf_counter()
        ceiling = evaluate_patch(
            target, cache, test, collate, everything, layer, full_vector_patch, config.eval_batch_size
        )
        metrics[f"ceiling@L{layer}"] = summarize(ceiling)
        records = []
        for attribute in attributes:
            das = train_das(target, cache, train, collate, attribute, layer, config, progress)
            das.eval()
            records += evaluate_patch(
                target, cache, test, collate, test_rows[attribute], layer, das, config.eval_batch_size
            )
        metrics[f"{config.method}@L{layer}"] = summarize(records) | {"seconds": round(time.perf_counter() - start, 1)}
    return metrics
