"""The evaluation references against independent Hugging Face runs, and every mode against the training forward.

- floor: the unpatched target's label logits must equal a plain HF forward's (no hyperdas code on that side);
- ceiling: the last source entity token's whole layer-k state written into the last base entity token must equal
  an HF forward with a hook doing exactly that;
- each mode's logits from the one-pass ``evaluate_batch`` must equal ``model(batch, mode)``'s.
"""

from __future__ import annotations

import pytest
import torch

from hyperdas.config import SELECTION_MODES, HyperDASConfig
from hyperdas.model import CEILING, FLOOR, HyperDAS
from hyperdas.targets import build_random_target, position_ids_from_mask
from hyperdas.testing import make_batch, tiny_llama_config

VOCAB = 97
LAYER = 2


@pytest.fixture(scope="module")
def model() -> HyperDAS:
    target = build_random_target(tiny_llama_config(VOCAB), dtype=torch.float64, seed=3)
    torch.manual_seed(0)
    config = HyperDASConfig(target="tiny", intervention_layer=LAYER, das_dimension=5, chop_editor_at_layer=2)
    return HyperDAS(config, target).double().eval()


def _hf_label_logits(model: HyperDAS, batch: dict, patch=None) -> torch.Tensor:
    """A plain HF forward over the base rows; ``patch(hidden)`` may rewrite the input of decoder layer LAYER."""
    hf = model.target.model
    handle = None
    if patch is not None:
        handle = hf.model.layers[LAYER].register_forward_pre_hook(
            lambda _m, args, kwargs: (
                ((patch(args[0]), *args[1:]), kwargs)
                if args
                else (args, kwargs | {"hidden_states": patch(kwargs["hidden_states"])})
            ),
            with_kwargs=True,
        )
    try:
        with torch.no_grad():
            mask = batch.base_attention_mask
            logits = hf(
                input_ids=batch.base_input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
            ).logits
    finally:
        if handle is not None:
            handle.remove()
    positions = batch.label_positions
    return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))


def test_floor_is_the_unpatched_target(model):
    batch = make_batch(VOCAB, batch=4, tb=11, ts=8, te=5, seed=2)
    out = model.evaluate_batch(batch, ["soft"])
    torch.testing.assert_close(out.logits[FLOOR], _hf_label_logits(model, batch), rtol=1e-9, atol=1e-10)
    assert out.selections[FLOOR] is None


def test_ceiling_patches_the_whole_last_entity_vector(model):
    batch = make_batch(VOCAB, batch=4, tb=11, ts=8, te=5, seed=2)
    with torch.no_grad():
        mask = batch.source_attention_mask
        source = model.target.model(
            input_ids=batch.source_input_ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            output_hidden_states=True,
        )
    source_k = source.hidden_states[LAYER]  # (B, Ts, D): the input of decoder layer LAYER
    rows = torch.arange(len(batch.base_entity_last))

    def write_source(hidden):
        hidden = hidden.clone()
        hidden[rows, batch.base_entity_last] = source_k[rows, batch.source_entity_last]
        return hidden

    out = model.evaluate_batch(batch, ["soft"])
    torch.testing.assert_close(out.logits[CEILING], _hf_label_logits(model, batch, write_source), rtol=1e-9, atol=1e-10)
    assert not torch.allclose(out.logits[CEILING], out.logits[FLOOR])


def test_without_the_ceiling_every_other_entry_is_the_same_and_one_patched_pass_is_saved(model, monkeypatch):
    batch = make_batch(VOCAB, batch=3, tb=10, ts=6, te=5, seed=7)
    modes = ["soft", "groundtruth"]
    full = model.evaluate_batch(batch, modes)
    passes = []
    intervene = model.intervene
    monkeypatch.setattr(model, "intervene", lambda *a, **k: passes.append(k) or intervene(*a, **k))
    lean = model.evaluate_batch(batch, modes, ceiling=False)
    assert set(lean.logits) == set(lean.selections) == {FLOOR, *modes}
    assert len(passes) == len(full.logits) - 1 and not any(k.get("full_vector") for k in passes)
    for name in lean.logits:
        torch.testing.assert_close(lean.logits[name], full.logits[name], rtol=0, atol=0, msg=name)


def test_every_mode_equals_the_training_forward(model):
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5, seed=4)
    out = model.evaluate_batch(batch, list(SELECTION_MODES))
    assert set(out.logits) == set(out.selections) == {FLOOR, CEILING, *SELECTION_MODES}
    for mode in SELECTION_MODES:
        with torch.no_grad():
            forward = model(batch, mode=mode)
        torch.testing.assert_close(out.logits[mode], forward.logits, rtol=1e-12, atol=1e-12, msg=mode)
        torch.testing.assert_close(out.selections[mode], forward.selection, rtol=0, atol=0, msg=mode)
    v = out.analysis["reflection"]  # ReflectSelect: W = (I - 2vvᵀ)R, so v must reproduce the basis
    with torch.no_grad():
        encoded = model.encode(batch)
        rotation = model.subspace.rotation()
    eye = torch.eye(v.shape[1], dtype=v.dtype)
    expected = (eye - 2 * v[:, :, None] * v[:, None, :]) @ rotation
    torch.testing.assert_close(encoded.basis, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(v.shape[0], dtype=v.dtype))
