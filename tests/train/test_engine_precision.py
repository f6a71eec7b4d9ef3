"""One owner of precision: the run's ``precision`` picks the dtype, the model enters the one autocast.

The oracle is torch.autocast entered by hand around the model (or not at all), bitwise."""

from __future__ import annotations

import pytest
import torch

from hyperdas.config import HyperDASConfig
from hyperdas.model import HyperDAS
from hyperdas.testing import make_batch
from hyperdas.train.config import RunConfig
from hyperdas.train.engine import PlainEngine


def _model(target) -> HyperDAS:
    torch.manual_seed(0)
    config = HyperDASConfig(target="tiny", intervention_layer=1, das_dimension=3, chop_editor_at_layer=1)
    return HyperDAS(config, target)


@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto"])
def test_the_engine_forward_is_the_model_under_the_runs_autocast(tiny_target, precision):
    model = _model(tiny_target)
    batch = make_batch(len(tiny_target.tokenizer), batch=3, seed=1)
    engine = PlainEngine(model, RunConfig(precision=precision), torch.device("cpu"))
    with torch.no_grad():
        got = engine.forward(batch).logits
        model.compute_dtype = None  # the bare model, with autocast entered by hand as the oracle
        plain = model(batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(batch).logits
    assert not torch.equal(plain, autocast)  # the two oracles differ, so the check below can fail
    expected = autocast if precision == "bf16" else plain  # "auto" is fp32 on CPU
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_bf16_target_autocasts_to_its_dtype_and_a_set_compute_dtype_wins(tiny_target):
    model = _model(tiny_target)
    assert model.compute_dtype is None
    with model.precision_context(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")  # an fp32 target and no run precision: no autocast
    model.compute_dtype = torch.bfloat16
    with model.precision_context(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16), model.precision_context(torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") == torch.float16  # the caller's autocast is left alone
