"""The fused pyvene drop-in against pyvene's own LowRankRotatedSpaceIntervention inside a real
IntervenableModel on a tiny random Llama: same logits and same gradient of the rotation weight."""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

pv = pytest.importorskip("pyvene")


from hyperdas.kernels.pyvene_intervention import FusedLowRankRotatedSpaceIntervention  # noqa: E402
from hyperdas.testing import tiny_llama_config  # noqa: E402

VOCAB = 97


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(VOCAB)).eval()


def run_pair(llama, representation: dict, locations, subspaces=None, use_triton: bool | None = True):
    """Run pyvene's class and the fused class with identical weights; return (logits, grad of R) of each."""
    results = []
    reference_state = None
    for cls in (pv.LowRankRotatedSpaceIntervention, FusedLowRankRotatedSpaceIntervention):
        config = pv.IntervenableConfig(representations=[dict(representation)], intervention_types=cls)
        model = pv.IntervenableModel(config, copy.deepcopy(llama))
        intervention = next(iter(model.interventions.values()))
        if reference_state is None:
            reference_state = intervention.state_dict()
        else:
            intervention.load_state_dict(reference_state)
            intervention.use_triton = use_triton
        gen = torch.Generator().manual_seed(3)
        base = torch.randint(0, VOCAB, (3, 9), generator=gen)
        source = torch.randint(0, VOCAB, (3, 9), generator=gen)
        kwargs = {} if subspaces is None else {"subspaces": subspaces}
        _, out = model({"input_ids": base}, [{"input_ids": source}], locations, **kwargs)
        weights = torch.randn(out.logits.shape, generator=gen)
        (out.logits * weights).sum().backward()
        grad = intervention.rotate_layer.parametrizations.weight.original.grad
        results.append((out.logits.detach(), grad))
    return results


def assert_same(results) -> None:
    (ref_logits, ref_grad), (logits, grad) = results
    assert grad is not None and torch.isfinite(grad).all()
    assert ref_grad.abs().max() > 0  # the intervention really reaches the logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_triton", [True, False])
def test_single_position_matches_pyvene(llama, use_triton):
    representation = {"layer": 1, "component": "block_output", "low_rank_dimension": 5}
    locations = {"sources->base": ([[[2], [6], [1]]], [[[4], [3], [8]]])}
    assert_same(run_pair(llama, representation, locations, use_triton=use_triton))


def test_two_positions_concatenated_matches_pyvene(llama):
    """max_number_of_units=2: pyvene rotates the two positions' states jointly (E = 2 D)."""
    representation = {"layer": 2, "component": "block_output", "low_rank_dimension": 3, "max_number_of_units": 2}
    locations = {"sources->base": ([[[1, 5]] * 3], [[[2, 7]] * 3])}
    assert_same(run_pair(llama, representation, locations))


def test_per_example_subspaces_match_pyvene(llama):
    """Different column groups of R per example (pyvene's subspace_partition)."""
    representation = {
        "layer": 0,
        "component": "block_output",
        "low_rank_dimension": 5,
        "subspace_partition": [[0, 2], [2, 4]],
    }
    locations = {"sources->base": ([[[3]] * 3], [[[5]] * 3])}
    assert_same(run_pair(llama, representation, locations, subspaces=[[[0], [1], [0]]]))


def test_missing_pyvene_gives_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvene.models.interventions", None)
    monkeypatch.delitem(sys.modules, "hyperdas.kernels.pyvene_intervention")
    with pytest.raises(ImportError, match="pip install --no-deps pyvene"):
        importlib.import_module("hyperdas.kernels.pyvene_intervention")
