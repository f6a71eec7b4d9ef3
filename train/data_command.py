"""`hyperdas data`: build (or reuse) filtered RAVEL counterfactual data for a target, and say how much survived.

    hyperdas data                                  # city, Country + Continent, the embedded default target
    hyperdas data --attributes Continent --max-examples 400
    hyperdas data --domain verb --attributes "Past Tense,Singular" --target meta-llama/Meta-Llama-3-8B

The data lands in the cache (``$HYPERDAS_CACHE/data/<key>``, or ``--out DIR/<key>``), keyed by the request
and the target, so a second identical call only loads it; the kept / passed / total table is read from the
``filter_report.json`` saved beside it.
"""

from __future__ import annotations

import argparse
import time

from hyperdas.data.build import DataRequest, build_dataset, dataset_folder, load_report
from hyperdas.data.filtering import format_report
from hyperdas.data.ravel import DOMAINS


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `hyperdas data`; every one has a default, so no argument is needed."""
    default = DataRequest()
    parser.add_argument("--domain", default=default.domain, help=f"RAVEL domain: {', '.join(DOMAINS)}")
    parser.add_argument(
        "--attributes",
        default=",".join(default.attributes),
        help="comma-separated attributes to make causal and isolate examples for (default: %(default)s)",
    )
    parser.add_argument(
        "--isolate-attributes",
        default=None,
        help="comma-separated attributes isolate examples query (default: the other requested attributes, or "
        "every other attribute of the domain when only one is requested)",
    )
    parser.add_argument("--target", default=default.target, help="target model: shorthand, folder or hub name")
    parser.add_argument(
        "--dtype", default=default.target_dtype, help="dtype the target filters in: float32 (default) or bfloat16"
    )
    parser.add_argument("--out", default=None, help="folder that holds built datasets (default: the cache)")
    parser.add_argument(
        "--max-examples",
        type=int,
        default=default.max_examples,
        help="kept examples over both splits (default: %(default)s)",
    )
    parser.add_argument("--test-share", type=float, default=default.test_share, help="share of them in the test split")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument(
        "--sources",
        default=",".join(default.sources),
        help="source contexts: template, wikipedia or both (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="examples per filtering forward pass")
    parser.add_argument("--device", default=None, help="where to run the target (default: cuda if present)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def request_from_args(args: argparse.Namespace) -> DataRequest:
    """The validated ``DataRequest`` the options describe (a ValueError names a bad value)."""
    isolate = _names(args.isolate_attributes) if args.isolate_attributes else None
    return DataRequest(
        domain=args.domain,
        attributes=_names(args.attributes),
        isolate_attributes=isolate,
        target=args.target,
        target_dtype=args.dtype,
        max_examples=args.max_examples,
        test_share=args.test_share,
        seed=args.seed,
        sources=_names(args.sources),
    ).validate()


def run(args: argparse.Namespace) -> int:
    """Build or load the data, then print the filter table, the split sizes and where the data is."""
    import torch

    request = request_from_args(args)
    folder = dataset_folder(request, args.out)
    reused = (folder / "dataset_dict.json").is_file()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    dataset = build_dataset(request, root=args.out, device=device, batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    report = load_report(folder)
    print(format_report(report["rows"]))
    sizes = ", ".join(f"{split} {len(dataset[split])}" for split in dataset)
    how = "reused" if reused else f"built in {report['seconds']:.1f} s of filtering"
    print(f"examples: {sizes} ({how}; {seconds:.1f} s in all)")
    print(f"data: {folder}")
    return 0
