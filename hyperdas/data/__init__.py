"""RAVEL counterfactual data: known prompts, examples paired from them, caching and collation.

- ``ravel``: the shipped RAVEL files (``load_domain``, ``DOMAINS``).
- ``known``: which (entity, template) prompts the target knows, checked once per prompt and cached.
- ``examples``: causal and isolate examples paired from known prompts, split by template (``PairSampler``).
- ``build``: ``build_dataset(DataRequest(...), target)``, balanced and cached on disk, with its report.
- ``batch``: ``PairBatch``, the typed batch one HyperDAS step reads (fields and shapes).
- ``collate``: ``Collator``, dataset rows to a ``PairBatch``.
"""

from hyperdas.data.batch import PairBatch
from hyperdas.data.build import DataRequest, build_dataset, dataset_folder, format_report, load_report
from hyperdas.data.collate import Collator, dataloader
from hyperdas.data.examples import make_examples
from hyperdas.data.known import KnownPromptTable, check_prompts, prompt_universe
from hyperdas.data.ravel import DOMAINS, attributes, load_domain

__all__ = [
    "DOMAINS",
    "Collator",
    "DataRequest",
    "KnownPromptTable",
    "PairBatch",
    "attributes",
    "build_dataset",
    "check_prompts",
    "dataloader",
    "dataset_folder",
    "format_report",
    "load_domain",
    "load_report",
    "make_examples",
    "prompt_universe",
]
