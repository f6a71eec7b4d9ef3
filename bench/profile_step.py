"""Where one HyperDAS training step's time goes, part by part, forward and backward.

    python bench/profile_step.py                        # the main job's step (SmolLM2-135M, B=16, cached)
    python bench/profile_step.py --live                 # without the state cache: the no-grad target pass too
    python bench/profile_step.py --editor-layers 8 --json bench/results/profile_smollm2.json
    python bench/profile_step.py --dtype bfloat16       # bf16 whatever the CPU (auto: fp32 without native bf16)

Each part is timed by module hooks: forward pre/post hooks for the forward, full backward pre/post hooks for
the backward (on CPU every op is synchronous, so wall-clock gaps are the parts' own time). Parts: the no-grad
target pass (live only), each editor block (self-attention, source / base cross-attention, MLP), the selection
head, the subspace module, target layers k..end, the LM head at the label positions, the loss, the optimizer
step; what is left of the step (interchange, cache lookup, small ops) is "other". The mean over --steps
steps after --warmup is printed as a table, with the step time and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from hyperdas.config import HyperDASConfig
from hyperdas.model import HyperDAS, LossWeights, load_configured_target
from hyperdas.state_cache import StateCache, real_rows


class PartTimer:
    """Accumulates seconds per (part, phase) from module hooks; ``phase`` is "forward" or "backward"."""

    def __init__(self):
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self._open: dict[tuple[str, str], float] = {}
        self._handles = []

    def watch(self, module: torch.nn.Module, part: str) -> None:
        def start(phase):
            return lambda *_: self._open.__setitem__((part, phase), time.perf_counter())

        def stop(phase):
            def hook(*_):
                began = self._open.pop((part, phase), None)
                if began is not None:
                    self.seconds[(part, phase)] += time.perf_counter() - began

            return hook

        self._handles += [
            module.register_forward_pre_hook(start("forward")),
            module.register_forward_hook(stop("forward")),
        ]
        self._handles += [
            module.register_full_backward_pre_hook(start("backward")),
            module.register_full_backward_hook(stop("backward")),
        ]

    def reset(self) -> None:
        self.seconds.clear()
        self._open.clear()


def watch_model(timer: PartTimer, model: HyperDAS, k: int) -> None:
    for layer in model.editor.layers:
        for block in ("self_attn", "source_attn", "base_attn", "mlp"):
            timer.watch(getattr(layer, block), f"editor {block}")
    timer.watch(model.selection_head, "selection head")
    timer.watch(model.subspace, "subspace")
    for layer in model.target.layers[k:]:
        timer.watch(layer, f"target layers {k}..end")
    timer.watch(model.target.lm_head, "LM head (label positions)")


def main_job_batch(target, size: int, dtype: str) -> dict:
    """The first ``size`` training pairs of the main job's data for a target in ``dtype`` (its known prompts
    are checked in that dtype; built into the cache if missing), collated."""
    from hyperdas.data.build import build_dataset
    from hyperdas.data.collate import Collator
    from hyperdas.train.config import load_run_config

    run = load_run_config(overrides=[f"model.torch_dtype={dtype}"])
    train = build_dataset(run.data_request(), target)["train"]
    return Collator(target.tokenizer)([train[i] for i in range(size)])


def profile(args) -> dict:
    torch.set_num_threads(args.threads)
    k = args.layer
    config = HyperDASConfig(
        intervention_layer=k, das_dimension=args.rank, chop_editor_at_layer=args.editor_layers, torch_dtype=args.dtype
    )
    target = load_configured_target(config, device="cpu")
    torch.manual_seed(0)
    model = HyperDAS(config, target)
    args.dtype = model.config.torch_dtype  # "auto" resolved for this CPU
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-5)
    batch = main_job_batch(target, args.batch, args.dtype)
    cache = None
    if not args.live:
        cache = StateCache(target)
        cache.fill(
            real_rows(batch.base_input_ids, batch.base_attention_mask)
            + real_rows(batch.source_input_ids, batch.source_attention_mask),
            progress=False,
        )
    timer = PartTimer()
    watch_model(timer, model, k)
    weights = LossWeights(sparsity=0.5)
    steps, parts = [], defaultdict(list)
    for step in range(args.warmup + args.steps):
        timer.reset()
        began = time.perf_counter()
        t = time.perf_counter()
        states = cache.states_for(batch) if cache is not None else model.target_states(batch)
        lookup = time.perf_counter() - t
        out = model(batch, loss_weights=weights, states=states)
        t = time.perf_counter()
        out.loss.backward()
        backward = time.perf_counter() - t
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([p for _, p in model.trainable_named_parameters()], 4.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        opt = time.perf_counter() - t
        total = time.perf_counter() - began
        if step < args.warmup:
            continue
        steps.append(total)
        named = dict(timer.seconds)
        named[("target no-grad pass" if cache is None else "state cache lookup", "forward")] = lookup
        named[("optimizer (clip + AdamW)", "step")] = opt
        accounted_backward = sum(v for (p, ph), v in named.items() if ph == "backward")
        named[("other (interchange, loss, small ops)", "backward")] = backward - accounted_backward
        named[("other (interchange, loss, small ops)", "forward")] = (
            total - backward - opt - sum(v for (p, ph), v in named.items() if ph == "forward")
        )
        for key, value in named.items():
            parts[key].append(value)
    step_time = statistics.median(steps)
    rows = sorted(((part, phase, statistics.median(v)) for (part, phase), v in parts.items()), key=lambda r: -r[2])
    return {
        "machine": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "threads": args.threads,
        "case": f"SmolLM2-135M {args.dtype}, the main job's first {args.batch} pairs "
        f"(Tb={batch.base_input_ids.shape[1]}, "
        f"Ts={batch.source_input_ids.shape[1]}, Te={batch.instruction_input_ids.shape[1]}), "
        f"L={args.editor_layers}, layer {k}, r={args.rank}, {'live target pass' if args.live else 'state cache'}",
        "step_seconds": step_time,
        "parts": [{"part": p, "phase": ph, "seconds": s, "share": s / step_time} for p, ph, s in rows],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(result: dict) -> str:
    lines = [
        f"{result['case']}; {result['cpu_model']}, {result['threads']} threads: "
        f"step {result['step_seconds']:.3f} s (median)",
        "",
        "| part | phase | seconds | share |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += [f"| {r['part']} | {r['phase']} | {r['seconds']:.4f} | {100 * r['share']:.1f}% |" for r in result["parts"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="no state cache: run the no-grad target pass")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--editor-layers", type=int, default=2)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="target dtype (auto: the main job's)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    result = profile(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
