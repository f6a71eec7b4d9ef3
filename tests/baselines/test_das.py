"""DAS / MDAS baselines: the interchange against a real pyvene IntervenableModel, and the sweep's contract."""

from __future__ import annotations

import pytest
import torch

from hyperdas.baselines.das import LastEntityDAS, full_vector_patch, patched_label_logits
from hyperdas.baselines.sweep import BaselineConfig, run_sweep, train_das
from hyperdas.data.collate import Collator
from hyperdas.data.examples import make_examples
from hyperdas.state_cache import StateCache, real_rows
from hyperdas.targets import build_random_target, position_ids_from_mask
from hyperdas.testing import make_batch, tiny_llama_config

pv = pytest.importorskip("pyvene")
VOCAB = 97
LAYER = 2


@pytest.fixture(scope="module")
def target64():
    return build_random_target(tiny_llama_config(VOCAB), dtype=torch.float64, seed=4)


def _pyvene_label_logits(target, das: LastEntityDAS, batch: dict) -> torch.Tensor:
    """The same intervention through pyvene's own IntervenableModel: block_output of decoder layer LAYER - 1."""
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=LAYER - 1,
                component="block_output",
                unit="pos",
                max_number_of_units=1,
                intervention_type=pv.LowRankRotatedSpaceIntervention,
                low_rank_dimension=das.rank,
            )
        ]
    )
    model = pv.IntervenableModel(config, target.model)
    (intervention,) = model.interventions.values()
    intervention.to(torch.float64).load_state_dict(das.intervention.state_dict())  # pyvene builds it in fp32

    def inputs(name):
        mask = getattr(batch, f"{name}_attention_mask")
        return {
            "input_ids": getattr(batch, f"{name}_input_ids"),
            "attention_mask": mask,
            "position_ids": position_ids_from_mask(mask),
        }

    base_at = [[[int(j)] for j in batch.base_entity_last]]
    source_at = [[[int(i)] for i in batch.source_entity_last]]
    _, out = model(inputs("base"), [inputs("source")], {"sources->base": (source_at, base_at)})
    positions = batch.label_positions
    return out.logits.gather(1, positions[..., None].expand(-1, -1, out.logits.shape[-1])), intervention


def test_the_last_entity_interchange_equals_pyvenes_intervenable_model(target64):
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=4, seed=6)
    torch.manual_seed(0)
    das = LastEntityDAS(target64.hidden_size, 5).double()
    base = target64.hidden_states(batch.base_input_ids, batch.base_attention_mask)[:, :, LAYER]
    source = target64.hidden_states(batch.source_input_ids, batch.source_attention_mask)[:, :, LAYER]
    ours = patched_label_logits(target64, LAYER, das, base, source, batch)
    theirs, intervention = _pyvene_label_logits(target64, das, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    probe = torch.randn(ours.shape, dtype=ours.dtype, generator=torch.Generator().manual_seed(1))
    (ours * probe).sum().backward()
    (theirs * probe).sum().backward()
    ours_grad = das.intervention.rotate_layer.parametrizations.weight.original.grad
    theirs_grad = intervention.rotate_layer.parametrizations.weight.original.grad
    assert ours_grad is not None and ours_grad.abs().max() > 0
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-9, atol=1e-12)
    unpatched = patched_label_logits(target64, LAYER, None, base, source, batch)
    assert not torch.allclose(ours, unpatched)


def test_the_full_vector_patch_writes_the_source_entity_vector_only():
    h, s = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    out = full_vector_patch(h, s, torch.tensor([1, 3]), torch.tensor([0, 2]))
    torch.testing.assert_close(out[0, 1], s[0, 0])
    torch.testing.assert_close(out[1, 3], s[1, 2])
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 1] = keep[1, 3] = False
    assert torch.equal(out[keep], h[keep])


