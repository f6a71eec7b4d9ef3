"""A few DeepSpeed ZeRO-3 training steps in one process (a group of one), against bench/memory_model.py.

    python bench/zero3_step.py --config zero3 --json zero3.json                  # CUDA: Llama-3-8B's shape
    python bench/zero3_step.py --config zero3_offload --json offload.json        # parameters + optimizer on CPU
    python bench/zero3_step.py --smoke --config zero3 --json zero3.json          # CPU: the tiny Llama, over gloo

HyperDAS on a random-weight target built ZeRO-3 partitioned from its config (no download), trained through
`hyperdas.train.deepspeed_engine.DeepSpeedEngine` with the shipped DeepSpeed JSON (train/configs/<config>.json)
filled from a run config of bench/training_step_at_scale.py's step (Llama-3-8B, L=8, r=128, B=16, T=64, k=15,
bf16 on CUDA; fp32 on CPU). Recorded: each step's time and loss, the peak CUDA memory of the steps after the
first, the model states read off DeepSpeed's buffers (on CUDA only those in device memory), and
memory_model.py's prediction of both.

In --smoke the offload config keeps its parameter offload but not its optimizer offload: that would JIT-compile
DeepSpeed's CPU Adam (about a minute of C++), which only the GPU run pays. Without an importable deepspeed the
JSON says status "skipped" and why, and the exit code is 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
GIB = 2**30


def deepspeed_missing() -> str | None:
    """Why deepspeed cannot be used here, or None when it imports."""
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure (missing wheel, missing dependency) is the answer
        return f"deepspeed does not import: {type(err).__name__}: {err}"
    return None


def skip_cpu_shared_memory_op() -> None:
    """Keep DeepSpeed on CPU from JIT-compiling its shared-memory all-reduce when it joins the process group
    (about 45 s of C++ on a fresh machine): a group of one never calls it, and torch.distributed serves."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def run(config_name: str, smoke: bool, steps: int) -> dict:
    """Build, train ``steps`` steps, measure; the result as a dict (see the module docstring)."""
    from dataclasses import asdict

    import memory_model
    from training_step_at_scale import memory_step, step_case

    from hyperdas.config import HyperDASConfig
    from hyperdas.train.config import RunConfig
    from hyperdas.train.deepspeed_engine import DeepSpeedEngine
    from hyperdas.train.distributed import init_distributed, leave_distributed
    from hyperdas.train.ds_config import read_ds_config, resolve_ds_config
    from hyperdas.train.launch import single_process_environment
    from hyperdas.train.memory_fit import model_state_bytes
    from hyperdas.train.zero3_build import build_model

    cuda = torch.cuda.is_available()
    preset, shape = step_case(smoke)
    raw = read_ds_config(CONFIGS / f"{config_name}.json")
    zero = raw["zero_optimization"]
    if smoke:
        zero.pop("offload_optimizer", None)
    offload = {(False, False): "none", (False, True): "optimizer", (True, True): "all"}.get(
        ("offload_param" in zero, "offload_optimizer" in zero), "param"
    )
    single_process_environment()
    if not cuda:
        skip_cpu_shared_memory_op()
    init_distributed()
    model_config = HyperDASConfig(
        target=preset,
        intervention_layer=shape.intervention_layer,
        das_dimension=shape.rank,
        chop_editor_at_layer=shape.editor_layers,
    )
    run_config = RunConfig(model=model_config, global_batch_size=shape.batch, precision="auto")
    ds = resolve_ds_config(raw, run_config, 1, "cuda" if cuda else "cpu")
    bf16 = ds["bf16"]["enabled"]
    target_config = memory_model.target_config(preset)
    step = memory_step(shape, engine="deepspeed", stage=3, devices=1, offload=offload, bf16=bf16)
    counts = memory_model.parameter_counts(preset, step)  # before ZeRO-3 construction is switched on
    make_target = memory_model.random_target(target_config)
    model, keep_alive = build_model(run_config, ds, "cuda" if cuda else "cpu", make_target)
    engine = DeepSpeedEngine(model, run_config, ds, keep_alive)
    batch = memory_model.synthetic_batch(target_config.vocab_size, step)
    times, losses = [], []
    for index in range(steps):
        if index == 1 and cuda:
            torch.cuda.reset_peak_memory_stats()  # the first step allocates the optimizer state
        start = time.perf_counter()
        loss = engine.forward(batch).loss
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        print(f"{config_name} step {index}: {times[-1]:.2f} s, loss {losses[-1]:.4f}", flush=True)
    measured_states = memory_model.measured_state_bytes(engine, "cuda" if cuda else None)
    predicted_states = model_state_bytes(counts, ds, 1, 2 if bf16 else 4)
    result = {
        "status": "ok",
        "config": config_name,
        "offload": offload,
        "bf16": bf16,
        "preset": preset,
        "shape": asdict(shape),
        "step_seconds": times,
        "losses": losses,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "predicted_peak_bytes": memory_model.predict(preset, step, counts)["total"],
        "state_bytes": {"measured": measured_states, "predicted": predicted_states},
        "ds_config": ds,
    }
    del engine, model
    leave_distributed()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", choices=["zero3", "zero3_offload"], default="zero3", help="the DeepSpeed JSON in train/configs/"
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    parser.add_argument("--smoke", action="store_true", help="the tiny Llama on CPU: a quick check of this script")
    parser.add_argument("--steps", type=int, default=3, help="training steps (the first allocates the optimizer)")
    args = parser.parse_args(argv)
    missing = deepspeed_missing()
    if missing:
        result = {"status": "skipped", "config": args.config, "why": missing}
    else:
        result = run(args.config, args.smoke, args.steps)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "ds_config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
