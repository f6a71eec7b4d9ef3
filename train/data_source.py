"""The data of a run: the filtered RAVEL splits for the run's target, and the collator that batches them.

Every process of a multi-process run must take part in every forward of a ZeRO-3-partitioned target, so
when the dataset is not built yet, all processes filter in lockstep (the same deterministic request gives
the same batches on each); only the main process's copy is kept, the others build into a scratch folder.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hyperdas.cache import cache_root
from hyperdas.data.build import REPORT_FILE, build_dataset, dataset_folder, format_report, load_report
from hyperdas.data.collate import Collator
from hyperdas.state_cache import StateCache, plan_storage, real_rows
from hyperdas.targets import FrozenTarget
from hyperdas.train.config import RunConfig


@dataclass
class RunData:
    """Train and test splits (datasets.Dataset), their collator, and the train split's cached target states."""

    train: object
    test: object
    collator: Collator
    folder: Path
    states: StateCache | None = None
    _lengths: list[int] | None = field(default=None, repr=False)

    def collate(self, split, indices: list[int]) -> dict:
        """The collated batch of rows ``indices`` of ``split``."""
        return self.collator([split[i] for i in indices])

    def pair_lengths(self) -> list[int]:
        """Tokens of each training pair's base and source rows together, as the collator makes them (cached)."""
        if self._lengths is None:
            pairs = self.pair_rows(self.train, list(range(len(self.train))))
            self._lengths = [len(base) + len(source) for base, source in pairs]
        return self._lengths

    def pair_rows(self, split, indices: list[int], chunk: int = 64) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(base row, source row) real-token ids of examples ``indices``, as the collator makes them."""
        pairs = []
        for start in range(0, len(indices), chunk):
            batch = self.collate(split, indices[start : start + chunk])
            bases = real_rows(batch.base_input_ids, batch.base_attention_mask)
            pairs += zip(bases, real_rows(batch.source_input_ids, batch.source_attention_mask), strict=True)
        return pairs

    def prompt_rows(self, split, indices: list[int]) -> list[tuple[int, ...]]:
        """The real-token rows of the base and source prompts of examples ``indices``."""
        return [row for pair in self.pair_rows(split, indices) for row in pair]


def load_run_data(config: RunConfig, target: FrozenTarget, setup) -> RunData:
    """Build (once per machine, cached) or load the run's data. ``setup``: rank, world_size, barrier()."""
    request = config.data_request()
    folder = dataset_folder(request)
    batch = config.data.filter_batch_size
    if setup.world_size == 1 or (folder / "dataset_dict.json").is_file():
        dataset = build_dataset(request, target, batch_size=batch)
    elif setup.is_main:
        dataset = build_dataset(request, target, batch_size=batch)
        setup.barrier()
    else:
        scratch = Path(tempfile.mkdtemp(prefix=f"hyperdas-data-rank{setup.rank}-"))
        try:
            build_dataset(request, target, root=scratch, batch_size=batch, progress=False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        setup.barrier()
        dataset = build_dataset(request, target, batch_size=batch)
    if setup.is_main and (folder / REPORT_FILE).is_file():  # what the data is, built now or cached
        print(f"hyperdas train: data {folder}\n{format_report(load_report(folder))}", flush=True)
    return RunData(dataset["train"], dataset["test"], Collator(target.tokenizer), folder)


def cache_train_states(data: RunData, target: FrozenTarget, config: RunConfig, setup, examples: list[int]) -> None:
    """Fill ``data.states`` with the target states of ``examples`` of the train split (this process's shards).

    The storage is sized first (``plan_storage``, ``config.state_cache``) and announced in one line. Every
    process of a multi-process run takes the same decision (the cache is used only if it fits everywhere) and
    runs the same number of filling forwards, which a ZeRO-3-partitioned target needs.
    """
    rows = data.prompt_rows(data.train, examples)
    plan = plan_storage(StateCache.bytes_needed(target, rows), config.state_cache, cache_root() / "states")
    batch = config.data.filter_batch_size
    unique = len(set(rows))
    enabled, forwards = plan.storage != "off", -(-unique // batch)
    if setup.world_size > 1:
        enabled, forwards = _agree(enabled, forwards, target.device)
    if setup.is_main:
        print(
            f"hyperdas train: {plan.reason}"
            + ("" if enabled or plan.storage == "off" else " on this process, but not on every one: the cache is off")
        )
    if not enabled:
        return
    cache = StateCache(target, plan.storage, cache_root() / "states")
    cache.fill(rows, batch_size=batch, progress=setup.is_main, steps=forwards if setup.world_size > 1 else None)
    data.states = cache


def _agree(enabled: bool, forwards: int, device) -> tuple[bool, int]:
    """(every process enabled, the most forwards any process needs) over the process group."""
    import torch
    import torch.distributed as dist

    values = torch.tensor([0 if enabled else 1, forwards], dtype=torch.long, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return bool(values[0] == 0), int(values[1])
