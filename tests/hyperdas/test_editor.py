"""The editor's view of a run (keys: every layer's state, L2-normalised, at position token·N + layer)."""

from __future__ import annotations

import torch

from hyperdas.config import HyperDASConfig
from hyperdas.editor import RunKeys
from hyperdas.model import HyperDAS
from hyperdas.targets import build_random_target
from hyperdas.testing import make_batch, tiny_llama_config

VOCAB = 53


def test_run_keys_by_hand():
    """B=2, T=3 tokens, N=2 states each, D=2. Row 0: the first token is left padding, tokens 1 and 2 selectable;
    row 1: only token 2. The selectable tokens' states come first, token-major (s = w·N + n)."""
    states = torch.tensor(
        [
            [[[9.0, 9.0], [9.0, 9.0]], [[3.0, 4.0], [0.0, 2.0]], [[1.0, 0.0], [6.0, 8.0]]],
            [[[7.0, 7.0], [7.0, 7.0]], [[7.0, 7.0], [7.0, 7.0]], [[0.0, 0.5], [12.0, 5.0]]],
        ]
    )
    attention = torch.tensor([[0, 1, 1], [1, 1, 1]])
    selectable = torch.tensor([[False, True, True], [False, False, True]])
    keys = RunKeys.from_states(states, attention, selectable)
    assert keys.mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert torch.equal(keys.states[0], states[0, 1:].reshape(4, 2))
    assert torch.equal(keys.states[1, :2], states[1, 2])
    torch.testing.assert_close(keys.inv_norm[0], 1 / torch.tensor([5.0, 2.0, 1.0, 10.0]))  # L2 norms
    torch.testing.assert_close(keys.inv_norm[1, :2], 1 / torch.tensor([0.5, 13.0]))
    # RoPE position t'·N + n: t' the token's index among real tokens (row 0's padding not counted), n its layer
    assert keys.positions[0].tolist() == [0, 1, 2, 3]
    assert keys.positions[1, :2].tolist() == [4, 5]


def _editor_encoding(model: HyperDAS, batch: dict, base_states: torch.Tensor, source_states: torch.Tensor):
    return model.editor(
        model.instruction_embeddings(batch.instruction_input_ids),
        batch.instruction_attention_mask,
        RunKeys.from_states(source_states, batch.source_attention_mask, batch.source_intervention_mask),
        RunKeys.from_states(base_states, batch.base_attention_mask, batch.base_intervention_mask),
    )


def test_encoding_does_not_depend_on_the_length_of_any_state(llama_in_float64):
    """Keys and values are L2-normalised states: scaling each state vector by its own positive factor changes
    nothing (float64 throughout; only rounding, ~1e-16 per operation, separates the two encodings)."""
    target = build_random_target(tiny_llama_config(VOCAB), dtype=torch.float64, seed=3)
    torch.manual_seed(0)
    model = HyperDAS(HyperDASConfig(target="tiny", intervention_layer=1, das_dimension=3), target).double()
    batch = make_batch(VOCAB, batch=2, tb=7, ts=6, te=4)
    base, source = model.target_states(batch)
    with torch.no_grad():
        encoding = _editor_encoding(model, batch, base, source)
        g = torch.Generator().manual_seed(1)
        scale_base = torch.rand(*base.shape[:3], 1, generator=g, dtype=torch.float64) * 10 + 0.1
        scale_source = torch.rand(*source.shape[:3], 1, generator=g, dtype=torch.float64) * 10 + 0.1
        scaled = _editor_encoding(model, batch, base * scale_base, source * scale_source)
        moved = _editor_encoding(model, batch, base, torch.roll(source, 1, dims=2))  # states in other layers
    torch.testing.assert_close(scaled, encoding, rtol=1e-12, atol=1e-12)
    assert (moved - encoding).abs().max() > 1e-6  # the encoding does read the states
