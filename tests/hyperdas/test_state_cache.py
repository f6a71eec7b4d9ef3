"""The frozen-state cache: a cached step equals a live one, and a cache is never read for another target or data."""

from __future__ import annotations

import pytest
import torch

from hyperdas.config import HyperDASConfig
from hyperdas.model import HyperDAS, LossWeights
from hyperdas.state_cache import StateCache, plan_storage, real_rows
from hyperdas.targets import build_random_target, position_ids_from_mask
from hyperdas.testing import make_batch, tiny_llama_config

VOCAB = 89


def _target(seed: int = 5, dtype=torch.float64):
    return build_random_target(tiny_llama_config(VOCAB), dtype=dtype, seed=seed)


def _model(target) -> HyperDAS:
    torch.manual_seed(0)
    config = HyperDASConfig(target="tiny", intervention_layer=1, das_dimension=4, chop_editor_at_layer=2)
    return HyperDAS(config, target).double()


def _rows(batch) -> list[tuple[int, ...]]:
    return real_rows(batch.base_input_ids, batch.base_attention_mask) + real_rows(
        batch.source_input_ids, batch.source_attention_mask
    )


def _step(model, batch, states):
    model.zero_grad(set_to_none=True)
    out = model(batch, loss_weights=LossWeights(sparsity=0.5), states=states)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.trainable_named_parameters() if p.grad is not None}


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_a_cached_step_equals_a_live_step(storage, tmp_path):
    target = _target()
    model = _model(target)
    batch = make_batch(VOCAB, batch=4, tb=10, ts=8, te=5, seed=3)
    cache = StateCache(target, storage, tmp_path)
    # filled in batches of another composition and padding than the step's own 2B pass
    assert cache.fill(_rows(batch)[::-1], batch_size=3, progress=False) == len(set(_rows(batch)))
    states = cache.states_for(batch)
    assert states is not None and states[0].shape == (4, 10, target.num_states, target.hidden_size)
    live_loss, live_grads = _step(model, batch, None)
    cached_loss, cached_grads = _step(model, batch, states)
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-12, atol=1e-12)
    assert cached_grads.keys() == live_grads.keys() == {n for n, _ in model.trainable_named_parameters()}
    for name, grad in live_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    cache.close()
    if storage == "disk":
        assert not any(tmp_path.iterdir())  # the mapped file went with the cache


def test_a_second_fill_computes_only_new_rows_and_padding_forwards_are_dropped():
    target = _target()
    first, second = make_batch(VOCAB, seed=1), make_batch(VOCAB, seed=2)
    cache = StateCache(target)
    calls = []
    real = target.hidden_states

    def counting(ids, mask, **kwargs):
        calls.append(ids.shape[0])
        return real(ids, mask, **kwargs)

    target.hidden_states = counting
    assert cache.fill(_rows(first), batch_size=2, progress=False) == len(set(_rows(first)))
    assert cache.fill(_rows(first), batch_size=2, progress=False) == 0
    before = len(calls)
    cache.fill(_rows(second), batch_size=4, progress=False, steps=5)  # ZeRO-3 lockstep: exactly 5 forwards
    assert len(calls) - before == 5
    assert len(cache) == len(set(_rows(first)) | set(_rows(second)))
    with pytest.raises(ValueError, match="more than the 1 asked for"):
        cache.fill(_rows(make_batch(VOCAB, seed=9)), batch_size=1, progress=False, steps=1)


def test_a_cache_of_some_layers_holds_the_full_pass_states_and_never_runs_the_layers_above():
    target = _target()
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5, seed=4)
    runs = []  # index of every decoder layer run while filling
    hooks = [layer.register_forward_hook(lambda *_a, i=i: runs.append(i)) for i, layer in enumerate(target.layers)]
    try:
        cache = StateCache(target, layers=[2, 1])  # state n = 2 is the output of decoder layer 1: layer 2 is above
        cache.fill(_rows(batch), batch_size=2, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert runs and set(runs) == {0, 1} and target.num_layers == 3
    base, source = cache.states_for(batch)
    with torch.no_grad():  # the reference: the plain HF forward's hidden states, all layers run
        for states, ids, mask in (
            (base, batch.base_input_ids, batch.base_attention_mask),
            (source, batch.source_input_ids, batch.source_attention_mask),
        ):
            hf = target.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), output_hidden_states=True
            ).hidden_states
            want = torch.stack([hf[2], hf[1]], dim=2) * mask[..., None, None]
            torch.testing.assert_close(states * mask[..., None, None], want, rtol=1e-10, atol=1e-12)


def test_hidden_states_up_to_a_layer_are_the_first_states_of_the_full_pass():
    target = _target()
    batch = make_batch(VOCAB, batch=2, tb=8, ts=6, te=4, seed=5)
    ids, mask = batch.base_input_ids, batch.base_attention_mask
    full = target.hidden_states(ids, mask)
    for last in range(target.num_layers + 1):
        assert torch.equal(target.hidden_states(ids, mask, last_layer=last), full[:, :, : last + 1])
    for bad in (-1, target.num_layers + 1):
        with pytest.raises(ValueError, match=f"last_layer must be in 0..{target.num_layers}.*got {bad}"):
            target.hidden_states(ids, mask, last_layer=bad)


def test_a_cache_is_never_read_for_other_data_another_target_or_dtype():
    target = _target()
    cache = StateCache(target)
    batch = make_batch(VOCAB, seed=1)
    cache.fill(_rows(batch), progress=False)
    assert cache.states_for(make_batch(VOCAB, seed=7)) is None  # prompts it does not hold: the live pass runs
    cache.check_target(target)
    with pytest.raises(ValueError, match="holds states of target"):
        cache.check_target(_target(seed=6))  # same config, other weights
    with pytest.raises(ValueError, match="holds states of target"):
        cache.check_target(_target(dtype=torch.float32))


def test_storage_is_planned_by_size(monkeypatch, tmp_path):
    from hyperdas import state_cache

    monkeypatch.setattr(state_cache, "available_memory_bytes", lambda: 10 * 2**30)
    assert plan_storage(2 * 2**30, "auto", tmp_path).storage == "memory"
    free = state_cache.shutil.disk_usage(tmp_path).free
    assert plan_storage(5 * 2**30, "auto", tmp_path).storage == ("disk" if 5 * 2**30 <= 0.5 * free else "off")
    off = plan_storage(10 * free, "auto", tmp_path)
    assert off.storage == "off" and "fits neither memory" in off.reason
    assert plan_storage(1, "off", tmp_path).storage == "off"
    with pytest.raises(ValueError, match="state_cache 'ram'; allowed"):
        plan_storage(1, "ram", tmp_path)


def test_the_cache_sizes_itself_from_the_rows():
    target = _target(dtype=torch.float32)
    rows = [(1, 2, 3), (1, 2, 3), (4, 5)]
    per_token = target.num_states * target.hidden_size * 4
    assert StateCache.bytes_needed(target, rows) == 5 * per_token
