"""What the three fused ops share (hyperdas.kernels.common): one switch, one error type, one RoPE.

Each op is called through its functional form and its module with tiny CPU inputs; the numbers are checked in
the op's own test file, here only which path runs and what a path that cannot run raises.
"""

from __future__ import annotations

import math

import pytest
import torch

from hyperdas.kernels import FusedSelectionHead, Interchange, KernelUnavailableError, NormalizedCrossAttention
from hyperdas.kernels.common import apply_rope, rope_cos_sin
from hyperdas.kernels.modules import fused_selection_head, interchange, normalized_cross_attention


def op_inputs(dtype: torch.dtype) -> dict:
    """Per op: (function, module class, positional arguments) at a tiny shape, floating tensors in dtype."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    B, Tb, Ts, D, H, hd = 2, 3, 4, 8, 2, 4
    A = torch.softmax(torch.randn(B, Ts + 1, Tb, generator=g), dim=1).to(dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ones = torch.ones
    return {
        "interchange": (interchange, Interchange, (randn(B, Tb, D), randn(B, Ts, D), A, randn(B, D, 3))),
        "selection head": (
            fused_selection_head,
            FusedSelectionHead,
            (randn(B, Tb, H, hd), randn(B, Ts, H, hd), randn(B, Tb, H, hd), randn(B, H, hd))
            + (torch.arange(Tb).expand(B, Tb), torch.tensor([1, 2]), inv_freq)
            + (ones(B, Tb, dtype=torch.bool), ones(B, Ts, dtype=torch.bool)),
        ),
        "cross-attention": (
            normalized_cross_attention,
            NormalizedCrossAttention,
            (randn(B, H, 3, hd), randn(B, 1, 5, hd), randn(B, 1, 5, hd), ones(B, 5, dtype=dtype))
            + (torch.arange(3).expand(B, 3), torch.arange(5).expand(B, 5), inv_freq, ones(B, 5, dtype=torch.bool)),
        ),
    }


OPS = ("interchange", "selection head", "cross-attention")


@pytest.mark.parametrize("op", OPS)
def test_the_switch_takes_true_false_or_none_only(op):
    function, module, args = op_inputs(torch.float32)[op]
    with pytest.raises(ValueError, match="use_triton must be True, False or None"):
        function(*args, use_triton="triton")
    with pytest.raises(ValueError, match="use_triton must be True, False or None"):
        module(use_triton=1)
    assert "use_triton=False" in repr(module(use_triton=False))


@pytest.mark.parametrize("op", OPS)
def test_forced_triton_on_cpu_without_the_interpreter_is_kernel_unavailable(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    function, module, args = op_inputs(torch.float32)[op]
    with pytest.raises(KernelUnavailableError, match=f"the Triton {op} needs CUDA tensors"):
        function(*args, use_triton=True)
    with pytest.raises(KernelUnavailableError, match="use use_triton=False on CPU"):
        module(use_triton=True)(*args)
    assert issubclass(KernelUnavailableError, ValueError)  # the command line reports ValueErrors in one line


@pytest.mark.parametrize("op", OPS)
def test_forced_triton_in_float64_is_kernel_unavailable_and_auto_takes_pytorch(op):
    function, _, args = op_inputs(torch.float64)[op]
    with pytest.raises(KernelUnavailableError, match="supports float32, bfloat16 and float16, got torch.float64"):
        function(*args, use_triton=True)
    assert function(*args).dtype in (torch.float64, torch.float32)  # None on CPU: the PyTorch path runs


def test_rope_by_hand_and_its_transpose_undoes_it():
    """x = (1, 0, 0, 2) at p = 1 with inv_freq = (π/2, π): pair (1, 0) turns by 90°, pair (0, 2) by 180°."""
    x = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.tensor(1), torch.tensor([math.pi / 2, math.pi], dtype=torch.float64), torch.float64)
    expected = torch.tensor([0.0, 0.0, 1.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=0, atol=1e-15)
    y = torch.randn(3, 5, 8, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.randint(-9, 40, (3, 5)), torch.rand(4, dtype=torch.float64), torch.float64)
    torch.testing.assert_close(apply_rope(apply_rope(y, cos, sin), cos, -sin), y, rtol=0, atol=1e-13)
