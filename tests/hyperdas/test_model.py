"""HyperDAS's two-pass step against the literal four-pass METHOD.md, and the model's invariants."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hyperdas.compat import LlamaInterpreter, LlamaInterpreterConfig
from hyperdas.config import SELECTION_MODES, HyperDASConfig
from hyperdas.kernels.interchange import interchange
from hyperdas.literal import literal_four_pass_forward
from hyperdas.model import HyperDAS, LossWeights
from hyperdas.targets import EMBEDDED_DEFAULT, build_random_target, load_target
from hyperdas.testing import make_batch, tiny_llama_config

VOCAB = 101


@pytest.fixture(scope="module")
def target64():
    return build_random_target(tiny_llama_config(VOCAB), dtype=torch.float64, seed=1)


def _model(target, **overrides) -> HyperDAS:
    values = {"target": "tiny", "intervention_layer": 2, "das_dimension": 5, "chop_editor_at_layer": 2}
    values.update(overrides)
    torch.manual_seed(0)
    return HyperDAS(HyperDASConfig(**values), target).double()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.trainable_named_parameters() if p.grad is not None}


def _assert_step_equals_literal(model, batch, mode, weights, literal_batch=None, block_masks=None):
    """The two-pass step's loss, logits and every gradient against the literal four-pass path's, run on
    ``literal_batch`` (default: the same batch) with the editor's dropout ``block_masks``. Returns the step's
    output and its gradients ({} where nothing trained is on the path)."""
    out = model(batch, mode=mode, loss_weights=weights)
    literal_batch = batch if literal_batch is None else literal_batch
    loss, logits = literal_four_pass_forward(
        model, literal_batch, mode=mode, loss_weights=weights, block_masks=block_masks
    )
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-10)
    if not loss.requires_grad:
        return out, {}
    out.loss.backward()
    fast = _grads(model)
    model.zero_grad(set_to_none=True)
    loss.backward()
    slow = _grads(model)
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-8, atol=1e-11, msg=name)
    return out, fast


@pytest.mark.parametrize("mode", SELECTION_MODES)
@pytest.mark.parametrize("subspace", ["ReflectSelect", "MaskSelect", "DAS", "full"])
@pytest.mark.parametrize("layer", [0, 2])
def test_two_pass_step_equals_literal_four_pass(target64, subspace, layer, mode, llama_in_float64):
    """Float64 end to end (llama_in_float64 lifts Hugging Face's two float32 shortcuts), so both paths are exact
    up to float64 rounding: ~1e-16 per operation over a few hundred operations, conditioned by a random tiny
    net, stays below 1e-12 relative; the bounds below leave 100x margin and sit 1e6 below any one-line bug."""
    model = _model(target64, subspace_module=subspace, intervention_layer=layer)
    if subspace == "MaskSelect":
        model.set_progress(0.9)  # a temperature of ~5, where the mask is far from σ(0) = 1/2 everywhere
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5)
    weights = LossWeights(causal=3.5, isolate=0.5, sparsity=0.7)
    _, grads = _assert_step_equals_literal(model, batch, mode, weights)
    if not grads:  # "full" with the groundtruth selection: nothing trained is on the path
        assert subspace == "full" and mode == "groundtruth"
    elif mode != "groundtruth":  # a hard mode trains straight through: every part gets the soft A's gradient
        assert grads.keys() == {n for n, _ in model.trainable_named_parameters()}


def test_gradients_reach_every_trained_part(target64):
    model = _model(target64)
    model(make_batch(VOCAB), loss_weights=LossWeights(sparsity=1.0)).loss.backward()
    stuck = [n for n, p in model.trainable_named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not stuck, f"parameters with no gradient: {stuck}"
    parts = ("editor.layers.0.", "editor.layers.1.", "selection_head.", "subspace.rotation.", "subspace.reflector.")
    for prefix in parts:
        assert any(n.startswith(prefix) for n, _ in model.trainable_named_parameters()), prefix
    assert all(p.grad is None for p in model.target.parameters())


@pytest.mark.parametrize("subspace", ["ReflectSelect", "MaskSelect"])
def test_param_groups_give_r_and_the_mask_their_own_rates(target64, subspace):
    """METHOD.md: editor lr with decay for the editor and selection head, R at rotation_lr without decay,
    MaskSelect's mask projection at mask_lr with decay; every trained parameter in exactly one group."""
    model = _model(target64, subspace_module=subspace)
    groups = {g["name"]: g for g in model.param_groups(4e-5, 1e-3, 1e-2, 0.01)}
    names = {id(p): n for n, p in model.trainable_named_parameters()}
    members = {name: sorted(names[id(p)] for p in g["params"]) for name, g in groups.items()}
    everything = sorted(n for n, _ in model.trainable_named_parameters())
    assert sorted(n for group in members.values() for n in group) == everything
    assert members["rotation"] == ["subspace.rotation.weight"]
    assert (groups["rotation"]["lr"], groups["rotation"]["weight_decay"]) == (1e-3, 0.0)
    assert (groups["editor"]["lr"], groups["editor"]["weight_decay"]) == (4e-5, 0.01)
    assert any(n.startswith("selection_head.") for n in members["editor"])
    if subspace == "MaskSelect":
        assert members["mask"] and all(n.startswith("subspace.mask_logits.") for n in members["mask"])
        assert (groups["mask"]["lr"], groups["mask"]["weight_decay"]) == (1e-2, 0.01)
    else:
        assert "mask" not in groups
        assert any(n.startswith("subspace.reflector.") for n in members["editor"])


def test_a_part_declaring_an_unknown_optimizer_group_is_refused(target64):
    model = _model(target64)
    model.selection_head.optimizer_group = "selection"  # not one of the groups the run gives rates to
    with pytest.raises(ValueError, match="declares optimizer group 'selection': allowed"):
        model.param_groups(4e-5, 1e-3, 1e-2, 0.01)


def test_editor_blocks_own_their_weights(target64):
    model = _model(target64)
    storages = {}
    for name, param in model.editor.named_parameters():
        assert param.untyped_storage().data_ptr() not in storages, (name, storages.get(param.data_ptr()))
        storages[param.untyped_storage().data_ptr()] = name
    target_ptrs = {p.untyped_storage().data_ptr() for p in model.target.parameters()}
    assert not target_ptrs & set(storages)


def test_reflect_select_basis_is_orthonormal(target64):
    model = _model(target64, das_dimension=7)
    encoding = torch.randn(4, target64.hidden_size, dtype=torch.float64)
    basis = model.subspace(encoding)
    assert basis.shape == (4, target64.hidden_size, 7)
    eye = torch.eye(7, dtype=torch.float64).expand(4, -1, -1)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, eye, rtol=0, atol=1e-12)
    assert model.subspace.rotation().abs().sum() > 0  # never the all-zero basis of torch.empty


