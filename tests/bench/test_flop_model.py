"""bench/flop_model.py's count of a step's matmul work against torch's own FLOP counter on a real step.

The README's account of the two-pass step's speed-up (and of why 1.8x is out of reach at these shapes) rests on
that model, so it is held to `torch.utils.flop_counter.FlopCounterMode` run over both paths, forward and
backward, on a tiny Llama with odd sizes, for two configurations, with every attention run as matmuls.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import hyperdas.editor
from hyperdas.config import HyperDASConfig
from hyperdas.kernels.cross_attention_reference import cross_attention_reference
from hyperdas.literal import literal_four_pass_forward
from hyperdas.model import HyperDAS, LossWeights
from hyperdas.targets import build_random_target
from hyperdas.testing import make_batch, tiny_llama_config

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from flop_model import StepShape, step_macs  # noqa: E402

VOCAB = 307


def _counted_macs(model: HyperDAS, batch: dict, path: str) -> float:
    weights = LossWeights(sparsity=0.5)
    with FlopCounterMode(display=False) as counter:
        if path == "two_pass":
            loss = model(batch, loss_weights=weights).loss
        else:
            loss = literal_four_pass_forward(model, batch, loss_weights=weights)[0]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def _reference_cross_attention(*args, use_triton: bool | None = None):
    """The editor's cross-attention through the eager oracle, whose matmuls the counter sees (whatever the path)."""
    return cross_attention_reference(*args)


@pytest.mark.parametrize(
    ("config_overrides", "shape"),
    [
        (
            {},
            StepShape(
                batch=3, seq_len=13, instruction_len=5, label_tokens=2, editor_layers=1, rank=3, intervention_layer=1
            ),
        ),
        (
            {
                "num_hidden_layers": 4,
                "hidden_size": 56,
                "intermediate_size": 88,
                "num_attention_heads": 7,
                "head_dim": 8,
            },
            StepShape(
                batch=5, seq_len=11, instruction_len=6, label_tokens=1, editor_layers=2, rank=5, intervention_layer=3
            ),
        ),
    ],
)
def test_the_model_counts_what_torch_counts(config_overrides, shape, monkeypatch):
    target = build_random_target(tiny_llama_config(VOCAB, **config_overrides), seed=0)
    torch.manual_seed(0)
    model = HyperDAS(
        HyperDASConfig(
            target="tiny",
            intervention_layer=shape.intervention_layer,
            das_dimension=shape.rank,
            chop_editor_at_layer=shape.editor_layers,
        ),
        target,
    )
    # every attention as plain matmuls, which the counter sees (it does not count CPU SDPA kernels)
    target.attention = "eager"
    monkeypatch.setattr(hyperdas.editor, "normalized_cross_attention", _reference_cross_attention)
    for layer in model.editor.layers:
        layer.self_attn.config._attn_implementation = "eager"
    # base and source of one length, so the model's single T is exact
    batch = make_batch(
        VOCAB,
        batch=shape.batch,
        tb=shape.seq_len,
        ts=shape.seq_len,
        te=shape.instruction_len,
        labels=shape.label_tokens,
    )
    widest = [int(getattr(batch, f"{run}_intervention_mask").sum(1).max()) for run in ("base", "source")]
    predicted = step_macs(target.config, replace(shape, selectable_tokens=sum(widest) / 2))
    counted = {path: _counted_macs(model, batch, path) for path in ("two_pass", "four_pass")}
    for path, parts in predicted.items():
        assert sum(parts.values()) == pytest.approx(counted[path], rel=0.02), path
    ratio = sum(predicted["four_pass"].values()) / sum(predicted["two_pass"].values())
    assert ratio == pytest.approx(counted["four_pass"] / counted["two_pass"], rel=0.02)
