"""The `hyperdas` command line: `hyperdas data`, `train`, `eval`, `baseline` and `compare`.

Each subcommand lives in its own module with two functions, ``add_arguments(parser)`` and ``run(args)``;
this file only wires them up, importing each lazily so `hyperdas --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module under hyperdas.train, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": ("hyperdas.train.data_command", "build (or reuse) filtered RAVEL counterfactual data for a target"),
    "train": ("hyperdas.train.train_command", "train HyperDAS (no arguments: the main job on the embedded default)"),
    "eval": ("hyperdas.train.eval_command", "evaluate a checkpoint in every inference mode"),
    "baseline": ("hyperdas.train.baseline_command", "train and evaluate RAVEL's DAS or MDAS on a run's data"),
    "compare": ("hyperdas.train.compare_command", "one table of runs' results (floor, baselines, HyperDAS)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperdas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        command = importlib.import_module(module)
        command.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"hyperdas {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