@pytest.fixture(scope="module")
def smollm2_f64():
    """The embedded default in float64 (about 1 GB)."""
    return load_target(EMBEDDED_DEFAULT, dtype=torch.float64)


def test_full_patch_at_every_position_reproduces_the_source_run(smollm2_f64, llama_in_float64):
    """Causal oracle: base and source share a template, entities differ; A maps base j to source j, so patching
    the whole vector at layer k and running layers k..end must give the source run's own logits.

    Both sides are float64 throughout and the same batch-of-1 computation of the source (its states read at
    layer k and continued, against its plain forward), so they agree exactly here. On another CPU (thread
    count, SIMD width, BLAS blocking) each sum may be taken in another order: a batch-of-2 pass against a
    batch-of-1 pass, the largest reordering we can provoke, moves these logits by up to 30 float64 eps of their
    magnitude (6e-14 .. 1.6e-13 at |logit| ~ 24 over 1-2 threads and 3 SIMD widths; in float32 the same
    reordering gives 2.5e-5 .. 1.5e-4, which a 1e-4 bound did not hold). 1e4 eps leaves 300x margin and is
    still 1e10 below the change the entities cause (> 1).
    """
    target = smollm2_f64
    tok = target.tokenizer
    base = tok("Vienna is a city in the country of", return_tensors="pt")
    source = tok("Tokyo is a city in the country of", return_tensors="pt")
    assert base.input_ids.shape == source.input_ids.shape
    t = base.input_ids.shape[1]
    mask = torch.ones(1, t, dtype=torch.long)
    k = 9
    h = target.hidden_states(base.input_ids, mask)[:, :, k]
    s = target.hidden_states(source.input_ids, mask)[:, :, k]
    selection = torch.zeros(1, t + 1, t, dtype=torch.float64)
    selection[0, torch.arange(t), torch.arange(t)] = 1.0
    patched = interchange(h, s, selection, None)
    last = torch.tensor([[t - 1]])
    got = target.run_from_layer(patched, k, mask, last)
    want = target.logits_at(source.input_ids, mask, last)
    ulps = 1e4 * torch.finfo(torch.float64).eps * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=ulps)
    unpatched = target.logits_at(base.input_ids, mask, last)
    assert (unpatched - want).abs().max() > 1.0  # the entities really do change the prediction


