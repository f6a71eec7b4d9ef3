"""Build (or reuse) a RAVEL dataset of known prompts for one target: ``build_dataset(DataRequest(...), target)``.

1. The prompt universe of the requested attributes (``hyperdas.data.known.prompt_universe``) is checked with the
   target, once per prompt; the known-prompt table is cached per (target, fingerprint, dtype, domain), so only
   prompts it has not seen cost a forward pass.
2. Pairs are drawn from known prompts only (``hyperdas.data.examples.PairSampler``): two splits, "train" and
   "test" (split by template), each balanced over the attributes and the two kinds (causal, isolate), every
   (split, attribute, kind) getting an equal share. A kind whose pool runs out keeps fewer (the report says so).
3. Attributes asked for as "all" that leave too little data are dropped with a notice: an attribute whose
   causal pairs cannot fill half its share in a split (a 135M target never produces verb Definitions whole).

The dataset is saved under ``cache_root()/"data"/<key>`` (or exactly at ``out``), the key hashing the request,
``DATA_FORMAT_VERSION`` and ``KNOWN_FORMAT_VERSION``. The folder holds the ``datasets.DatasetDict``
(``save_to_disk``), ``request.json`` and ``filter_report.json`` (known prompts per attribute and split; kept
examples, pool sizes and label ties per split, attribute and kind; dropped attributes). It is written to a
temporary folder first and renamed into place, so an interrupted build leaves nothing half-written behind. A
saved dataset made with another target
fingerprint than the given target's is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

from hyperdas.cache import cache_root
from hyperdas.data import known as known_prompts
from hyperdas.data.collate import label_token_ids
from hyperdas.data.examples import (
    ATTRIBUTE_TYPES,
    FIELDS,
    SOURCE_KINDS,
    PairSampler,
    check_sources,
    fill,
    isolate_attributes_for,
)
from hyperdas.data.known import KnownPromptTable, Prompt, ensure_known, prompt_universe
from hyperdas.data.ravel import SPLITS, RavelDomain, load_domain
from hyperdas.metrics import FIRST_LABEL_TOKENS
from hyperdas.targets import EMBEDDED_DEFAULT

#: Bump when the examples, their fields or the filter change, so old cached datasets are not reused.
DATA_FORMAT_VERSION = 2
REPORT_FILE = "filter_report.json"
REQUEST_FILE = "request.json"
DATASET_FILE = "dataset_dict.json"
#: "all" requests keep an attribute only if its causal pool fills at least this share of its split's share.
MIN_POOL_SHARE = 0.5
ALL = "all"
_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class DataRequest:
    """What data to build. The defaults are the main job's (train/configs/smollm2_city.yaml), attributes aside.

    Attributes:
        domain: the RAVEL domain.
        attributes: the attributes A to make causal and isolate examples for; ``("all",)`` (or None) means every
            attribute of the domain with values, less those that leave too little data (``MIN_POOL_SHARE``).
        isolate_attributes: the attributes isolate examples query; None: the other requested attributes
            (or every other attribute with values when only one is requested).
        target: the target model's name (``load_target``'s argument); part of the cache key.
        target_dtype: the dtype the target checks prompts in: argmax near-ties differ between dtypes, so a bf16
            run never reuses data an fp32 target filtered.
        max_examples: examples over both splits together (an upper bound: a kind whose pool runs out keeps fewer).
        test_share: the share of ``max_examples`` that goes to the test split.
        seed: seeds the pairing; the same request gives the same data.
        sources: source contexts to draw from: "template" (the domain's templates), "wikipedia" or both.
        entities_per_template: the prompt universe's size: entities checked per template. More gives more
            distinct pairs and costs one forward pass per extra prompt, once per target.
    """

    domain: str = "city"
    attributes: tuple[str, ...] | None = (ALL,)
    isolate_attributes: tuple[str, ...] | None = None
    target: str = EMBEDDED_DEFAULT
    target_dtype: str = "bfloat16"
    max_examples: int = 1440
    test_share: float = 0.2
    seed: int = 0
    sources: tuple[str, ...] = SOURCE_KINDS
    entities_per_template: int = 24

    @property
    def asks_for_all(self) -> bool:
        return self.attributes is None or tuple(self.attributes) == (ALL,)

    def requested_attributes(self) -> tuple[str, ...]:
        """The attributes named, with "all" expanded to every attribute of the domain that has values."""
        if self.asks_for_all:
            return load_domain(self.domain).attributes_with_values
        return tuple(self.attributes)

    def validate(self) -> DataRequest:
        """The request itself, or a ValueError naming the bad value and what is allowed."""
        domain = load_domain(self.domain)
        attributes = self.requested_attributes()
        if not attributes:
            allowed = list(domain.attributes_with_values)
            raise ValueError(f"attributes is empty; allowed: {ALL!r} or names from {allowed}")
        if ALL in attributes:
            raise ValueError(f"{ALL!r} stands alone; got attributes {list(self.attributes)}")
        if len(set(attributes)) != len(attributes):
            raise ValueError(f"attributes repeat: {list(attributes)}")
        isolate_attributes_for(domain, attributes, self.isolate_attributes)
        check_sources(self.sources)
        if self.target_dtype not in _DTYPES:
            raise ValueError(f"target_dtype {self.target_dtype!r}; allowed: {list(_DTYPES)}")
        for name in ("max_examples", "entities_per_template", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_examples < 1:
            raise ValueError(f"max_examples must be at least 1, got {self.max_examples}")
        if self.entities_per_template < 1:
            raise ValueError(f"entities_per_template must be at least 1, got {self.entities_per_template}")
        if not 0.0 <= self.test_share < 1.0:
            raise ValueError(f"test_share must be in [0, 1), got {self.test_share}")
        return self

    def key(self) -> str:
        """The cache key: a hash of the request (target name included), ``DATA_FORMAT_VERSION`` and the known-prompt
        table's format (a dataset drawn from an older table's verdicts is not reused)."""
        versions = {"format": DATA_FORMAT_VERSION, "known_format": known_prompts.KNOWN_FORMAT_VERSION}
        payload = json.dumps({"request": asdict(self), **versions}, sort_keys=True)
        return f"{self.domain}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def shares(max_examples: int, test_share: float, attributes: tuple[str, ...]) -> dict[tuple[str, str, str], int]:
    """Examples wanted per (split, attribute, attribute type); a split's remainder goes to its first kinds."""
    n_test = round(max_examples * test_share)
    totals = {"train": max_examples - n_test, "test": n_test}
    kinds = [(a, t) for a in attributes for t in ATTRIBUTE_TYPES]
    out = {}
    for split in SPLITS:
        base, extra = divmod(totals[split], len(kinds))
        for i, (attribute, kind) in enumerate(kinds):
            out[(split, attribute, kind)] = base + (i < extra)
    return out


