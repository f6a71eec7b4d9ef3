"""The data of a run: the filtered RAVEL splits for the run's target, and the collator that batches them.

Every process of a multi-process run must take part in every forward of a ZeRO-3-partitioned target, so
when the dataset is not built yet, all processes filter in lockstep (the same deterministic request gives
the same batches on each); only the main process's copy is kept, the others build into a scratch folder.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hyperdas.data.build import DataRequest, build_dataset, dataset_folder
from hyperdas.data.collate import Collator
from hyperdas.targets import FrozenTarget
from hyperdas.train.config import RunConfig


@dataclass
class RunData:
    """Train and test splits (datasets.Dataset) and their collator."""

    train: object
    test: object
    collator: Collator
    folder: Path

    def collate(self, split, indices: list[int]) -> dict:
        """The collated batch of rows ``indices`` of ``split``."""
        return self.collator([split[i] for i in indices])


def data_request(config: RunConfig) -> DataRequest:
    """The data request a run config makes (its target, its seed)."""
    data = config.data
    return DataRequest(
        domain=data.domain,
        attributes=tuple(data.attributes),
        isolate_attributes=tuple(data.isolate_attributes) if data.isolate_attributes else None,
        target=config.model.target,
        target_dtype=config.model.torch_dtype,
        max_examples=data.max_examples,
        test_share=data.test_share,
        seed=config.seed,
        sources=tuple(data.sources),
    ).validate()


def load_run_data(config: RunConfig, target: FrozenTarget, setup) -> RunData:
    """Build (once per machine, cached) or load the run's data. ``setup``: rank, world_size, barrier()."""
    request = data_request(config)
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
    return RunData(dataset["train"], dataset["test"], Collator(target.tokenizer), folder)