def test_save_and_load_round_trip(target64, tmp_path):
    model = _model(target64, subspace_module="MaskSelect")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.save_pretrained(tmp_path)
    loaded = HyperDAS.from_pretrained(tmp_path, target=target64).double()
    batch = make_batch(VOCAB)
    torch.testing.assert_close(model(batch).logits, loaded(batch).logits, rtol=0, atol=0)
    assert not list(tmp_path.glob("*target*"))


def test_a_loaded_mask_select_runs_at_its_saved_temperature(target64, tmp_path):
    """hyperdas eval and the DeepSpeed export load through from_pretrained: at the annealed τ, not at 50."""
    model = _model(target64, subspace_module="MaskSelect")
    model.set_progress(1.0)  # the end of training
    model.save_pretrained(tmp_path)
    loaded = HyperDAS.from_pretrained(tmp_path, target=target64).double()
    assert loaded.subspace.temperature == model.subspace.temperature == pytest.approx(0.1, rel=1e-12)
    batch = make_batch(VOCAB)
    torch.testing.assert_close(loaded(batch).logits, model(batch).logits, rtol=0, atol=0)
    model.set_progress(0.0)
    assert (model(batch).logits - loaded(batch).logits).abs().max() > 1e-6  # τ changes what this model does


def test_mask_select_temperature_anneals_linearly_from_50_to_0_1(target64):
    config = HyperDASConfig()
    assert (config.mask_temperature_start, config.mask_temperature_end) == (50.0, 0.1)  # METHOD.md
    model = _model(target64, subspace_module="MaskSelect")
    for fraction, tau in [(0.0, 50.0), (0.25, 37.525), (0.5, 25.05), (1.0, 0.1), (1.5, 0.1), (-1.0, 50.0)]:
        model.set_progress(fraction)
        assert model.subspace.temperature == pytest.approx(tau, rel=1e-12), fraction


def test_loading_into_another_target_is_a_clear_error(target64, tmp_path):
    _model(target64).save_pretrained(tmp_path)
    other = build_random_target(tiny_llama_config(VOCAB, hidden_size=48, head_dim=8, num_attention_heads=6))
    with pytest.raises(ValueError, match="was trained on target .*hidden size 40"):
        HyperDAS.from_pretrained(tmp_path, target=other)


def test_loading_into_a_mismatched_config_is_a_clear_error(target64, tmp_path):
    _model(target64, das_dimension=5).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match its config"):
        HyperDAS.from_pretrained(tmp_path, target=target64, das_dimension=6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"intervention_layer": 3}, r"intervention_layer 3 is out of range .* allowed 0\.\.2"),
        ({"das_dimension": 41}, r"das_dimension 41 exceeds the target's hidden size 40"),
        ({"subspace_module": "BoundlessDAS"}, r"unknown subspace_module 'BoundlessDAS'"),
        ({"chop_editor_at_layer": 4}, r"chop_editor_at_layer 4 exceeds"),
        (
            {"selectable_base": "suffix"},
            r"unknown selectable_base 'suffix'; allowed: \['prefix', 'entity', 'entity_last'\]",
        ),
        (
            {"selectable_source": "all"},
            r"unknown selectable_source 'all'; allowed: \['prefix', 'entity', 'entity_last'\]",
        ),
        ({"editor_dropout": 1.0}, r"editor_dropout must be in \[0, 1\), got 1.0"),
        ({"num_reflections": 0}, r"num_reflections must be >= 1, got 0"),
        (
            {"num_reflections": 2, "subspace_module": "MaskSelect"},
            r"num_reflections 2 applies to ReflectSelect only, not MaskSelect",
        ),
        ({"editor_dropout": -0.1}, r"editor_dropout must be in \[0, 1\), got -0.1"),
    ],
)
def test_bad_config_is_a_clear_error(target64, overrides, message):
    with pytest.raises(ValueError, match=message):
        _model(target64, **overrides)


