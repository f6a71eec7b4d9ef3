"""`hyperdas compare RUN_DIR...`: one table of runs' results: floor, DAS/MDAS per layer, HyperDAS per mode.

    hyperdas compare runs/smollm2-city runs/smollm2-city-mdas runs/smollm2-city-das

Each RUN_DIR is a folder with a metrics.json (a `hyperdas train` run, its eval/ folder, or a `hyperdas baseline`
folder); the table gives cause / isolate / disentangle per attribute and overall for every entry, in percent.
Runs compared should share their data (the same run config's data section and seed): each metrics.json's counts
are in the table, so a mismatch shows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders holding a metrics.json")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")


def run(args: argparse.Namespace) -> int:
    from hyperdas.report import comparison_table

    runs = {}
    for folder in map(Path, args.runs):
        path = folder / "metrics.json" if folder.is_dir() else folder
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} is not a hyperdas run or baseline folder")
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from err
        entries = metrics.values() if isinstance(metrics, dict) else ()
        if not entries or not all(isinstance(e, dict) and {"per_attribute", "overall"} <= e.keys() for e in entries):
            raise ValueError(
                f"{path} is not a metrics.json: each entry (floor, a mode, mdas@L...) needs per_attribute and "
                f"overall; its entries are {list(metrics)[:6] if isinstance(metrics, dict) else type(metrics).__name__}"
            )
        runs[str(folder)] = metrics
    table = comparison_table(runs)
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(table)
    return 0
