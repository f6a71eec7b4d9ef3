"""The normalised cross-attention op: every implementation against the PyTorch oracle, outputs and all gradients.

On the CPU the Triton kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
in fp32 against a float64 reference; the SDPA path is checked in float64. The oracle itself is checked
against an independent computation that normalises the states explicitly and uses transformers' own RoPE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from hyperdas.kernels.cross_attention import (
    NormalizedCrossAttention,
    cross_attention_triton,
    normalized_cross_attention,
)
from hyperdas.kernels.cross_attention_reference import cross_attention_reference, cross_attention_sdpa

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # where the Triton tests run: the GPU, else the CPU through the interpreter


@dataclass(frozen=True)
class Shape:
    """B batch, Hq/Hkv heads, Te instruction tokens, T target tokens x N states each (S = T·N keys), hd."""

    b: int
    hq: int
    hkv: int
    te: int
    t: int
    n: int
    hd: int

    @property
    def s(self) -> int:
        return self.t * self.n


# Odd shapes: S not a multiple of any block size, GQA groups of 3 and 6, a half head dimension that needs
# padding (hd = 8, 24), more stacked query rows (Hq/Hkv · Te = 78) than one query tile, several key tiles.
SMALL_SHAPES = [
    Shape(b=3, hq=6, hkv=2, te=3, t=3, n=13, hd=8),
    Shape(b=3, hq=6, hkv=2, te=3, t=5, n=15, hd=64),
    Shape(b=2, hq=6, hkv=1, te=13, t=7, n=11, hd=24),
    Shape(b=2, hq=3, hkv=3, te=5, t=4, n=5, hd=16),
]
LLAMA3_8B = Shape(b=2, hq=32, hkv=8, te=16, t=64, n=33, hd=128)


def llama_inv_freq(hd: int, base: float = 10000.0) -> torch.Tensor:
    """(hd/2,) Llama RoPE inverse frequencies."""
    return 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)


def token_mask(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """(B, S) key mask from a (B, T) selectable-token mask: row 0 partial, row 1 empty, row 2 (if any) full."""
    selectable = torch.rand(shape.b, shape.t, generator=generator) < 0.6
    selectable[0, 0] = True
    selectable[0, -1] = False
    if shape.b > 1:
        selectable[1] = False
    if shape.b > 2:
        selectable[2] = True
    return selectable.repeat_interleave(shape.n, dim=1)  # key s = token s // N, state s % N


def make_inputs(shape: Shape, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Fresh random float64 inputs of the contract (positions offset per row, as with left padding)."""
    g = torch.Generator().manual_seed(seed)
    b, s = shape.b, shape.s
    q_offset = torch.randint(0, 40, (b, 1), generator=g)
    k_offset = torch.randint(0, 40, (b, 1), generator=g)
    inputs = {
        "q": torch.randn(b, shape.hq, shape.te, shape.hd, generator=g, dtype=torch.float64),
        "k": torch.randn(b, shape.hkv, s, shape.hd, generator=g, dtype=torch.float64) * 3,
        "v": torch.randn(b, shape.hkv, s, shape.hd, generator=g, dtype=torch.float64) * 3,
        "key_inv_norm": 0.05 + 1.5 * torch.rand(b, s, generator=g, dtype=torch.float64),
        "q_positions": q_offset + torch.arange(shape.te),
        "k_positions": k_offset + torch.arange(s),
        "inv_freq": llama_inv_freq(shape.hd),
        "key_mask": token_mask(shape, g),
    }
    return {name: t.to(device) for name, t in inputs.items()}


DIFFERENTIABLE = ("q", "k", "v", "key_inv_norm")


