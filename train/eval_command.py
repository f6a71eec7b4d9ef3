"""`hyperdas eval --checkpoint DIR [--modes soft,column_argmax,...]`: evaluate a trained HyperDAS.

DIR is a run folder (written by `hyperdas train` or train/launch.py) or a model folder in the
``HyperDAS.save_pretrained`` format. Results go to DIR/eval/ unless --out says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperdas.config import SELECTION_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder or model folder")
    parser.add_argument("--modes", default=",".join(SELECTION_MODES), help="comma-separated (default: all)")
    parser.add_argument("--target", default=None, help="evaluate on another target (must match the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per forward")
    parser.add_argument("--max-examples", type=int, default=None, help="first N test examples only")
    parser.add_argument("--out", default=None, help="results folder (default: CHECKPOINT/eval)")


def run(args: argparse.Namespace) -> int:

    from hyperdas.config import HyperDASConfig
    from hyperdas.model import HyperDAS, load_configured_target
    from hyperdas.report import metrics_table
    from hyperdas.train.config import RunConfig, load_run_config
    from hyperdas.train.data_source import load_run_data
    from hyperdas.train.engine import PlainEngine
    from hyperdas.train.evaluate import evaluate, write_evaluation
    from hyperdas.train.trainer import FINAL_MODEL, RUN_CONFIG_FILE, PlainSetup

    folder = Path(args.checkpoint)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in SELECTION_MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; allowed: {list(SELECTION_MODES)}")
    if (folder / RUN_CONFIG_FILE).is_file():
        config = load_run_config(folder / RUN_CONFIG_FILE)
        model_dir = folder / FINAL_MODEL
    else:
        config = RunConfig(model=HyperDASConfig.load(folder))
        model_dir = folder
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} not found: the run in {folder} has not exported a model yet")
    config.model = HyperDASConfig.load(model_dir)
    if args.target:
        config.model.target = args.target
    target = load_configured_target(config.model)
    model = HyperDAS.from_pretrained(model_dir, target=target)
    engine = PlainEngine(model, config)
    data = load_run_data(config, target, PlainSetup())
    result = evaluate(
        engine, data, modes, args.batch_size or config.eval_batch_size, args.max_examples, config.heatmap_examples
    )
    out = Path(args.out) if args.out else folder / "eval"
    write_evaluation(result, out, history=[], run_config=config)
    print(metrics_table(result.metrics))
    print(f"\nresults: {out}")
    return 0