def test_unknown_mode_is_a_clear_error(target64):
    with pytest.raises(ValueError, match=r"unknown selection mode 'argmax'"):
        _model(target64)(make_batch(VOCAB), mode="argmax")


def test_the_papers_names_work(target64):
    config = LlamaInterpreterConfig.from_pretrained("tiny")
    config.name_or_path = "tiny"
    config.torch_dtype = torch.float64
    config.num_editing_heads = 5
    config.chop_editor_at_layer = 1
    config.intervention_layer = 1
    config._attn_implementation = "eager"
    config.initialize_from_scratch = True
    interpreter = LlamaInterpreter(config, subspace_module="ReflectSelect", das_dimension=2, target=target64)
    assert interpreter.config.das_dimension == 2 and interpreter.selection_head.num_heads == 5
    assert len(interpreter.editor.layers) == 1
    copied = interpreter.editor.layers[0].mlp.up_proj.weight
    assert not torch.equal(copied.to(torch.float64), target64.layers[0].mlp.up_proj.weight)  # fresh, not copied
    out = interpreter.double()(make_batch(VOCAB))
    assert torch.isfinite(out.loss)


def test_the_editor_ablations_read_what_they_say(target64):
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5)
    states = (
        target64.hidden_states(batch.base_input_ids, batch.base_attention_mask),
        target64.hidden_states(batch.source_input_ids, batch.source_attention_mask),
    )
    g = torch.Generator().manual_seed(3)
    # the editor L2-normalises its keys, so scaling would not change what it reads: add noise instead
    shifted_base = (states[0] + 0.1 * torch.randn(states[0].shape, generator=g, dtype=torch.float64), states[1])
    shifted_source = (states[0], states[1] + 0.1 * torch.randn(states[1].shape, generator=g, dtype=torch.float64))

    def encoding(model, pair):
        with torch.no_grad():
            return model.encode(batch, pair).encoding

    full = _model(target64)
    reads_source = _model(target64, editor_reads="source")
    reads_base = _model(target64, editor_reads="base")
    symmetric = _model(target64, editor_symmetric=True)
    assert reads_source.editor.layers[0].base_attn is None and reads_base.editor.layers[0].source_attn is None
    assert torch.equal(encoding(reads_source, states), encoding(reads_source, shifted_base))  # never sees the base
    assert torch.equal(encoding(reads_base, states), encoding(reads_base, shifted_source))
    for model in (full, symmetric):
        assert not torch.allclose(encoding(model, states), encoding(model, shifted_base))
        assert not torch.allclose(encoding(model, states), encoding(model, shifted_source))
    count = sum(p.numel() for _, p in full.trainable_named_parameters())
    one_block = sum(p.numel() for p in full.editor.layers[0].base_attn.parameters()) + sum(
        p.numel() for p in full.editor.layers[0].base_norm.parameters()
    )
    assert sum(p.numel() for _, p in symmetric.trainable_named_parameters()) == count - 2 * one_block
    with pytest.raises(ValueError, match="editor_symmetric reads both runs"):
        HyperDASConfig(editor_reads="source", editor_symmetric=True).validate()


@pytest.mark.parametrize("mode", ["soft", "column_argmax"])
def test_an_annealed_selection_temperature_matches_the_literal_softmax_of_logits_over_tau(
    target64, mode, llama_in_float64
):
    """The two-pass step sharpens A = softmax(z) to A^(1/τ) / Σ A^(1/τ); the literal path divides its logits z by
    τ before its own softmax. Halfway through an anneal 1 -> 0.25, τ = 0.625."""
    model = _model(target64, selection_temperature_start=1.0, selection_temperature_end=0.25)
    assert model.selection_temperature == 0.25  # a built (or loaded) model selects at the end temperature
    model.set_progress(0.5)
    assert model.selection_temperature == pytest.approx(0.625, rel=1e-12)
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5)
    weights = LossWeights(sparsity=0.7)
    _, grads = _assert_step_equals_literal(model, batch, mode, weights)
    assert grads
    plain = _model(target64)
    plain_out = plain(batch, mode="soft")
    sharp = model(batch, mode="soft")
    assert not torch.allclose(plain_out.selection, sharp.selection)  # τ is really applied