def dataset_folder(request: DataRequest, root: str | Path | None = None) -> Path:
    """Where ``request``'s dataset lives in the cache: ``root/<key>`` (``root`` default: ``cache_root()/"data"``)."""
    return (Path(root) if root is not None else cache_root() / "data") / request.key()


def load_report(folder: str | Path) -> dict[str, object]:
    """The filter report saved beside a built dataset."""
    path = Path(folder) / REPORT_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged ({err}); delete {Path(folder)} and it is rebuilt") from err


class LabelTies:
    """Whether two values of a queried attribute share their first label tokens under a base prompt.

    The metric compares the first ``FIRST_LABEL_TOKENS`` label tokens; if the source's value starts with the
    same tokens as the base's (the unpatched answer), a causal pair would count as caused with no effect.
    """

    def __init__(self, tokenizer, domain: RavelDomain, attribute: str):
        self.tokenizer, self.domain, self.attribute = tokenizer, domain, attribute
        self._tokens = cache(self._label_tokens)

    def _label_tokens(self, template: str, entity: str, value: str) -> tuple[int, ...]:
        prompt = "".join(fill(template, entity))
        return tuple(label_token_ids(self.tokenizer, [prompt], [value])[0])

    def __call__(self, template: str, base: str, source: str) -> bool:
        base_value = self.domain.value(base, self.attribute)
        answer = self._tokens(template, base, base_value)
        label = self._tokens(template, base, self.domain.value(source, self.attribute))
        n = min(FIRST_LABEL_TOKENS, len(label))
        return label[: min(n, len(answer))] == answer[: min(n, len(answer))]


def known_entities(prompts: list[Prompt], table: KnownPromptTable) -> dict[tuple[str, str], list[str]]:
    """(attribute, template) -> the entities of the universe the target knows that prompt for, in order."""
    out: dict[tuple[str, str], list[str]] = {}
    for prompt in prompts:
        entities = out.setdefault((prompt.attribute, prompt.template), [])
        if table.known(prompt):
            entities.append(prompt.entity)
    return out


def causal_capacity(domain: RavelDomain, attribute: str, split: str, known, tie) -> int:
    """How many distinct causal pairs (base prompt, source entity) the known prompts of ``split`` allow."""
    total = 0
    for template in domain.templates(attribute, split):
        entities = known.get((attribute, template), [])
        for base in entities:
            value = domain.value(base, attribute)
            total += sum(domain.value(e, attribute) != value and not tie(template, base, e) for e in entities)
    return total


