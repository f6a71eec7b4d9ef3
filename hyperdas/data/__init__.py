"""RAVEL counterfactual data: examples, per-model filtering, caching and collation.

- ``ravel``: the shipped RAVEL files (``load_domain``, ``DOMAINS``).
- ``examples``: causal and isolate examples, split by template (``make_examples``, ``CandidateSampler``).
- ``filtering``: keep what the target knows (``filter_examples``) and report kept / total.
- ``build``: ``build_dataset(DataRequest(...), target)``, balanced, filtered and cached on disk.
- ``collate``: ``Collator``, the batch contract of one HyperDAS step.
"""

from hyperdas.data.build import DataRequest, build_dataset, dataset_folder, load_report
from hyperdas.data.collate import Collator, dataloader
from hyperdas.data.examples import make_examples
from hyperdas.data.filtering import filter_examples, format_report
from hyperdas.data.ravel import DOMAINS, attributes, load_domain

__all__ = [
    "DOMAINS",
    "Collator",
    "DataRequest",
    "attributes",
    "build_dataset",
    "dataloader",
    "dataset_folder",
    "filter_examples",
    "format_report",
    "load_domain",
    "load_report",
    "make_examples",
]