@pytest.mark.parametrize("mode", ["soft", "column_argmax"])
def test_several_reflections_equal_the_literal_product_of_householder_matrices(target64, mode, llama_in_float64):
    """K = 3: the step's W ← W − 2 v_k (v_kᵀ W), k = 1..3, against the literal (B, D, D) product H_3 H_2 H_1 R:
    same loss, logits and every gradient; W keeps orthonormal columns and differs from the one-reflection W."""
    model = _model(target64, num_reflections=3)
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5)
    _, grads = _assert_step_equals_literal(model, batch, mode, LossWeights(causal=3.5, isolate=0.5, sparsity=0.7))
    assert grads.keys() == {n for n, _ in model.trainable_named_parameters()}
    with torch.no_grad():
        encoding = torch.randn(4, target64.hidden_size, dtype=torch.float64)
        w = model.subspace(encoding)
        rotation = model.subspace.rotation()
        v = model.subspace.reflection(encoding)[:, : target64.hidden_size]  # v_1
        first_only = rotation[None] - 2.0 * v[:, :, None] * (v @ rotation)[:, None, :]
    torch.testing.assert_close(w.transpose(1, 2) @ w, torch.eye(5, dtype=torch.float64).expand(4, 5, 5))
    assert (w - first_only).abs().max() > 1e-3  # the later reflections do act


@pytest.mark.parametrize(
    ("subspace", "reflections", "mode"),
    [("ReflectSelect", 1, "soft"), ("ReflectSelect", 2, "column_argmax"), ("DAS", 1, "soft")],
)
def test_one_basis_per_attribute_equals_the_literal_step_with_each_examples_own_basis(
    target64, subspace, reflections, mode, llama_in_float64
):
    """basis_per_attribute: W = H_K ··· H_1 R_a, R_a the basis of the attribute the example's instruction names,
    against the literal path, which orthonormalises each basis by Gram-Schmidt and picks it by name: same loss,
    logits, every gradient. The basis of an attribute no example asks gets no gradient; the others do."""
    attributes = ["Continent", "Country", "Language"]
    model = _model(
        target64,
        subspace_module=subspace,
        num_reflections=reflections,
        basis_per_attribute=True,
        basis_attributes=attributes,
    )
    assert model.subspace.rotation.weight.shape == (3, target64.hidden_size, 5)
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5)
    batch.attribute = ["Language", "Continent", "Language"]
    _, grads = _assert_step_equals_literal(model, batch, mode, LossWeights(causal=3.5, isolate=0.5, sparsity=0.7))
    bank = grads["subspace.rotation.weight"]  # (3, D, r)
    assert bank[1].abs().max() == 0  # Country: asked by no example
    assert bank[0].abs().max() > 0 and bank[2].abs().max() > 0
    with torch.no_grad():
        encoding = torch.randn(3, target64.hidden_size, dtype=torch.float64)
        rotations = model.subspace.rotation()  # (3, D, r), each orthonormal
        w = model.subspace(encoding, torch.tensor([0, 1, 2]))
        w_same = model.subspace(encoding, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(rotations.transpose(1, 2) @ rotations, torch.eye(5, dtype=torch.float64).expand(3, 5, 5))
    torch.testing.assert_close(w[0], w_same[0])  # the same attribute, the same W
    assert (w[1:] - w_same[1:]).abs().max() > 1e-3  # another attribute's basis gives another W


def test_per_attribute_bases_refuse_what_they_cannot_route(target64, tmp_path):
    """A batch without attributes, or with one that has no basis, is refused before any work; the bases and
    their attributes survive save and load."""
    with pytest.raises(ValueError, match="basis_per_attribute needs basis_attributes"):
        _model(target64, basis_per_attribute=True)
    model = _model(target64, basis_per_attribute=True, basis_attributes=["Country", "Language"])
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5)
    batch.attribute = None
    with pytest.raises(ValueError, match="one basis per attribute \\(Country, Language\\): the batch must say"):
        model(batch)
    batch.attribute = ["Country", "Continent", "Language"]
    with pytest.raises(ValueError, match="keeps bases for Country, Language; the batch asks for Continent"):
        model(batch)
    batch.attribute = ["Country", "Language", "Language"]
    out = model(batch)
    model.save_pretrained(tmp_path / "m")
    loaded = HyperDAS.from_pretrained(tmp_path / "m", target=target64)
    assert loaded.config.basis_attributes == ["Country", "Language"]
    torch.testing.assert_close(loaded(batch).logits, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"basis_per_attribute": True, "basis_attributes": ["Country"], "subspace_module": "MaskSelect"},
            r"basis_per_attribute applies to ReflectSelect and DAS .* not MaskSelect",
        ),
        ({"basis_attributes": ["Country"]}, r"basis_attributes \['Country'\] given without basis_per_attribute"),
        (
            {"basis_per_attribute": True, "basis_attributes": ["Country", "Country"]},
            r"basis_attributes must name distinct attributes",
        ),
        ({"basis_per_attribute": True, "basis_attributes": []}, r"basis_attributes must name distinct attributes"),
    ],
)
def test_bad_per_attribute_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        HyperDASConfig(target="tiny", **overrides).validate()


