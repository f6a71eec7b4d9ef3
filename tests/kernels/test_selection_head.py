"""Selection head: the naive oracle against hand computations, and both fast paths against the oracle.

On CPU the Triton path runs through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); it
computes in float32 and is compared with the float64 oracle. Every Triton output buffer is poisoned with NaN
before the kernels write it, so an entry a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

from hyperdas.kernels import common
from hyperdas.kernels import selection_head as sh
from hyperdas.kernels.selection_head import FusedSelectionHead, fused_selection_head
from hyperdas.kernels.selection_head_reference import rope_rotate, selection_head_naive, selection_head_torch

# (B, Ts, Tb, H, hd): Tb != Ts, odd head counts, hd/2 not a multiple of the pair tile, the embedded default's
# 9 x 64 heads, and more source rows / base columns than one tile holds once the tiles are lowered to 16.
SHAPES = [(2, 5, 7, 3, 8), (1, 4, 3, 9, 64), (2, 37, 41, 3, 6)]
KEYS = ("base_keys", "source_keys", "self_keys", "query")


def make_inputs(B, Ts, Tb, H, hd, dtype=torch.float64, seed=0, device="cpu", p_mask=0.25):
    """Fresh random inputs in the contract's order; keys and query require grad."""
    gen = torch.Generator().manual_seed(seed)
    base_keys = torch.randn(B, Tb, H, hd, generator=gen, dtype=torch.float64)
    source_keys = torch.randn(B, Ts, H, hd, generator=gen, dtype=torch.float64)
    self_keys = torch.randn(B, Tb, H, hd, generator=gen, dtype=torch.float64)
    query = 2.0 * torch.randn(B, H, hd, generator=gen, dtype=torch.float64)
    positions = torch.randint(0, 3 * Tb + 5, (B, Tb), generator=gen)
    query_positions = torch.randint(0, 2 * Tb + 3, (B,), generator=gen)  # the last instruction token's, per row
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    base_mask = torch.rand(B, Tb, generator=gen) >= p_mask
    source_mask = torch.rand(B, Ts, generator=gen) >= p_mask
    keys = [t.to(device=device, dtype=dtype).requires_grad_() for t in (base_keys, source_keys, self_keys, query)]
    rest = [t.to(device) for t in (positions, query_positions, inv_freq, base_mask, source_mask)]
    return keys + rest


def as_reference(args):
    """The same inputs as float64 leaves (the oracle's copy)."""
    return [t.detach().double().requires_grad_() if i < 4 else t for i, t in enumerate(args)]


def value_and_grads(fn, args, weight):
    """A = fn(*args) and the gradients of Σ weight ⊙ A with respect to the four key/query tensors."""
    scores = fn(*args)
    grads = torch.autograd.grad((scores * weight.to(scores.dtype)).sum(), args[:4])
    return scores, grads


def assert_close_scaled(actual, expected, rtol, name):
    """|actual - expected| <= rtol * max|expected| (+ a tiny floor), with a message naming the tensor."""
    actual, expected = actual.double(), expected.double()
    assert not torch.isnan(actual).any(), f"{name}: NaN (an entry the kernel never wrote?)"
    err = (actual - expected).abs().max().item()
    bound = rtol * expected.abs().max().item() + 1e-12
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every Triton output buffer with NaN before the kernels write it."""

    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(common, "empty_buffer", nan_alloc)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles on every axis, so the small CPU shapes still span several tiles."""
    for name in ("BLOCK_I_MAX", "BLOCK_J_MAX", "BLOCK_F_MAX"):
        monkeypatch.setattr(sh, name, 16)


def triton_head(*args):
    return fused_selection_head(*args, use_triton=True)


# ---------------------------------------------------------------------------------------------------------
# The oracle itself
# ---------------------------------------------------------------------------------------------------------