def known_prompt_rows(domain: RavelDomain, prompts: list[Prompt], table: KnownPromptTable) -> list[dict]:
    """Known / checked prompts per (attribute, split)."""
    counts: dict[tuple[str, str], list[int]] = {}
    for prompt in prompts:
        entry = counts.setdefault((prompt.attribute, domain.template_split[prompt.template]), [0, 0])
        entry[0] += table.known(prompt)
        entry[1] += 1
    return [{"attribute": a, "split": s, "known": k, "checked": n} for (a, s), (k, n) in counts.items()]


def format_report(report: dict) -> str:
    """The plain-text summary of a filter report: known prompts, then kept examples per split, attribute, kind."""
    lines = ["known prompts (the target answers the value; every label token the argmax):"]
    for row in report["known_prompts"]:
        rate = f"{row['known'] / row['checked']:.1%}" if row["checked"] else "-"
        counts = f"{row['known']:5d} / {row['checked']:5d}"
        lines.append(f"  {row['split']:5s}  {row['attribute']:18s}  {counts}  {rate:>6s}")
    lines.append("examples (kept / share; causal pool = distinct pairs the known prompts allow):")
    for row in report["rows"]:
        pool = f"pool {row['pool']}" if row["pool"] is not None else "pool -"
        ties = f", {row['ties']} label ties left out" if row["ties"] else ""
        lines.append(
            f"  {row['split']:5s}  {row['attribute']:18s}  {row['attribute_type']:7s}  {row['kept']:5d} / "
            f"{row['share']:5d}  ({pool}, {row['base_prompts']} known base prompts{ties})"
        )
    for dropped in report.get("dropped", []):
        lines.append(f"  dropped {dropped['attribute']}: {dropped['reason']}")
    return "\n".join(lines)


def _choose_attributes(request: DataRequest, domain: RavelDomain, known, tokenizer) -> tuple[tuple[str, ...], list]:
    """The attributes the dataset is made for, and the dropped ones with why (``MIN_POOL_SHARE``)."""
    requested = request.requested_attributes()
    dropped = []
    if request.asks_for_all:
        wanted = shares(request.max_examples, request.test_share, requested)
        kept = []
        for attribute in requested:
            tie = LabelTies(tokenizer, domain, attribute)
            pools = {split: causal_capacity(domain, attribute, split, known, tie) for split in SPLITS}
            short = [s for s in SPLITS if pools[s] < MIN_POOL_SHARE * wanted[(s, attribute, "causal")]]
            if short:
                dropped.append(
                    {
                        "attribute": attribute,
                        "reason": f"too little data: causal pairs possible {pools} (train / test) against a share of "
                        f"{wanted[('train', attribute, 'causal')]} / {wanted[('test', attribute, 'causal')]}",
                    }
                )
            else:
                kept.append(attribute)
        requested = tuple(kept)
        if not requested:
            raise ValueError(
                f"no attribute of RAVEL domain {request.domain!r} leaves enough known prompts with target "
                f"{request.target!r}: " + "; ".join(f"{d['attribute']}: {d['reason']}" for d in dropped)
            )
    return requested, dropped


