"""One HyperDAS training step through the three fused kernels equals the plain PyTorch path.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), on a GPU as compiled Triton.
"""

from __future__ import annotations

import pytest
import torch

from hyperdas.config import HyperDASConfig
from hyperdas.model import HyperDAS, LossWeights
from hyperdas.targets import build_random_target
from hyperdas.testing import make_batch, tiny_llama_config

VOCAB = 67


@pytest.mark.parametrize("subspace", ["ReflectSelect", "DAS"])
def test_fused_step_equals_pytorch_step(subspace):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = build_random_target(tiny_llama_config(VOCAB), seed=2).to(device)
    batch = make_batch(VOCAB, batch=3, tb=9, ts=7, te=5).to(device)
    weights = LossWeights(sparsity=0.5)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        config = HyperDASConfig(
            target="tiny",
            intervention_layer=2,
            das_dimension=3,
            chop_editor_at_layer=1,
            subspace_module=subspace,
            use_fused_kernels=fused,
        )
        model = HyperDAS(config, target).to(device)
        out = model(batch, loss_weights=weights)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.trainable_named_parameters()}
        results.append((out.loss.detach(), out.logits.detach(), grads))
    (loss_ref, logits_ref, grads_ref), (loss_fused, logits_fused, grads_fused) = results
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_fused, logits_ref, rtol=1e-4, atol=1e-4)
    assert grads_fused.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        scale = grad.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads_fused[name] / scale, grad / scale, rtol=1e-3, atol=1e-4, msg=name)