def test_naive_by_hand():
    """B=1, Ts=1, Tb=2, H=1, hd=2, inv_freq=π/2: column 0 unrotated, column 1 rotated by 90°."""
    base_keys = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    source_keys = torch.tensor([[[[0.0, 5.0]]]], dtype=torch.float64)  # (1, 1, 1, 2)
    self_keys = torch.tensor([[[[0.0, 0.0]], [[0.0, -2.0]]]], dtype=torch.float64)
    query = torch.tensor([[[math.sqrt(2.0), 0.0]]], dtype=torch.float64)  # logit = first coordinate of R k
    positions = torch.tensor([[0, 1]])
    inv_freq = torch.tensor([math.pi / 2], dtype=torch.float64)
    both = torch.tensor([[True, True]])
    scores = selection_head_naive(
        base_keys, source_keys, self_keys, query, positions, torch.tensor([0]), inv_freq, both, torch.tensor([[True]])
    )
    # column 0: K = (1, 5) -> logit 1; SELF (0, 0) -> 0.  column 1: R(0, 5) = (-5, 0) -> -5; R(0, -2) = (2, 0) -> 2
    e = math.e
    expected = torch.tensor(
        [
            [
                [e / (1 + e), math.exp(-5) / (math.exp(-5) + math.exp(2))],
                [1 / (1 + e), math.exp(2) / (math.exp(-5) + math.exp(2))],
            ]
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    rotated = rope_rotate(torch.tensor([[[0.0, 5.0]]], dtype=torch.float64), torch.tensor([1]), inv_freq)
    torch.testing.assert_close(rotated, torch.tensor([[[-5.0, 0.0]]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_query_is_rotated_at_its_own_position_by_hand():
    """q = (√2, 0) at query position 1 with inv_freq = π/2 is RoPE'd to (0, √2): it now reads the key's SECOND
    coordinate. Key (1, 5) at base position 0: logit 5·√2/√2 = 5 (an unrotated query would give 1)."""
    base_keys = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)  # (1, 1, 1, 2)
    source_keys = torch.tensor([[[[0.0, 5.0]]]], dtype=torch.float64)
    self_keys = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    query = torch.tensor([[[math.sqrt(2.0), 0.0]]], dtype=torch.float64)
    inv_freq = torch.tensor([math.pi / 2], dtype=torch.float64)
    args = (
        base_keys,
        source_keys,
        self_keys,
        query,
        torch.tensor([[0]]),
        torch.tensor([1]),
        inv_freq,
        torch.tensor([[True]]),
        torch.tensor([[True]]),
    )
    e5 = math.exp(5.0)
    expected = torch.tensor([[[e5 / (1 + e5)], [1 / (1 + e5)]]], dtype=torch.float64)
    for path in (selection_head_naive, selection_head_torch):
        torch.testing.assert_close(path(*args), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["naive", "torch"])
def test_logits_depend_on_base_minus_query_position_only(path):
    """RoPE on both sides: shifting every base position and the query position by the same amount changes
    nothing, and moving the query alone changes A (so the query really is rotated)."""
    fn = {"naive": selection_head_naive, "torch": selection_head_torch}[path]
    args = [t.detach() for t in make_inputs(2, 5, 7, 3, 8, seed=14)]
    shifted = list(args)
    shifted[4], shifted[5] = args[4] + 11, args[5] + 11
    torch.testing.assert_close(fn(*shifted), fn(*args), rtol=1e-10, atol=1e-12)
    moved = list(args)
    moved[5] = args[5] + 3
    assert (fn(*moved) - fn(*args)).abs().max() > 1e-3


def explicit_loop(
    base_keys, source_keys, self_keys, query, positions, query_positions, inv_freq, base_mask, source_mask
):
    """The selection head with python loops and 2-D rotations of each RoPE pair (f, f + hd/2), q and K alike."""

    def rotate(x1, x2, angle):
        return x1 * math.cos(angle) - x2 * math.sin(angle), x2 * math.cos(angle) + x1 * math.sin(angle)

    B, Tb, H, hd = base_keys.shape
    Ts = source_keys.shape[1]
    half = hd // 2
    out = torch.zeros(B, Ts + 1, Tb, dtype=torch.float64)
    for b in range(B):
        for j in range(Tb):
            logits = []
            for i in range(Ts + 1):
                key = self_keys[b, j] if i == Ts else base_keys[b, j] + source_keys[b, i]
                total = 0.0
                for h in range(H):
                    for f in range(half):
                        r1, r2 = rotate(
                            float(key[h, f]), float(key[h, f + half]), float(positions[b, j]) * float(inv_freq[f])
                        )
                        q1, q2 = rotate(
                            float(query[b, h, f]),
                            float(query[b, h, f + half]),
                            float(query_positions[b]) * float(inv_freq[f]),
                        )
                        total += q1 * r1 + q2 * r2
                selectable = i == Ts or (bool(source_mask[b, i]) and bool(base_mask[b, j]))
                logits.append(total / H / math.sqrt(hd) if selectable else -math.inf)
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            for i, w in enumerate(weights):
                out[b, i, j] = w / sum(weights)
    return out


def test_naive_matches_explicit_loop():
    args = [t.detach() for t in make_inputs(2, 3, 4, 2, 6, p_mask=0.3, seed=3)]
    torch.testing.assert_close(selection_head_naive(*args), explicit_loop(*args), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Fast paths against the oracle
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_naive_float64(shape):
    args = make_inputs(*shape, seed=1)
    ref = as_reference(args)
    weight = torch.randn(shape[0], shape[1] + 1, shape[2], dtype=torch.float64)
    scores, grads = value_and_grads(selection_head_torch, args, weight)
    expected, expected_grads = value_and_grads(selection_head_naive, ref, weight)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
    for name, grad, want in zip(KEYS, grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_naive(shape, poisoned, small_tiles):
    args = make_inputs(*shape, dtype=torch.float32, seed=2)
    weight = torch.randn(shape[0], shape[1] + 1, shape[2], dtype=torch.float64)
    scores, grads = value_and_grads(triton_head, args, weight)
    expected, expected_grads = value_and_grads(selection_head_naive, as_reference(args), weight)
    assert scores.dtype == torch.float32 and scores.shape == expected.shape
    assert_close_scaled(scores, expected, 1e-5, "A")
    for name, grad, want in zip(KEYS, grads, expected_grads, strict=True):
        assert grad.dtype == torch.float32
        assert_close_scaled(grad, want, 1e-5, name)


def test_triton_default_tiles():
    """The production tile sizes (several RoPE pairs tiles for 9 x 64 heads, one row / column tile)."""
    args = make_inputs(2, 6, 5, 9, 64, dtype=torch.float32, seed=4)
    weight = torch.randn(2, 7, 5, dtype=torch.float64)
    scores, grads = value_and_grads(triton_head, args, weight)
    expected, expected_grads = value_and_grads(selection_head_naive, as_reference(args), weight)
    assert_close_scaled(scores, expected, 1e-5, "A")
    for name, grad, want in zip(KEYS, grads, expected_grads, strict=True):
        assert_close_scaled(grad, want, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_inputs(dtype, poisoned):
    """Half-precision keys: fp32 scores, gradients in the input dtype, against the oracle on the same values."""
    args = make_inputs(2, 5, 7, 3, 8, dtype=dtype, seed=5)
    weight = torch.randn(2, 6, 7, dtype=torch.float64)
    scores, grads = value_and_grads(triton_head, args, weight)
    expected, expected_grads = value_and_grads(selection_head_naive, as_reference(args), weight)
    assert scores.dtype == torch.float32
    assert_close_scaled(scores, expected, 1e-5, "A")
    for name, grad, want in zip(KEYS, grads, expected_grads, strict=True):
        assert grad.dtype == dtype
        assert_close_scaled(grad, want, 2e-2, name)


def test_triton_partial_gradients(poisoned):
    """Only some inputs need grad (frozen source keys): the others match and source_keys gets none."""
    args = make_inputs(1, 5, 7, 3, 8, dtype=torch.float32, seed=6)
    args[1] = args[1].detach()
    weight = torch.randn(1, 6, 7, dtype=torch.float64)
    scores = triton_head(*args)
    (scores * weight.float()).sum().backward()
    ref = as_reference(args)
    (selection_head_naive(*ref) * weight).sum().backward()
    assert args[1].grad is None
    for i in (0, 2, 3):
        assert_close_scaled(args[i].grad, ref[i].grad, 1e-5, KEYS[i])


def test_triton_sum_has_zero_gradient(poisoned):
    """Columns sum to 1 whatever the inputs, so Σ A has zero gradient (an expanded, stride-0 dA)."""
    args = make_inputs(2, 5, 7, 3, 8, dtype=torch.float32, seed=7)
    grads = torch.autograd.grad(triton_head(*args).sum(), args[:4])
    for name, grad in zip(KEYS, grads, strict=True):
        assert grad.abs().max().item() < 1e-6, name


# ---------------------------------------------------------------------------------------------------------
# Masking and normalisation, on every path
# ---------------------------------------------------------------------------------------------------------

PATHS = {
    "naive": selection_head_naive,
    "torch": selection_head_torch,
    "triton": triton_head,
}


@pytest.mark.parametrize("path", PATHS)
def test_masks_and_column_sums(path, poisoned):
    B, Ts, Tb = 2, 5, 7
    args = make_inputs(B, Ts, Tb, 3, 8, dtype=torch.float32, seed=8, p_mask=0.0)
    base_mask, source_mask = args[7], args[8]
    base_mask[0, 2] = False  # a fully masked base column
    base_mask[1, 6] = False
    source_mask[0, 1] = False  # a fully masked source row
    source_mask[1, :] = False  # a batch row with no selectable source at all
    scores = PATHS[path](*args).detach()
    assert scores.shape == (B, Ts + 1, Tb) and not torch.isnan(scores).any()
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(B, Tb, dtype=scores.dtype), rtol=0, atol=1e-6)
    assert scores[0, Ts, 2].item() == 1.0 and scores[1, Ts, 6].item() == 1.0
    assert (scores[0, :Ts, 2] == 0).all() and (scores[1, :Ts, 6] == 0).all()
    assert (scores[0, 1] == 0).all()
    assert (scores[1, Ts] == 1).all() and (scores[1, :Ts] == 0).all()
    assert (scores[0, 0] > 0).any()


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_masked_entries_get_no_gradient_path(path, poisoned):
    """Masked source rows receive exactly zero gradient; a fully masked column gives its keys none."""
    args = make_inputs(1, 5, 7, 3, 8, dtype=torch.float32, seed=9, p_mask=0.0)
    args[8][0, 3] = False
    args[7][0, 4] = False
    weight = torch.randn(1, 6, 7)
    grads = torch.autograd.grad((PATHS[path](*args) * weight).sum(), args[:4])
    assert (grads[1][0, 3] == 0).all()
    assert (grads[0][0, 4] == 0).all() and (grads[2][0, 4] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Dispatch, module, errors
# ---------------------------------------------------------------------------------------------------------


def test_dispatch_and_module_on_cpu():
    args = [t.detach() for t in make_inputs(2, 5, 7, 3, 8, dtype=torch.float32, seed=10)]
    expected = selection_head_torch(*args)
    torch.testing.assert_close(fused_selection_head(*args), expected, rtol=0, atol=0)
    torch.testing.assert_close(FusedSelectionHead()(*args), expected, rtol=0, atol=0)
    torch.testing.assert_close(FusedSelectionHead(use_triton=True)(*args), expected, rtol=0, atol=1e-6)


def test_clear_errors():
    args = [t.detach() for t in make_inputs(2, 5, 7, 3, 8, dtype=torch.float32, seed=11)]
    bad = list(args)
    bad[1] = args[1][:, :, :2]
    with pytest.raises(ValueError, match="source_keys"):
        selection_head_torch(*bad)
    bad = list(args)
    bad[8] = args[8][:, :4]
    with pytest.raises(ValueError, match="source_mask"):
        selection_head_naive(*bad)
    bad = list(args)
    bad[6] = args[6][:3]
    with pytest.raises(ValueError, match="inv_freq"):
        fused_selection_head(*bad)
    bad = list(args)
    bad[7] = args[7].long()
    with pytest.raises(ValueError, match="base_mask must be a bool"):
        fused_selection_head(*bad)
    bad = list(args)
    bad[5] = args[5][:1]
    with pytest.raises(ValueError, match="query_positions"):
        fused_selection_head(*bad)
    bad[5] = args[5].float()
    with pytest.raises(ValueError, match="query_positions must be an integer"):
        fused_selection_head(*bad)
    with pytest.raises(ValueError, match="float64"):
        fused_selection_head(*[t.double() if i < 4 else t for i, t in enumerate(args)], use_triton=True)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    """A wrong device is a ValueError (which the CLI reports in one line), as in the other two kernels."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = [t.detach() for t in make_inputs(2, 5, 7, 3, 8, dtype=torch.float32, seed=11)]
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused_selection_head(*args, use_triton=True)


# ---------------------------------------------------------------------------------------------------------
# CUDA: Llama-3-8B shapes (the CPU tests above are their twins at small shapes)
# ---------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LLAMA3_8B = (16, 64, 64, 32, 128)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_llama3_8b_matches_torch(dtype, poisoned):
    """Fused op against the float64 PyTorch form (itself checked against the oracle above)."""
    args = make_inputs(*LLAMA3_8B, dtype=dtype, seed=12, device="cuda")
    weight = torch.randn(16, 65, 64, dtype=torch.float64, device="cuda")
    scores, grads = value_and_grads(fused_selection_head, args, weight)
    expected, expected_grads = value_and_grads(selection_head_torch, as_reference(args), weight)
    assert_close_scaled(scores, expected, 1e-4, "A")
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(16, 64, device="cuda"), rtol=0, atol=1e-5)
    for name, grad, want in zip(KEYS, grads, expected_grads, strict=True):
        assert grad.dtype == dtype
        assert_close_scaled(grad, want, 2e-2 if dtype == torch.bfloat16 else 1e-4, name)


@cuda
def test_cuda_llama3_8b_memory():
    """Fused fwd+bwd allocates little beyond its inputs: no (B, Ts, Tb, ·) pair tensor."""
    args = make_inputs(*LLAMA3_8B, dtype=torch.bfloat16, seed=13, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    scores = fused_selection_head(*args)
    scores.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    inputs = sum(t.numel() * t.element_size() for t in args[:4])  # about 25 MB; their gradients as much again
    # budget: the gradients, A, G and small tables; one bf16 pair-key tensor alone would be 512 MB
    assert extra < 2 * inputs + 8 * scores.numel() * 4, (extra, inputs)