def run_with_grads(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype, grad_out: torch.Tensor):
    """Run fn on copies of the inputs (differentiable ones cast to dtype); return out and the four grads (fp64)."""
    args = {}
    for name, t in inputs.items():
        args[name] = t.to(dtype).clone().requires_grad_() if name in DIFFERENTIABLE else t.clone()
    out = fn(**args)
    (out.double() * grad_out).sum().backward()
    return out.double(), {name: args[name].grad.double() for name in DIFFERENTIABLE}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """|actual - expected| <= rel · (|expected| + max|expected|) elementwise, and no NaN anywhere."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    bound = rel * (expected.abs() + expected.abs().max() + 1e-12)
    err = (actual - expected).abs()
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3e}, max |expected| {expected.abs().max():.3e}"


def check_empty_row(out: torch.Tensor, grads: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
    """A batch row whose keys are all masked gives exactly zero output and zero gradients."""
    empty = ~inputs["key_mask"].any(dim=-1)
    assert empty.any(), "the test inputs must contain an all-masked row"
    assert (out[empty] == 0).all()
    for name, grad in grads.items():
        assert (grad[empty] == 0).all(), f"grad {name} of an all-masked row is not zero"


def assert_path_matches_reference(path, inputs: dict, shape, dtype: torch.dtype, rel: float, empty_row: bool = True):
    """``path`` in ``dtype`` against the float64 oracle under one random upstream gradient: the output and every
    gradient within ``rel`` (``assert_matches``), and an all-masked row exactly zero."""
    grad_out = torch.randn(shape.b, shape.hq, shape.te, shape.hd, dtype=torch.float64, device=inputs["q"].device)
    expected, expected_grads = run_with_grads(cross_attention_reference, inputs, torch.float64, grad_out)
    out, grads = run_with_grads(path, inputs, dtype, grad_out)
    assert_matches(out, expected, rel, "out")
    for name in DIFFERENTIABLE:
        assert_matches(grads[name], expected_grads[name], rel, f"grad {name}")
    if empty_row:
        check_empty_row(out, grads, inputs)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every uninitialised float buffer torch hands out during the test is filled with NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_filled(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_filled(empty_like(*a, **kw)))


# ----------------------------------------------------------------------------------------------------------
# The oracle against an independent, explicitly normalised computation
# ----------------------------------------------------------------------------------------------------------


def explicit_cross_attention(
    states: torch.Tensor,
    instr: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    shape: Shape,
    inputs: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Normalise the (B, T, N, D) states, project, apply transformers' RoPE and repeat_kv, attend row by row."""
    b, d = states.shape[0], states.shape[-1]
    flat = states.reshape(b, shape.s, d)
    normed = flat / flat.norm(dim=-1, keepdim=True)  # the normalised copy the fused op never makes
    q = (instr @ w_q.T).view(b, shape.te, shape.hq, shape.hd).transpose(1, 2)
    k = (normed @ w_k.T).view(b, shape.s, shape.hkv, shape.hd).transpose(1, 2)
    v = (normed @ w_v.T).view(b, shape.s, shape.hkv, shape.hd).transpose(1, 2)

    def cos_sin(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.double()[..., None] * inputs["inv_freq"].double()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    q, _ = apply_rotary_pos_emb(q, q, *cos_sin(inputs["q_positions"]))
    k, _ = apply_rotary_pos_emb(k, k, *cos_sin(inputs["k_positions"]))
    k, v = repeat_kv(k, shape.hq // shape.hkv), repeat_kv(v, shape.hq // shape.hkv)
    out = torch.zeros_like(q)
    for row in range(b):
        keys = inputs["key_mask"][row].nonzero().squeeze(-1)
        if keys.numel() == 0:
            continue
        scores = q[row] @ k[row][:, keys].transpose(-1, -2) / math.sqrt(shape.hd)  # (Hq, Te, visible keys)
        out[row] = torch.softmax(scores, dim=-1) @ v[row][:, keys]
    return out


def test_reference_matches_explicit_normalisation():
    shape = Shape(b=3, hq=6, hkv=2, te=3, t=3, n=13, hd=8)
    inputs = make_inputs(shape, seed=11)
    g = torch.Generator().manual_seed(12)
    d = 20
    states = torch.randn(shape.b, shape.t, shape.n, d, generator=g, dtype=torch.float64)
    states = states * (0.1 + 10 * torch.rand(shape.b, shape.t, shape.n, 1, generator=g, dtype=torch.float64))
    instr = torch.randn(shape.b, shape.te, d, generator=g, dtype=torch.float64)
    w_q = torch.randn(shape.hq * shape.hd, d, generator=g, dtype=torch.float64)
    w_k = torch.randn(shape.hkv * shape.hd, d, generator=g, dtype=torch.float64)
    w_v = torch.randn(shape.hkv * shape.hd, d, generator=g, dtype=torch.float64)

    expected = explicit_cross_attention(states, instr, w_q, w_k, w_v, shape, inputs)
    flat = states.reshape(shape.b, shape.s, d)
    folded = cross_attention_reference(
        q=(instr @ w_q.T).view(shape.b, shape.te, shape.hq, shape.hd).transpose(1, 2),
        k=(flat @ w_k.T).view(shape.b, shape.s, shape.hkv, shape.hd).transpose(1, 2),  # RAW states
        v=(flat @ w_v.T).view(shape.b, shape.s, shape.hkv, shape.hd).transpose(1, 2),
        key_inv_norm=1.0 / flat.norm(dim=-1),
        q_positions=inputs["q_positions"],
        k_positions=inputs["k_positions"],
        inv_freq=inputs["inv_freq"],
        key_mask=inputs["key_mask"],
    )
    torch.testing.assert_close(folded, expected, rtol=1e-10, atol=1e-12)
    assert (folded[1] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# SDPA and Triton against the oracle
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_sdpa_matches_reference_float64(shape: Shape, poisoned_buffers):
    inputs = make_inputs(shape, seed=hash(shape) % 1000)
    assert_path_matches_reference(cross_attention_sdpa, inputs, shape, torch.float64, 1e-10)


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_triton_matches_reference(shape: Shape, poisoned_buffers):
    inputs = make_inputs(shape, seed=1 + hash(shape) % 1000, device=DEVICE)
    assert_path_matches_reference(cross_attention_triton, inputs, shape, torch.float32, 2e-5)


@pytest.mark.parametrize("runs", [2, 5])
@pytest.mark.parametrize(
    "shape",
    [Shape(b=3, hq=6, hkv=2, te=3, t=11, n=17, hd=8), Shape(b=3, hq=6, hkv=1, te=13, t=17, n=11, hd=24)],
    ids=str,
)
def test_triton_key_splits(shape: Shape, runs: int, monkeypatch, poisoned_buffers):
    """Keys split over several programs: the forward merges per-split partial results, the backward adds dq
    from several runs of key blocks (S = 187: 3 blocks of 64, so 5 runs leave some empty); row 0 sees keys in
    the first block only, so later splits see none."""
    import hyperdas.kernels.cross_attention as module

    monkeypatch.setattr(module, "_key_runs", lambda *args, **kwargs: runs)
    inputs = make_inputs(shape, seed=17, device=DEVICE)
    inputs["key_mask"][0] = False
    inputs["key_mask"][0, 5:50:3] = True
    assert_path_matches_reference(cross_attention_triton, inputs, shape, torch.float32, 2e-5)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(
                not CUDA, reason="Triton 3.9's interpreter computes tl.dot on bf16 tiles wrongly; fp16 is the CPU twin"
            ),
        ),
    ],
    ids=str,
)
def test_triton_half_precision(dtype: torch.dtype):
    shape = SMALL_SHAPES[0]
    inputs = make_inputs(shape, seed=5, device=DEVICE)
    rel = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert_path_matches_reference(cross_attention_triton, inputs, shape, dtype, rel)


