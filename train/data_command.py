"""`hyperdas data`: build (or reuse) a RAVEL dataset of prompts the target knows, and say how much it has.

    hyperdas data                                  # the main job's data (train/configs/smollm2_city.yaml)
    hyperdas data --domain verb                    # every verb attribute with enough known prompts
    hyperdas data --domain city --attributes Country,Continent --max-examples 400 --out data/city
    hyperdas data --domain nobel_prize_winner --target meta-llama/Meta-Llama-3-8B --device cuda

Without options it builds exactly the dataset `hyperdas train` builds for the main job (one set of defaults,
one cache key). Another ``--domain`` without ``--attributes`` means all of that domain's attributes. The
data lands in the cache (``$HYPERDAS_CACHE/data/<key>``), or exactly in ``--out DIR`` (then
``datasets.load_from_disk(DIR)`` loads it); the known-prompt and example counts are printed at the end.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from hyperdas.data.build import ALL, DATASET_FILE, DataRequest, build_dataset, dataset_folder, format_report
from hyperdas.data.build import load_report as read_report
from hyperdas.data.ravel import DOMAINS


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError(f"empty attribute list {text!r}: give names separated by commas, or {ALL!r}")
    return names


def main_job_request() -> DataRequest:
    """The data request of the main job's run config (the defaults of this command)."""
    from hyperdas.train.config import load_run_config

    return load_run_config().data_request()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hyperdas data`; every one has a default: the main job's."""
    parser.add_argument("--domain", default=None, help=f"RAVEL domain: {', '.join(DOMAINS)} (default: the main job's)")
    parser.add_argument(
        "--attributes",
        default=None,
        help=f"comma-separated attributes to make causal and isolate examples for, or {ALL!r} (default: the main "
        "job's for its domain, all for another domain)",
    )
    parser.add_argument(
        "--isolate-attributes",
        default=None,
        help="comma-separated attributes isolate examples query (default: the other requested attributes, or "
        "every other attribute of the domain when only one is requested)",
    )
    parser.add_argument("--target", default=None, help="target model: shorthand, folder or hub name")
    parser.add_argument(
        "--dtype", default=None, help="dtype the target checks prompts in, or auto (default: the main job's)"
    )
    parser.add_argument("--out", default=None, help="the folder to build the dataset in (default: the cache)")
    parser.add_argument("--max-examples", type=int, default=None, help="examples over both splits")
    parser.add_argument("--test-share", type=float, default=None, help="share of them in the test split")
    parser.add_argument("--entities-per-template", type=int, default=None, help="prompt universe size per template")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--sources", default=None, help="source contexts: template, wikipedia or both")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per checking forward pass")
    parser.add_argument("--device", default=None, help="where to run the target (default: cuda if present)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def request_from_args(args: argparse.Namespace) -> DataRequest:
    """The validated ``DataRequest`` the options describe on top of the main job's (a ValueError names a bad value)."""
    from hyperdas.train.config import resolve_run_dtype

    base = main_job_request()
    changes: dict = {}
    if args.domain is not None and args.domain != base.domain:
        changes.update(domain=args.domain, attributes=(ALL,), isolate_attributes=None)
    if args.attributes is not None:
        changes["attributes"] = _names(args.attributes)
        changes.setdefault("isolate_attributes", None)
    if args.isolate_attributes is not None:
        changes["isolate_attributes"] = _names(args.isolate_attributes)
    simple = {
        "target": args.target,
        "target_dtype": resolve_run_dtype(args.dtype) if args.dtype is not None else None,
        "max_examples": args.max_examples,
        "test_share": args.test_share,
        "seed": args.seed,
        "entities_per_template": args.entities_per_template,
    }
    changes.update({k: v for k, v in simple.items() if v is not None})
    if args.sources is not None:
        changes["sources"] = _names(args.sources)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    return replace(base, **changes).validate()


def run(args: argparse.Namespace) -> int:
    """Build or load the data, then print the known-prompt and example counts, the split sizes and the folder."""
    import torch

    from hyperdas.targets import run_device

    request = request_from_args(args)
    folder = dataset_folder(request) if args.out is None else Path(args.out)
    reused = (folder / DATASET_FILE).is_file()
    device = args.device or run_device().type
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}; allowed: cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} but this machine has no CUDA device; use --device cpu")
    start = time.perf_counter()
    try:
        dataset = build_dataset(
            request, out=args.out, device=device, batch_size=args.batch_size, progress=not args.quiet
        )
    except KeyboardInterrupt:
        print("hyperdas data: interrupted; nothing half-written is left, and checked prompts are kept for next time")
        return 130
    seconds = time.perf_counter() - start
    report = read_report(folder)
    print(format_report(report))
    sizes = ", ".join(f"{split} {len(dataset[split])}" for split in dataset)
    how = "reused" if reused else f"built in {report['seconds']:.1f} s"
    print(f"examples: {sizes} ({how}; {seconds:.1f} s in all); attributes: {', '.join(report['attributes'])}")
    print(f"data: {folder}")
    return 0
