"""One HyperDAS training step: the two-pass step, with and without cached target states, against the literal
four-pass step, side by side; and how the cached step's cost grows with the editor's depth and the batch.

    python -m pytest bench/test_training_step.py --benchmark-only

Every path runs forward + backward + an AdamW step on the same batch; extra_info records pairs per second and
the bytes autograd saves for backward (plus peak CUDA memory on a GPU); bench/make_tables.py prints the ratios
(four-pass time / each path's). "two_pass_cached" is the step the trainer runs from the second epoch on, when
the frozen target's states of every prompt come from hyperdas.state_cache: here they are computed once before
timing and passed in. Cases: a tiny random Llama and the embedded default (SmolLM2-135M, bf16 target with
fp32 masters on CPU as the main job runs it). The scaling cases time the cached step of the embedded default
at L = 2, 4, 8 (B=16) and B = 8, 16, 32 (L=2), with TFLOP/s by bench/flop_model.py's count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hyperdas.config import HyperDASConfig
from hyperdas.literal import literal_four_pass_forward
from hyperdas.model import HyperDAS, LossWeights
from hyperdas.targets import build_random_target, load_target
from hyperdas.testing import make_batch, tiny_llama_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flop_model import NO_GRAD_PASS, StepShape, step_macs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {
    # name: (target builder, HyperDAS overrides, batch shape)
    "tiny-llama B=8": (
        lambda: build_random_target(tiny_llama_config(211), seed=0),
        {"intervention_layer": 1, "das_dimension": 4, "chop_editor_at_layer": 1},
        {"vocab_size": 211, "batch": 8, "tb": 17, "ts": 15, "te": 7},
    ),
    "smollm2-135m B=16": (
        lambda: load_target("smollm2-135m", dtype=torch.bfloat16),
        {"intervention_layer": 10, "das_dimension": 32, "chop_editor_at_layer": 2, "torch_dtype": "bfloat16"},
        {"vocab_size": 49152, "batch": 16, "tb": 22, "ts": 20, "te": 12},
    ),
}
_TARGETS: dict[str, object] = {}


def _setup(case: str, editor_layers: int | None = None, batch_size: int | None = None):
    """The case's model, optimizer and batch; ``editor_layers`` / ``batch_size`` replace the case's L / B."""
    build, overrides, shape = CASES[case]
    if editor_layers is not None:
        overrides = {**overrides, "chop_editor_at_layer": editor_layers}
    if batch_size is not None:
        shape = {**shape, "batch": batch_size}
    if case not in _TARGETS:
        _TARGETS[case] = build().to(DEVICE)
    target = _TARGETS[case]
    torch.manual_seed(0)
    model = HyperDAS(HyperDASConfig(target=target.name, **overrides), target).to(DEVICE)
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-5)
    vocab, batch_size = shape["vocab_size"], shape["batch"]
    batch = make_batch(vocab, batch=batch_size, tb=shape["tb"], ts=shape["ts"], te=shape["te"], labels=2)
    batch = batch.to(DEVICE)
    return model, optimizer, batch, batch_size


def _time_step(benchmark, memory_probe, model, optimizer, forward) -> None:
    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    saved = memory_probe.saved_bytes(lambda: forward().backward())
    optimizer.zero_grad(set_to_none=True)
    benchmark.extra_info.update(saved_for_backward_bytes=saved, peak_memory_bytes=memory_probe.peak_bytes(step))
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("path", ["two_pass", "two_pass_cached", "four_pass"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_step(benchmark, memory_probe, case, path):
    model, optimizer, batch, batch_size = _setup(case)
    weights = LossWeights(sparsity=0.5)
    states = model.target_states(batch) if path == "two_pass_cached" else None

    def forward():
        if path == "four_pass":
            return literal_four_pass_forward(model, batch, loss_weights=weights)[0]
        return model(batch, loss_weights=weights, states=states).loss

    benchmark.group = f"training step {case}"
    benchmark.extra_info.update(op="training_step", case=case, mode="fwd+bwd+adamw", path=path)
    _time_step(benchmark, memory_probe, model, optimizer, forward)
    benchmark.extra_info["pairs_per_second"] = batch_size / benchmark.stats.stats.median


SCALING = [(2, 16), (4, 16), (8, 16), (2, 8), (2, 32)]  # (editor layers L, batch B)


@pytest.mark.parametrize(("editor_layers", "batch_size"), SCALING)
def test_cached_step_scaling(benchmark, memory_probe, editor_layers, batch_size):
    case = "smollm2-135m B=16"
    model, optimizer, batch, _ = _setup(case, editor_layers=editor_layers, batch_size=batch_size)
    weights = LossWeights(sparsity=0.5)
    states = model.target_states(batch)
    benchmark.group = "cached step scaling"
    benchmark.extra_info.update(
        op="cached_step_scaling",
        case=f"smollm2-135m L={editor_layers} B={batch_size}",
        mode="fwd+bwd+adamw",
        path="two_pass_cached",
    )
    _time_step(
        benchmark, memory_probe, model, optimizer, lambda: model(batch, loss_weights=weights, states=states).loss
    )
    median = benchmark.stats.stats.median
    shape = CASES[case][2]
    flops = step_macs(
        model.target.config,
        StepShape(
            batch=batch_size,
            seq_len=(shape["tb"] + shape["ts"]) // 2,
            instruction_len=shape["te"],
            label_tokens=2,
            editor_layers=editor_layers,
            rank=model.config.das_dimension,
            intervention_layer=model.config.intervention_layer,
        ),
    )["two_pass"]
    cached = {k: v for k, v in flops.items() if k != NO_GRAD_PASS}  # the cache replaces that pass
    benchmark.extra_info.update(pairs_per_second=batch_size / median, tflops=2 * sum(cached.values()) / median / 1e12)
