"""`hyperdas baseline --method das|mdas --layers 4,8,12,16 [--config FILE] [key=value ...]`: RAVEL's baselines.

Trains DAS or MDAS (``hyperdas.baselines``) on exactly the data a `hyperdas train` run with the same config and
overrides uses (the main job's, by default), evaluates it with the same metric on the same held-out pairs, and
writes metrics.json / report.md like a HyperDAS run, with the floor and the per-layer full-vector ceiling:

    hyperdas baseline --method mdas --layers 4,8,12,16            # on the main job's data
    hyperdas baseline --method das --layers 10 --rank 64 data.domain=verb
    hyperdas compare runs/smollm2-city runs/smollm2-city-mdas runs/smollm2-city-das

The target runs once per prompt, keeping only the swept layers' states; each layer then trains from them through
layers k..end only. Seconds per layer are in metrics.json and the report.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from hyperdas.baselines.sweep import METHODS, BaselineConfig

METRICS_FILE = "metrics.json"


def _layers(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: give layer numbers separated by commas, e.g. 4,8,12,16") from None
    if not layers:
        raise ValueError(f"--layers {text!r}: give at least one layer, e.g. 4,8,12,16")
    return layers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = BaselineConfig()
    parser.add_argument("--method", default=default.method, help=f"{' or '.join(METHODS)} (default: %(default)s)")
    parser.add_argument("--layers", default=",".join(map(str, default.layers)), help="layers to sweep: %(default)s")
    parser.add_argument("--rank", type=int, default=None, help="subspace size r (default: the run's das_dimension)")
    parser.add_argument("--epochs", type=int, default=default.epochs, help="passes over each attribute's examples")
    parser.add_argument("--lr", type=float, default=default.lr, help="learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=default.batch_size, help="pairs per step")
    parser.add_argument("--out", default=None, help="results folder (default: the run's out_dir + '-METHOD')")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--config", default=None, help="run config YAML whose data to use (default: the main job's)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides, as for hyperdas train")


def run(args: argparse.Namespace) -> int:
    from hyperdas.report import baseline_report, metrics_table
    from hyperdas.targets import target_config
    from hyperdas.train.config import load_run_config, save_run_config

    run_config = load_run_config(args.config, args.overrides)
    model = run_config.model
    config = BaselineConfig(
        method=args.method,
        layers=_layers(args.layers),
        rank=args.rank or model.das_dimension,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        causal_weight=run_config.loss.causal_loss_weight,
        isolate_weight=run_config.loss.iso_loss_weight,
        eval_batch_size=run_config.eval_batch_size,
        seed=run_config.seed,
    )
    shape = target_config(model.target)
    config.validate(shape.num_hidden_layers, shape.hidden_size)
    out = Path(args.out or f"{run_config.out_dir}-{config.method}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if (out / METRICS_FILE).is_file() and not args.overwrite:
        raise ValueError(f"{out} already holds results ({METRICS_FILE}); pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    metrics, seconds = _sweep(run_config, config)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    save_run_config(run_config, out / "run_config.yaml")
    (out / "baseline_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    (out / "report.md").write_text(baseline_report(metrics, asdict(config), seconds))
    print(metrics_table(metrics))
    print(f"\nresults: {out} ({seconds:.0f} s in all)")
    return 0


def _sweep(run_config, config: BaselineConfig) -> tuple[dict, float]:
    from hyperdas.cache import cache_root
    from hyperdas.model import load_configured_target
    from hyperdas.state_cache import StateCache, plan_storage
    from hyperdas.targets import run_device
    from hyperdas.train.data_source import load_run_data
    from hyperdas.train.trainer import PlainSetup

    start = time.perf_counter()
    target = load_configured_target(run_config.model, device=run_device())
    data = load_run_data(run_config, target, PlainSetup())
    rows = data.prompt_rows(data.train, list(range(len(data.train)))) + data.prompt_rows(
        data.test, list(range(len(data.test)))
    )
    plan = plan_storage(StateCache.bytes_needed(target, rows, config.layers), "auto", cache_root() / "states")
    if plan.storage == "off":
        why = plan.reason.removeprefix("state cache off: ")
        raise ValueError(f"the sweep needs its layers' states cached, but {why}")
    print(f"hyperdas baseline: {plan.reason} (layers {config.layers})")
    cache = StateCache(target, plan.storage, cache_root() / "states", layers=config.layers)
    try:
        cache.fill(rows, batch_size=run_config.data.filter_batch_size)
        from hyperdas.baselines.sweep import run_sweep

        metrics = run_sweep(target, data.train, data.test, data.collate, config, cache)
    finally:
        cache.close()
    return metrics, time.perf_counter() - start
