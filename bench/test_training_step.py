"""One HyperDAS training step: the two-pass step against the literal four-pass step, side by side.

    python -m pytest bench/test_training_step.py --benchmark-only

Both run forward + backward + an AdamW step on the same batch; extra_info records pairs per second and the
bytes autograd saves for backward (plus peak CUDA memory on a GPU); bench/make_tables.py prints the ratio
(four-pass time / two-pass time). Cases: a tiny random Llama and the embedded default (SmolLM2-135M, bf16
target with fp32 masters on CPU as the main job runs it).
"""

from __future__ import annotations

import pytest
import torch

from hyperdas.config import HyperDASConfig
from hyperdas.literal import literal_four_pass_forward
from hyperdas.model import HyperDAS, LossWeights
from hyperdas.targets import build_random_target, load_target
from hyperdas.testing import make_batch, tiny_llama_config

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


def _setup(case: str):
    build, overrides, shape = CASES[case]
    if case not in _TARGETS:
        _TARGETS[case] = build().to(DEVICE)
    target = _TARGETS[case]
    torch.manual_seed(0)
    model = HyperDAS(HyperDASConfig(target=target.name, **overrides), target).to(DEVICE)
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-5)
    vocab, batch_size = shape["vocab_size"], shape["batch"]
    batch = make_batch(vocab, batch=batch_size, tb=shape["tb"], ts=shape["ts"], te=shape["te"], labels=2)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    return model, optimizer, batch, batch_size


@pytest.mark.parametrize("path", ["two_pass", "four_pass"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_step(benchmark, memory_probe, case, path):
    model, optimizer, batch, batch_size = _setup(case)
    weights = LossWeights(sparsity=0.5)

    def forward():
        if path == "two_pass":
            return model(batch, loss_weights=weights).loss
        return literal_four_pass_forward(model, batch, loss_weights=weights)[0]

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
    peak = memory_probe.peak_bytes(step)
    benchmark.group = f"training step {case}"
    benchmark.extra_info.update(
        op="training_step",
        case=case,
        mode="fwd+bwd+adamw",
        path=path,
        saved_for_backward_bytes=saved,
        peak_memory_bytes=peak,
    )
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["pairs_per_second"] = batch_size / benchmark.stats.stats.median
