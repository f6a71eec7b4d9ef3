"""`hyperdas eval --checkpoint DIR [--modes soft,column_argmax,...]`: evaluate a trained HyperDAS.

DIR is a run folder (written by `hyperdas train` or train/launch.py), its model/ folder, or any model folder in
the ``HyperDAS.save_pretrained`` format. A run's own data (its run config) is evaluated; a bare model folder
is evaluated on the main job's data with the model's target. Results go to DIR/eval/ (DIR/eval-train/ for
``--split train``, the pairs trained on) unless --out says otherwise; the floor and the ceiling are always
evaluated beside the modes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperdas.config import EVAL_SPLITS, SELECTION_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder, its model/ folder, or a model folder")
    parser.add_argument("--modes", default=",".join(SELECTION_MODES), help="comma-separated (default: all)")
    parser.add_argument("--target", default=None, help="evaluate on another target (must match the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per forward")
    parser.add_argument(
        "--max-examples", type=int, default=None, help="this many examples, spread over attributes and kinds"
    )
    parser.add_argument(
        "--split",
        choices=EVAL_SPLITS,
        default="test",
        help="test: the held-out templates (the result); train: the pairs trained on (how much of the fit generalises)",
    )
    parser.add_argument(
        "--out", default=None, help="results folder (default: CHECKPOINT/eval, CHECKPOINT/eval-train for --split train)"
    )


def _check_arguments(args: argparse.Namespace) -> list[str]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise ValueError(f"--modes {args.modes!r} names no mode; allowed: {list(SELECTION_MODES)}")
    unknown = [m for m in modes if m not in SELECTION_MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; allowed: {list(SELECTION_MODES)}")
    for name in ("batch_size", "max_examples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return modes


def locate(folder: Path) -> tuple[Path | None, Path]:
    """(the run folder whose data to use, or None, the model folder) for what --checkpoint names."""
    from hyperdas.train.config import RUN_CONFIG_FILE
    from hyperdas.train.trainer import CHECKPOINTS, FINAL_MODEL

    if folder.parent.name == CHECKPOINTS and folder.name.startswith("step_"):
        run = folder.parent.parent
        raise ValueError(
            f"{folder} is a training checkpoint of the run {run}, not an exported model: evaluate the run "
            f"(hyperdas eval --checkpoint {run}, which reads {run / FINAL_MODEL}), or finish it with "
            f"hyperdas train resume={run}"
        )
    if (folder / RUN_CONFIG_FILE).is_file():
        model = folder / FINAL_MODEL
        if not model.is_dir():
            raise FileNotFoundError(f"{model} not found: the run in {folder} has not exported a model yet")
        return folder, model
    if (folder.parent / RUN_CONFIG_FILE).is_file() and folder.name == FINAL_MODEL:
        return folder.parent, folder
    return None, folder


def run(args: argparse.Namespace) -> int:
    from hyperdas.config import HyperDASConfig
    from hyperdas.model import HyperDAS, load_configured_target
    from hyperdas.report import metrics_table
    from hyperdas.train.config import RUN_CONFIG_FILE, load_run_config
    from hyperdas.train.data_source import load_run_data
    from hyperdas.train.engine import PlainEngine
    from hyperdas.train.evaluate import evaluate, write_evaluation
    from hyperdas.train.trainer import PlainSetup

    modes = _check_arguments(args)
    run_folder, model_dir = locate(Path(args.checkpoint))
    model_config = HyperDASConfig.load(model_dir)
    config = load_run_config(run_folder / RUN_CONFIG_FILE) if run_folder is not None else load_run_config()
    config.model = model_config
    if args.target:
        config.model.target = args.target
    config.validate()
    target = load_configured_target(config.model)
    model = HyperDAS.from_pretrained(model_dir, target=target)
    engine = PlainEngine(model, config)
    data = load_run_data(config, target, PlainSetup())
    result = evaluate(
        engine,
        data,
        modes,
        args.batch_size or config.eval_batch_size,
        args.max_examples,
        config.heatmap_examples,
        seed=config.seed,
        split=args.split,
    )
    default_out = "eval" if args.split == "test" else f"eval-{args.split}"
    out = Path(args.out) if args.out else Path(args.checkpoint) / default_out
    write_evaluation(result, out, history=[], run_config=config)
    print(metrics_table(result.metrics))
    print(f"\nresults: {out}")
    return 0