class _GivenMasks(torch.nn.Module):
    """Stands in for a layer's dropout: multiplies each block's output by the next of the given masks."""

    def __init__(self, masks):
        super().__init__()
        self.masks = iter(masks)

    def forward(self, x):
        return x * next(self.masks)


def test_editor_dropout_drops_every_blocks_output_before_the_residual_and_only_in_training(target64, llama_in_float64):
    """With each layer's dropout replaced by known masks (zeros and 1/(1-p), as nn.Dropout draws them), the step
    equals the literal step that multiplies each block's output by the same mask before adding it to the
    residual: same loss, logits and every gradient. nn.Dropout itself is live in train() and off in eval(),
    where the model equals one built without dropout."""
    p = 0.4
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5)
    weights = LossWeights(causal=3.5, isolate=0.5, sparsity=0.7)
    model = _model(target64, editor_dropout=p)
    assert all(layer.dropout.p == p for layer in model.editor.layers)
    g = torch.Generator().manual_seed(5)
    width = target64.hidden_size
    blocks = 4 * len(model.editor.layers)  # self-attention, source, base, MLP
    masks = [(torch.rand(3, 5, width, generator=g) >= p).double() / (1 - p) for _ in range(blocks)]
    for i, layer in enumerate(model.editor.layers):
        layer.dropout = _GivenMasks(masks[4 * i : 4 * i + 4])
    _, grads = _assert_step_equals_literal(model, batch, "soft", weights, block_masks=masks)
    assert grads.keys() == {n for n, _ in model.trainable_named_parameters()}
    plain_loss = _model(target64)(batch, loss_weights=weights).loss
    dropping = _model(target64, editor_dropout=p)
    torch.manual_seed(1)
    first = dropping(batch, loss_weights=weights).loss
    torch.manual_seed(2)
    assert not torch.allclose(first, dropping(batch, loss_weights=weights).loss)  # drawn anew each step
    dropping.eval()
    torch.testing.assert_close(dropping(batch, loss_weights=weights).loss, plain_loss, rtol=0, atol=0)


def _cut_to_entities(batch, run: str, last_only: bool = False) -> torch.Tensor:
    """The run's intervention mask cut to its entity span (or its last token), position by position (not by the
    code under test)."""
    allowed = getattr(batch, f"{run}_intervention_mask")
    first, last = getattr(batch, f"{run}_entity_first"), getattr(batch, f"{run}_entity_last")
    cut = torch.zeros_like(allowed)
    for b in range(allowed.shape[0]):
        for j in range(allowed.shape[1]):
            lowest = int(last[b]) if last_only else int(first[b])
            cut[b, j] = bool(allowed[b, j]) and lowest <= j <= int(last[b])
    return cut