def test_non_contiguous_inputs():
    shape = SMALL_SHAPES[1]
    inputs = make_inputs(shape, seed=7, device=DEVICE)
    # (B, S, Hkv, hd) storage seen as (B, Hkv, S, hd), as a projection's output is before any copy
    for name in ("k", "v"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    inputs["q"] = inputs["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert_path_matches_reference(cross_attention_triton, inputs, shape, torch.float32, 2e-5, empty_row=False)


def test_custom_scale_and_module():
    shape = SMALL_SHAPES[0]
    inputs = make_inputs(shape, seed=9, device=DEVICE)
    expected = cross_attention_reference(**inputs, scale=0.7)
    for use_triton in (True, False, None):
        module = NormalizedCrossAttention(scale=0.7, use_triton=use_triton)
        fp32 = {n: t.float() if n in DIFFERENTIABLE else t for n, t in inputs.items()}
        torch.testing.assert_close(module(**fp32).double(), expected, rtol=1e-4, atol=1e-5)


def test_dispatch_and_errors():
    shape = SMALL_SHAPES[0]
    inputs = make_inputs(shape, seed=3)
    torch.testing.assert_close(normalized_cross_attention(**inputs), cross_attention_sdpa(**inputs))
    with pytest.raises(ValueError, match="use_triton must be True, False or None .*, got 'cuda'"):
        normalized_cross_attention(**inputs, use_triton="cuda")
    with pytest.raises(ValueError, match="flash"):
        cross_attention_sdpa(**inputs, use_flash_attn=True)
    with pytest.raises(ValueError, match="Hq=6 must be a multiple of the key/value heads Hkv=4"):
        bad = dict(inputs, k=inputs["k"].repeat(1, 2, 1, 1), v=inputs["v"].repeat(1, 2, 1, 1))
        normalized_cross_attention(**bad)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        normalized_cross_attention(**dict(inputs, key_mask=inputs["key_mask"][:, :-1]))
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        normalized_cross_attention(**dict(inputs, key_mask=inputs["key_mask"].float()))
    with pytest.raises(ValueError, match="Triton cross-attention supports"):
        cross_attention_triton(**inputs)  # float64 is for the PyTorch paths only


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = {n: t.float() if n in DIFFERENTIABLE else t for n, t in make_inputs(SMALL_SHAPES[0], seed=4).items()}
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        normalized_cross_attention(**inputs, use_triton=True)


# ----------------------------------------------------------------------------------------------------------
# CUDA: Llama-3-8B editor shapes in bf16 (the CPU twins are the tests above)
# ----------------------------------------------------------------------------------------------------------


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the CPU twins run through the Triton interpreter)")
@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "sdpa"])
def test_llama3_8b_shapes_bf16_cuda(use_triton: bool, poisoned_buffers):
    shape = LLAMA3_8B
    inputs = make_inputs(shape, seed=21, device="cuda")
    grad_out = torch.randn(shape.b, shape.hq, shape.te, shape.hd, dtype=torch.float64, device="cuda")
    expected, expected_grads = run_with_grads(cross_attention_reference, inputs, torch.float64, grad_out)
    out, grads = run_with_grads(
        lambda **kw: normalized_cross_attention(**kw, use_triton=use_triton), inputs, torch.bfloat16, grad_out
    )
    assert relative_error(out, expected) < 1e-2
    for name in DIFFERENTIABLE:
        assert torch.isfinite(grads[name]).all()
        assert relative_error(grads[name], expected_grads[name]) < 2e-2, name
    check_empty_row(out, grads, inputs)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the CPU twins run through the Triton interpreter)")
def test_llama3_8b_shapes_fp32_cuda_tight():
    shape = LLAMA3_8B
    inputs = make_inputs(shape, seed=22, device="cuda")
    grad_out = torch.randn(shape.b, shape.hq, shape.te, shape.hd, dtype=torch.float64, device="cuda")
    expected, expected_grads = run_with_grads(cross_attention_reference, inputs, torch.float64, grad_out)
    out, grads = run_with_grads(normalized_cross_attention, inputs, torch.float32, grad_out)
    assert_matches(out, expected, 1e-4, "out")
    for name in DIFFERENTIABLE:
        assert_matches(grads[name], expected_grads[name], 1e-4, f"grad {name}")
