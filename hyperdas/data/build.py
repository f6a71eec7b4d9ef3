"""Build (or reuse) a filtered RAVEL dataset for one target: ``build_dataset(DataRequest(...), target)``.

The dataset has two splits, "train" and "test" (split by template), each balanced over the requested
attributes and the two example kinds (causal, isolate): every (split, attribute, kind) gets an equal share
of the split's examples. Candidates are drawn in rounds sized by each kind's pass rate so far and filtered
by the target, until every kind has its share, its pool is exhausted, or it has used its candidate budget
(``max_candidates_per_example`` times its share). A kind's kept examples are its first passing candidates in
the sampler's seeded order, so the result does not depend on how the rounds were sized.

The result is saved under ``cache_root()/"data"/<key>`` (or another folder), where the key hashes the
request, the target's name and ``DATA_FORMAT_VERSION``; the same request again loads it from disk. The
folder holds the ``datasets.DatasetDict`` (``save_to_disk``), ``request.json`` and ``filter_report.json``
(kept / passed / total per split, attribute and kind). It is written to a temporary folder first and renamed
into place, so an interrupted build leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyperdas.cache import cache_root
from hyperdas.data.examples import (
    ATTRIBUTE_TYPES,
    FIELDS,
    SOURCE_KINDS,
    CandidateSampler,
    candidate_samplers,
    check_sources,
    isolate_attributes_for,
)
from hyperdas.data.filtering import FilterCount, filter_examples, format_report
from hyperdas.data.ravel import SPLITS, load_domain
from hyperdas.targets import EMBEDDED_DEFAULT

#: Bump when the examples, their fields or the filter change, so old cached datasets are not reused.
DATA_FORMAT_VERSION = 1
REPORT_FILE = "filter_report.json"
REQUEST_FILE = "request.json"
#: Assumed pass rate of a kind before any of its candidates was filtered.
_PRIOR_PASS_RATE = 0.5
#: Draw this much more than the pass rate says is needed, so most kinds finish in one more round.
_OVERDRAW = 1.1
_MIN_ROUND = 16


@dataclass(frozen=True)
class DataRequest:
    """What data to build. Defaults suit the embedded default target (SmolLM2-135M-Instruct) on a CPU.

    Measured with the defaults (``hyperdas data``): SmolLM2-135M passes 36-40% of the candidates that ask a
    city's continent and 16-22% of those that ask its country, so a kept example costs about 4.3 filtered
    candidates; a 2-core CPU filters about 30 candidates a second, so the default 800 examples take about
    two minutes there (seconds on a GPU).

    Attributes:
        domain: the RAVEL domain.
        attributes: the attributes A to make causal and isolate examples for. SmolLM2-135M knows a city's
            continent and country best of city's six attributes (Language about 14%, Timezone under 1%).
        isolate_attributes: the attributes isolate examples query; None: the other requested attributes
            (or every other attribute with values when only one is requested).
        target: the target model's name (``load_target``'s argument); part of the cache key.
        target_dtype: the dtype the target filters in ("float32", "bfloat16", ...): near-ties of the argmax
            can differ between dtypes, so a bf16 run never reuses data an fp32 target filtered.
        max_examples: kept examples over both splits together (an upper bound: a kind whose pool or
            candidate budget runs out keeps fewer).
        test_share: the share of ``max_examples`` that goes to the test split.
        seed: seeds every sampler; the same request gives the same data.
        sources: source contexts to draw from: "template" (the domain's templates), "wikipedia" or both.
        max_candidates_per_example: a kind filters at most this many candidates per example of its share;
            SmolLM2 needs about 6 where it asks a country (16% pass at worst), so 12 leaves room without
            running away on an attribute the model barely knows.
    """

    domain: str = "city"
    attributes: tuple[str, ...] = ("Country", "Continent")
    isolate_attributes: tuple[str, ...] | None = None
    target: str = EMBEDDED_DEFAULT
    target_dtype: str = "float32"
    max_examples: int = 800
    test_share: float = 0.2
    seed: int = 0
    sources: tuple[str, ...] = SOURCE_KINDS
    max_candidates_per_example: float = 12.0

    def validate(self) -> DataRequest:
        """The request itself, or a ValueError naming the bad value and what is allowed."""
        isolate_attributes_for(load_domain(self.domain), self.attributes, self.isolate_attributes)
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes repeat: {list(self.attributes)}")
        check_sources(self.sources)
        if self.target_dtype not in _DTYPES:
            raise ValueError(f"target_dtype {self.target_dtype!r}; allowed: {list(_DTYPES)}")
        if self.max_examples < 1:
            raise ValueError(f"max_examples must be at least 1, got {self.max_examples}")
        if not 0.0 <= self.test_share < 1.0:
            raise ValueError(f"test_share must be in [0, 1), got {self.test_share}")
        if self.max_candidates_per_example < 1.0:
            raise ValueError(f"max_candidates_per_example must be at least 1, got {self.max_candidates_per_example}")
        return self

    def key(self) -> str:
        """The cache key: a hash of the request (target name included) and ``DATA_FORMAT_VERSION``."""
        payload = json.dumps({"request": asdict(self), "format": DATA_FORMAT_VERSION}, sort_keys=True)
        return f"{self.domain}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"

    def shares(self) -> dict[tuple[str, str, str], int]:
        """Examples wanted per (split, attribute, attribute type); a split's remainder goes to its first kinds."""
        n_test = round(self.max_examples * self.test_share)
        totals = {"train": self.max_examples - n_test, "test": n_test}
        kinds = [(a, t) for a in self.attributes for t in ATTRIBUTE_TYPES]
        shares = {}
        for split in SPLITS:
            base, extra = divmod(totals[split], len(kinds))
            for i, (attribute, kind) in enumerate(kinds):
                shares[(split, attribute, kind)] = base + (i < extra)
        return shares


_DTYPES = ("float32", "bfloat16", "float16", "float64")


def dataset_folder(request: DataRequest, root: str | Path | None = None) -> Path:
    """Where ``request``'s dataset lives: ``root/<key>``, ``root`` defaulting to ``cache_root()/"data"``."""
    return (Path(root) if root is not None else cache_root() / "data") / request.key()


def load_report(folder: str | Path) -> dict[str, object]:
    """The filter report saved beside a built dataset."""
    return json.loads((Path(folder) / REPORT_FILE).read_text())


@dataclass
class _Kind:
    """One (split, attribute, attribute type) being filled."""

    sampler: CandidateSampler
    share: int
    budget: int
    count: FilterCount
    kept: list[dict[str, str]] = field(default_factory=list)

    def round_size(self) -> int:
        need = self.share - len(self.kept)
        if need <= 0 or self.sampler.exhausted or self.count.total >= self.budget:
            return 0
        rate = (self.count.passed + 1) / (self.count.total + 2) if self.count.total else _PRIOR_PASS_RATE
        return min(max(math.ceil(need / rate * _OVERDRAW), _MIN_ROUND), self.budget - self.count.total)

    def add(self, candidates: list[dict[str, str]], passed: list[bool]) -> None:
        """Count filtered candidates; keep the passing ones, in order, until the share is full."""
        for example, ok in zip(candidates, passed, strict=True):
            self.count.total += 1
            self.count.passed += ok
            if ok and len(self.kept) < self.share:
                self.kept.append(example)
        self.count.kept = len(self.kept)


def _filter_to_shares(
    request: DataRequest, target, batch_size: int, progress: bool
) -> dict[tuple[str, str, str], _Kind]:
    kinds: dict[tuple[str, str, str], _Kind] = {}
    shares = request.shares()
    for split in SPLITS:
        samplers = candidate_samplers(
            request.domain, request.attributes, split, request.seed, request.isolate_attributes, request.sources
        )
        for (attribute, kind), sampler in samplers.items():
            key = (split, attribute, kind)
            kinds[key] = _Kind(
                sampler, shares[key], math.ceil(shares[key] * request.max_candidates_per_example), FilterCount(*key)
            )
    bar = tqdm(total=0, unit="ex", desc=f"filtering {request.domain} for {request.target}", disable=not progress)
    while True:
        plan = {key: kind.sampler.take(n) for key, kind in kinds.items() if (n := kind.round_size()) > 0}
        candidates = [c for batch in plan.values() for c in batch]
        if not candidates:
            break
        bar.total += len(candidates)
        bar.refresh()
        passed = iter(filter_examples(target, candidates, batch_size=batch_size, progress=bar))
        for key, batch in plan.items():
            kinds[key].add(batch, [next(passed) for _ in batch])
    bar.close()
    return kinds


def build_dataset(
    request: DataRequest | None = None,
    target=None,
    *,
    root: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
):
    """The filtered dataset for ``request``, built once and then loaded from disk.

    Args:
        request: what to build (default: ``DataRequest()``).
        target: the ``FrozenTarget`` to filter with; None loads ``request.target`` (on ``device``), and only
            when the dataset is not built yet. Its name must be ``request.target``.
        root: the folder that holds built datasets (default: ``cache_root()/"data"``).
        device: where to load the target when ``target`` is None.
        batch_size: examples per filtering forward pass.
        progress: show a progress bar while filtering.

    Returns:
        ``datasets.DatasetDict`` with splits "train" and "test"; its folder is ``dataset_folder(request, root)``
        and its filter report ``load_report(that folder)``.

    Raises:
        ValueError: a bad request, a target that is not ``request.target``, or a split with no example left
            after filtering (the message names the request and the counts).
    """
    from datasets import Dataset, DatasetDict, Features, Value, load_from_disk

    request = (request or DataRequest()).validate()
    folder = dataset_folder(request, root)
    if (folder / "dataset_dict.json").is_file():
        return load_from_disk(str(folder))
    if target is None:
        from hyperdas.targets import load_target

        target = load_target(request.target, dtype=getattr(torch, request.target_dtype), device=device)
    if target.name != request.target:
        raise ValueError(f"the target is {target.name!r} but the request names {request.target!r}")
    if target.dtype != getattr(torch, request.target_dtype):
        raise ValueError(f"the target runs in {target.dtype} but the request names {request.target_dtype!r}")

    start = time.perf_counter()
    kinds = _filter_to_shares(request, target, batch_size, progress)
    rows = [asdict(kind.count) | {"share": kind.share, "exhausted": kind.sampler.exhausted} for kind in kinds.values()]
    for split in SPLITS:
        wanted = sum(kind.share for (s, _, _), kind in kinds.items() if s == split)
        if wanted and not any(kind.kept for (s, _, _), kind in kinds.items() if s == split):
            raise ValueError(
                f"no {split} example of {request} survives filtering with target {target.name!r}; "
                f"kept / total per split, attribute and type:\n{format_report(rows)}"
            )
    features = Features({name: Value("string") for name in FIELDS})
    data = DatasetDict(
        {
            split: Dataset.from_list(
                [e for (s, _, _), kind in kinds.items() if s == split for e in kind.kept], features=features
            )
            for split in SPLITS
        }
    )
    report = {
        "request": asdict(request),
        "key": request.key(),
        "target": target.name,
        "format": DATA_FORMAT_VERSION,
        "seconds": round(time.perf_counter() - start, 2),
        "rows": rows,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    data.save_to_disk(str(partial))
    (partial / REQUEST_FILE).write_text(json.dumps(asdict(request), indent=2))
    (partial / REPORT_FILE).write_text(json.dumps(report, indent=2))
    try:
        partial.rename(folder)
    except OSError:  # another process finished the same build first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
    return load_from_disk(str(folder))