@pytest.fixture(scope="module")
def tiny_run(smollm2):
    target = build_random_target(tiny_llama_config(len(smollm2.tokenizer)), tokenizer=smollm2.tokenizer, seed=2)
    rows = make_examples("city", ["Country", "Continent"], 6, seed=2)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    collator = Collator(smollm2.tokenizer)

    def collate(split, indices):
        return collator([split[i] for i in indices])

    return target, train, test, collate


class _Split(list):
    """A list of rows that also answers split["column"] like a datasets.Dataset."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self]
        return super().__getitem__(key)


def _cache(target, collate, train, test, layers):
    cache = StateCache(target, layers=layers)
    rows = []
    for split in (train, test):
        batch = collate(split, list(range(len(split))))
        rows += real_rows(batch.base_input_ids, batch.base_attention_mask)
        rows += real_rows(batch.source_input_ids, batch.source_attention_mask)
    cache.fill(rows, batch_size=16, progress=False)
    return cache


def test_das_trains_on_causal_examples_only_and_mdas_on_both(tiny_run):
    target, train, test, collate = tiny_run
    train = _Split(train)
    cache = _cache(target, collate, train, _Split(test), [1])
    for method, kinds in (("das", {"causal"}), ("mdas", {"causal", "isolate"})):
        seen = []

        def spying(split, indices, seen=seen):
            seen.extend(split[i]["attribute_type"] for i in indices)
            assert all(split[i]["attribute"] == "Country" for i in indices)
            return collate(split, indices)

        config = BaselineConfig(method=method, layers=[1], rank=4, epochs=2, batch_size=4)
        before = LastEntityDAS(target.hidden_size, 4)
        trained = train_das(target, cache, train, spying, "Country", 1, config)
        assert set(seen) == kinds and len(seen) == 2 * sum(
            r["attribute_type"] in kinds for r in train if r["attribute"] == "Country"
        )
        moved = trained.intervention.rotate_layer.weight.detach()
        assert not torch.allclose(moved, before.intervention.rotate_layer.weight.detach())


def test_the_sweep_reads_the_target_once_per_prompt_and_reports_every_layer(tiny_run):
    target, train, test, collate = tiny_run
    train, test = _Split(train), _Split(test)
    calls = []
    real = target.hidden_states
    target.hidden_states = lambda ids, mask, **kwargs: calls.append(ids.shape[0]) or real(ids, mask, **kwargs)
    try:
        cache = _cache(target, collate, train, test, [1, 2])
        filled = len(calls)
        metrics = run_sweep(
            target,
            train,
            test,
            collate,
            BaselineConfig(method="mdas", layers=[1, 2], rank=4, epochs=1, batch_size=4),
            cache,
            progress=False,
        )
    finally:
        target.hidden_states = real
    assert len(calls) == filled  # training and evaluating both layers ran no further target pass over prompts
    assert list(metrics) == ["floor", "ceiling@L1", "mdas@L1", "ceiling@L2", "mdas@L2"]
    for name in ("mdas@L1", "mdas@L2"):
        assert metrics[name]["seconds"] >= 0
        assert set(metrics[name]["per_attribute"]) == {"Country", "Continent"}
        assert metrics[name]["overall"]["n_causal"] + metrics[name]["overall"]["n_isolate"] == len(test)
    with pytest.raises(ValueError, match="holds layers \\[1, 2\\], the sweep needs \\[3\\]"):
        run_sweep(target, train, test, collate, BaselineConfig(layers=[3]), cache, progress=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "pca"}, "baseline method 'pca'; allowed: ['das', 'mdas']"),
        ({"layers": [0]}, "layer 0 out of range for a 3-layer target: allowed 1..3"),
        ({"layers": [2, 2]}, "layers repeat"),
        ({"rank": 41}, "rank 41 out of range for hidden size 40"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"lr": -1.0}, "lr must be > 0"),
    ],
)
def test_bad_sweeps_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("]", "\\]")):
        BaselineConfig(**({"layers": [1]} | overrides)).validate(num_layers=3, hidden_size=40)