@pytest.mark.parametrize("mode", ["soft", "bidding_argmax"])
@pytest.mark.parametrize(
    ("base_scope", "source_scope"),
    [
        ("entity", "prefix"),
        ("prefix", "entity"),
        ("entity", "entity"),
        ("entity_last", "entity"),
        ("prefix", "entity_last"),
    ],
)
def test_an_entity_scoped_step_equals_the_literal_step_on_masks_cut_to_the_entities(
    target64, mode, base_scope, source_scope, llama_in_float64
):
    """selectable_base / selectable_source = entity (entity_last) is the literal METHOD.md step with that run's
    intervention mask cut to its entity's tokens (its last one; entities of 1, 2 and 3 tokens); the literal path
    reads the cut masks for the editor's keys, the head and the patch alike."""
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5)
    batch.base_entity_first = batch.base_entity_last - torch.tensor([0, 1, 2])
    batch.source_entity_first = batch.source_entity_last - torch.tensor([2, 0, 1])
    scopes = {"base": base_scope, "source": source_scope}
    cut = {
        run: getattr(batch, f"{run}_intervention_mask")
        if scope == "prefix"
        else _cut_to_entities(batch, run, last_only=scope == "entity_last")
        for run, scope in scopes.items()
    }
    assert _cut_to_entities(batch, "base").sum(dim=1).tolist() == [1, 2, 3]
    assert _cut_to_entities(batch, "source").sum(dim=1).tolist() == [3, 1, 2]
    model = _model(target64, selectable_base=base_scope, selectable_source=source_scope)
    weights = LossWeights(causal=3.5, isolate=0.5, sparsity=0.7)
    masked = dataclasses.replace(batch, base_intervention_mask=cut["base"], source_intervention_mask=cut["source"])
    out, grads = _assert_step_equals_literal(model, batch, mode, weights, literal_batch=masked)
    assert grads.keys() == {n for n, _ in model.trainable_named_parameters()}
    keeps = out.selection[:, -1]  # (B, Tb): the SELF row; 1 wherever nothing is written
    written = cut["base"].bool()
    assert torch.equal(keeps[~written], torch.ones_like(keeps[~written]))
    taken = out.selection[:, :-1].sum(dim=2)  # (B, Ts): what each source token gives
    assert torch.equal(taken[~cut["source"].bool()], torch.zeros_like(taken[~cut["source"].bool()]))
    if mode == "soft":  # a hard mode may keep an entity token too
        assert (keeps[written] < 1).all() and (taken[cut["source"].bool()] > 0).all()
    prefix = _model(target64)(batch, mode=mode, loss_weights=weights)
    assert not torch.allclose(prefix.loss, out.loss)  # the scope changes what is patched
    for run, scope in scopes.items():
        if scope == "entity_last":  # one token per row, the one MDAS patches
            assert torch.equal(cut[run].sum(dim=1), torch.ones(3, dtype=cut[run].dtype))
    run = "base" if base_scope != "prefix" else "source"
    setattr(batch, f"{run}_entity_last", None)
    with pytest.raises(ValueError, match=f"no {run} entity positions"):
        model(batch, mode=mode)


def test_an_attribute_the_model_was_not_trained_on_is_refused(target64, tmp_path):
    """The instruction routes by attribute name: an attribute never seen in training is an error, not a guess."""
    model = _model(target64, trained_attributes=["Country", "Language"])
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5)
    batch.attribute = ["Country", "Language", "Country"]
    model(batch)  # trained attributes pass
    batch.attribute = ["Country", "Continent", "Timezone"]
    with pytest.raises(ValueError, match="localise Country, Language; the batch asks for Continent, Timezone"):
        model(batch)
    with pytest.raises(ValueError, match="asks for Continent"):
        model.evaluate_batch(batch, ["soft"])
    model.save_pretrained(tmp_path / "m")
    loaded = HyperDAS.from_pretrained(tmp_path / "m", target=target64)
    assert loaded.config.trained_attributes == ["Country", "Language"]
    with pytest.raises(ValueError, match="trained_attributes must be a list"):
        HyperDASConfig(target="tiny", trained_attributes="Country")


def test_the_editors_copied_attention_follows_its_own_weights(smollm2):
    """The editor's self-attention layers are copies with their own config: they take the kernel for the
    editor's device and dtype (eager for fp32 on CPU, SDPA for float64), and follow them when they change."""
    target = build_random_target(tiny_llama_config(len(smollm2.tokenizer)), tokenizer=smollm2.tokenizer)
    config = HyperDASConfig(target="tiny", intervention_layer=1, das_dimension=3, chop_editor_at_layer=2)
    model = HyperDAS(config, target)

    def kernels():
        return {layer.self_attn.config._attn_implementation for layer in model.editor.layers}

    assert kernels() == {"eager"}  # the fp32 editor on CPU runs eager, as "auto" says
    model.double()
    assert kernels() == {"sdpa"} and target.config._attn_implementation == "sdpa"
    model.float()
    assert kernels() == {"eager"}