def build_dataset(
    request: DataRequest | None = None,
    target=None,
    *,
    root: str | Path | None = None,
    out: str | Path | None = None,
    known_root: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
):
    """The dataset for ``request``, built once and then loaded from disk.

    Args:
        request: what to build (default: ``DataRequest()``).
        target: the ``FrozenTarget`` to check prompts with; None loads ``request.target`` (on ``device``), and
            only when the dataset is not built yet. Its name must be ``request.target``.
        root: the folder that holds cached datasets by key (default: ``cache_root()/"data"``).
        out: build into exactly this folder instead (``datasets.load_from_disk(out)`` then loads it).
        known_root: the folder of known-prompt tables (default: ``cache_root()/"known"``).
        device: where to load the target when ``target`` is None.
        batch_size: prompts per checking forward pass.
        progress: show a progress bar while checking prompts.

    Returns:
        ``datasets.DatasetDict`` with splits "train" and "test"; its report is ``load_report(folder)``.

    Raises:
        ValueError: a bad request, a target that is not ``request.target``, an ``out`` folder holding another
            request's data, or a split with no example (the message names the request and the counts).
    """
    from datasets import Dataset, DatasetDict, Features, Value

    request = (request or DataRequest()).validate()
    folder = Path(out) if out is not None else dataset_folder(request, root)
    _check_out_folder(folder, request)
    if target is not None:
        _check_target(target, request)
    if (folder / DATASET_FILE).is_file():
        saved = load_report(folder).get("fingerprint") if (folder / REPORT_FILE).is_file() else None
        if target is None or saved is None or saved == target.fingerprint:  # no report: a dataset put there by hand
            return _load(folder)
        print(f"hyperdas data: {folder} was built with another target of this name; rebuilding it")
    if target is None:
        from hyperdas.targets import load_target

        target = load_target(request.target, dtype=getattr(torch, request.target_dtype), device=device)
        _check_target(target, request)

    start = time.perf_counter()
    domain = load_domain(request.domain)
    isolate = isolate_attributes_for(domain, request.requested_attributes(), request.isolate_attributes)
    queried = sorted(set(request.requested_attributes()) | {b for bs in isolate.values() for b in bs})
    universe = prompt_universe(domain, queried, request.entities_per_template)
    fingerprint = target.fingerprint
    table = KnownPromptTable(target.name, fingerprint, request.target_dtype, request.domain, known_root)
    checked = ensure_known(target, domain, universe, table, batch_size=batch_size, progress=progress)
    known = known_entities(universe, table)
    attributes, dropped = _choose_attributes(request, domain, known, target.tokenizer)
    for entry in dropped:
        print(f"hyperdas data: dropped {entry['attribute']} ({entry['reason']})")
    isolate = isolate_attributes_for(domain, attributes, request.isolate_attributes)
    wanted = shares(request.max_examples, request.test_share, attributes)

    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    rows = []
    for split in SPLITS:
        for attribute in attributes:
            tie = LabelTies(target.tokenizer, domain, attribute)
            for kind in ATTRIBUTE_TYPES:
                sampler = PairSampler(
                    domain, split, attribute, kind, known, isolate[attribute], request.sources, request.seed, tie
                )
                share = wanted[(split, attribute, kind)]
                taken = sampler.take(share)
                splits[split].extend(taken)
                rows.append(
                    {
                        "split": split,
                        "attribute": attribute,
                        "attribute_type": kind,
                        "share": share,
                        "kept": len(taken),
                        "base_prompts": sampler.base_prompts,
                        "ties": sampler.ties,
                        "pool": causal_capacity(domain, attribute, split, known, tie) if kind == "causal" else None,
                        "exhausted": len(taken) < share,
                    }
                )
    report = {
        "request": asdict(request),
        "key": request.key(),
        "target": target.name,
        "fingerprint": fingerprint,
        "format": DATA_FORMAT_VERSION,
        "attributes": list(attributes),
        "isolate_attributes": {a: list(b) for a, b in isolate.items()},
        "dropped": dropped,
        "prompts_checked_now": checked,
        "seconds": round(time.perf_counter() - start, 2),
        "known_prompts": known_prompt_rows(domain, universe, table),
        "rows": rows,
    }
    for split, examples in splits.items():
        if not examples and any(wanted[(s, a, k)] for (s, a, k) in wanted if s == split):
            raise ValueError(
                f"no {split} example of {request} can be made from the prompts target {target.name!r} knows:\n"
                f"{format_report(report)}"
            )
    features = Features({name: Value("string") for name in FIELDS})
    data = DatasetDict({split: Dataset.from_list(splits[split], features=features) for split in SPLITS})
    _save(data, request, report, folder)
    return _load(folder)


def _check_target(target, request: DataRequest) -> None:
    if target.name != request.target:
        raise ValueError(f"the target is {target.name!r} but the request names {request.target!r}")
    if target.dtype != getattr(torch, request.target_dtype):
        raise ValueError(f"the target runs in {target.dtype} but the request names {request.target_dtype!r}")


def _check_out_folder(folder: Path, request: DataRequest) -> None:
    """Refuse an ``out`` that is a file, or a folder holding something other than this request's dataset."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {folder} is a file; give a folder (it is created if missing)")
    saved = folder / REQUEST_FILE
    if saved.is_file():
        try:
            same = json.loads(saved.read_text()) == json.loads(json.dumps(asdict(request)))
        except json.JSONDecodeError:
            same = False
        if not same:
            raise ValueError(f"{folder} holds the dataset of another request ({saved}); choose another folder")
    elif folder.is_dir() and not (folder / DATASET_FILE).is_file() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty and holds no hyperdas dataset; choose an empty or new folder")


def _save(data, request: DataRequest, report: dict, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(folder.parent, os.W_OK):
        raise ValueError(f"cannot write the dataset: {folder.parent} is not writable")
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    data.save_to_disk(str(partial))
    (partial / REQUEST_FILE).write_text(json.dumps(asdict(request), indent=2))
    (partial / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    try:
        partial.rename(folder)
    except OSError:  # another process finished the same build first: use its copy
        shutil.rmtree(partial, ignore_errors=True)


def _load(folder: Path):
    from datasets import load_from_disk

    try:
        return load_from_disk(str(folder))
    except Exception as err:  # datasets raises several types for damaged arrow/json files
        raise ValueError(
            f"the dataset in {folder} cannot be read ({type(err).__name__}: {err}); delete {folder} and it is rebuilt"
        ) from err
