"""`hyperdas train [--config FILE] [key=value ...]`: train, evaluate, write the run folder.

With no arguments it is the main job on the embedded default (train/configs/smollm2_city.yaml).
`hyperdas train resume=DIR` continues DIR from its last checkpoint with the same data order.
"""

from __future__ import annotations

import argparse
import sys

from hyperdas.report import metrics_table
from hyperdas.train.config import DEFAULT_CONFIG, load_run_config


def keys_epilog() -> str:
    """The config keys and each RAVEL domain's attributes, for --help."""
    from hyperdas.data.ravel import DOMAINS, attributes
    from hyperdas.train.config import RESUMABLE, config_keys_help

    domains = "\n".join(f"  {d}: {', '.join(attributes(d))}" for d in DOMAINS)
    return (
        f"config keys (key: type = the main job's default; set in a --config YAML or as key=value):\n"
        f"{config_keys_help()}\n\n"
        f"RAVEL domains and their attributes (data.domain, data.attributes; [all] = every one with enough data):\n"
        f"{domains}\n\n"
        f"resume=DIR continues DIR with its own config; beside it only {', '.join(RESUMABLE[1:])} may be set."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = keys_epilog()
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: %(default)s)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, dotted for sections: model.intervention_layer=12 optim.editor_lr=1e-4 resume=DIR",
    )


def run(args: argparse.Namespace) -> int:
    from hyperdas.train.trainer import FINAL_MODEL, Trainer

    config = load_run_config(args.config, args.overrides)
    if config.deepspeed:
        # a DeepSpeed run on one process: the same entry point as torchrun / deepspeed use
        from hyperdas.train.launch import main as launch_main

        return launch_main(["--config", args.config, *args.overrides])
    trainer = Trainer(config)
    try:
        metrics = trainer.run()
    except KeyboardInterrupt as stop:
        if str(stop):  # interrupted while training: the trainer saved a checkpoint and says so
            print(f"hyperdas train: {stop}; continue with: hyperdas train resume={trainer.out_dir}", file=sys.stderr)
        else:
            model = trainer.out_dir / FINAL_MODEL
            print(
                f"hyperdas train: interrupted after training, during evaluation; the trained model is in {model}: "
                f"evaluate it with hyperdas eval --checkpoint {trainer.out_dir}",
                file=sys.stderr,
            )
        return 130
    print(metrics_table(metrics))
    print(f"\nrun folder: {trainer.out_dir} (report.md, metrics.json, model/, checkpoints/)")
    return 0
