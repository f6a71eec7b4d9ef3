"""`hyperdas train [--config FILE] [key=value ...]`: train, evaluate, write the run folder.

With no arguments it is the main job on the embedded default (train/configs/smollm2_city.yaml).
`hyperdas train resume=DIR` continues DIR from its last checkpoint with the same data order.
"""

from __future__ import annotations

import argparse

from hyperdas.report import metrics_table
from hyperdas.train.config import DEFAULT_CONFIG, load_run_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: %(default)s)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="config overrides, dotted for sections: model.intervention_layer=12 optim.editor_lr=1e-4 resume=DIR",
    )


def run(args: argparse.Namespace) -> int:
    from hyperdas.train.trainer import Trainer, deepspeed_json_of

    config = load_run_config(args.config, args.overrides)
    if deepspeed_json_of(config):
        # a DeepSpeed run on one process: the same entry point as torchrun / deepspeed use
        from hyperdas.train.launch import main as launch_main

        return launch_main(["--config", args.config, *args.overrides])
    trainer = Trainer(config)
    try:
        metrics = trainer.run()
    except KeyboardInterrupt as stop:
        print(f"hyperdas train: {stop}; continue with: hyperdas train resume={trainer.out_dir}")
        return 130
    print(metrics_table(metrics))
    print(f"\nrun folder: {trainer.out_dir} (report.md, metrics.json, model/, checkpoints/)")
    return 0
