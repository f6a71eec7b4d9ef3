"""The fused interchange (Triton, run by the interpreter on CPU) against the float64 PyTorch reference.

Every case compares the output and every gradient (h, S, A, W) with fresh random inputs and odd shapes; the
kernels write into NaN-filled buffers, so an element they forget to write fails the comparison. The reference
itself is checked against a literal per-position loop of the formula.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hyperdas.kernels import common
from hyperdas.kernels.interchange import Interchange, interchange
from hyperdas.kernels.interchange_reference import interchange_reference

# Largest error allowed, relative to the largest magnitude of the float64 reference value.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the kernels write starts as NaN."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(common, "empty_buffer", nan_empty)


def make_inputs(
    B: int,
    Tb: int,
    Ts: int,
    D: int,
    r: int | None,
    *,
    basis: str = "batched",
    select: str = "weighted",
    mask: str | None = None,
    dtype: torch.dtype = torch.float32,
    w_dtype: torch.dtype | None = None,
    strided: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Random inputs: A softmaxed over the source axis (some columns pure SELF), orthonormal W."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, Tb, D, generator=gen, dtype=torch.float64)
    if strided:  # h and S as views into wider / longer runs, A as a transposed view: non-contiguous inputs
        h = torch.randn(B, Tb, D + 3, generator=gen, dtype=torch.float64).to(dtype)[..., 3:]
        S = torch.randn(B, 2 * Ts, D, generator=gen, dtype=torch.float64).to(dtype)[:, ::2]
    else:
        S = torch.randn(B, Ts, D, generator=gen, dtype=torch.float64).to(dtype)
    A = None
    if select == "weighted":
        logits = torch.randn(B, Tb, Ts + 1, generator=gen) * 2
        logits[:, ::3, :Ts] = float("-inf")  # unselectable base positions keep themselves
        A = torch.softmax(logits, dim=-1).transpose(1, 2)
        if not strided:
            A = A.contiguous()
    W = None
    if basis == "batched":
        W = torch.linalg.qr(torch.randn(B, D, r, generator=gen, dtype=torch.float64))[0]
    elif basis == "shared":
        W = torch.linalg.qr(torch.randn(D, r, generator=gen, dtype=torch.float64))[0]
    if W is not None:
        W = W.to(w_dtype or dtype)
    position_mask = None
    if mask == "random":
        position_mask = torch.rand(B, Tb, generator=gen) > 0.3
        position_mask[:, 0] = True
    elif mask == "example":  # one example entirely masked, another with a single kept position
        position_mask = torch.ones(B, Tb, dtype=torch.bool)
        position_mask[0] = False
        position_mask[-1, 1:] = False
    tensors = dict(h=h.to(dtype), S=S, A=A, W=W, position_mask=position_mask)
    return {k: (v.to(device) if v is not None else None) for k, v in tensors.items()}


def run(fn, inputs: dict, grad_out: torch.Tensor, upcast: bool = False, **kwargs):
    """Output and gradients of every floating input of fn; upcast=True runs on float64 copies."""
    leaves = {}
    for name in ("h", "S", "A", "W"):
        t = inputs[name]
        if t is not None:
            t = t.detach().double() if upcast else t.detach()
            leaves[name] = t.requires_grad_()
    out = fn(**{**inputs, **leaves}, **kwargs)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype), allow_unused=True)
    return out, {name: g for name, g in zip(leaves, grads, strict=True)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual is not None and expected is not None, what
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.double() - expected).abs().max() / scale
    assert torch.isfinite(actual).all() and err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


def check_against_reference(inputs: dict, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(inputs["h"].shape, generator=gen, dtype=torch.float64).to(inputs["h"].device)
    out, grads = run(interchange, inputs, grad_out, use_triton=True)
    ref_out, ref_grads = run(interchange_reference, inputs, grad_out, upcast=True)
    assert out.dtype == inputs["h"].dtype
    assert_close(out, ref_out, dtype, "output")
    for name, ref in ref_grads.items():
        if ref is None:  # the input does not reach the output (full patch with identity selection: h)
            ref = torch.zeros_like(inputs[name], dtype=torch.float64)
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close(grads[name], ref, dtype, f"grad {name}")
    return out, grads


CASES = {
    "batched-W Tb!=Ts": dict(B=2, Tb=7, Ts=5, D=88, r=5),
    "shared-W r=1 mask": dict(B=2, Tb=7, Ts=5, D=88, r=1, basis="shared", mask="random"),
    "multi-block strided": dict(B=2, Tb=37, Ts=19, D=88, r=5, mask="random", strided=True),
    "D=576": dict(B=1, Tb=7, Ts=5, D=576, r=5),
    "r=70 (32-wide fp32 tiles)": dict(B=2, Tb=7, Ts=5, D=88, r=70, mask="random"),
    "full W=None mask": dict(B=2, Tb=7, Ts=5, D=88, r=None, basis="full", mask="random"),
    "identity batched-W mask": dict(B=2, Tb=7, Ts=7, D=88, r=5, select="identity", mask="random"),
    "identity shared-W": dict(B=3, Tb=5, Ts=5, D=40, r=3, basis="shared", select="identity"),
    "identity full": dict(B=2, Tb=5, Ts=5, D=40, r=None, basis="full", select="identity", mask="random"),
    "masked example": dict(B=2, Tb=7, Ts=5, D=88, r=5, mask="example"),
    "masked example shared-W": dict(B=2, Tb=7, Ts=5, D=88, r=5, basis="shared", mask="example"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_fp32(case):
    check_against_reference(make_inputs(**CASES[case], seed=list(CASES).index(case)), torch.float32)


HALF_CASES = ["batched-W Tb!=Ts", "shared-W r=1 mask", "full W=None mask", "identity batched-W mask"]


@pytest.mark.parametrize("case", HALF_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_half(case, dtype):
    check_against_reference(make_inputs(**CASES[case], dtype=dtype, seed=7), dtype)


def test_fp32_basis_with_bf16_states():
    """A bf16 run with fp32 master weights for W: the gradient of W comes back in fp32."""
    inputs = make_inputs(2, 7, 5, 88, 5, dtype=torch.bfloat16, w_dtype=torch.float32, mask="random")
    check_against_reference(inputs, torch.bfloat16)


def test_masked_rows_are_exact_and_send_no_gradient():
    inputs = make_inputs(2, 7, 5, 88, 5, mask="example")
    out, grads = check_against_reference(inputs, torch.float32)
    keep = inputs["position_mask"]
    assert torch.equal(out[~keep], inputs["h"][~keep])
    assert torch.equal(grads["A"][0], torch.zeros_like(grads["A"][0]))
    assert torch.equal(grads["S"][0], torch.zeros_like(grads["S"][0]))
    assert torch.equal(grads["W"][0], torch.zeros_like(grads["W"][0]))


@pytest.mark.parametrize("needs", [("A", "W"), ("h",), ("S",)])
def test_only_some_inputs_need_grad(needs):
    """HyperDAS trains A and W only (h and S come from a no-grad pass): the kernels skip the other grads."""
    inputs = make_inputs(2, 7, 5, 88, 5, mask="random", seed=3)
    g = torch.randn(2, 7, 88, dtype=torch.float64)
    leaves = {k: inputs[k].detach().clone().requires_grad_(k in needs) for k in ("h", "S", "A", "W")}
    out = interchange(**{**inputs, **leaves}, use_triton=True)
    grads = torch.autograd.grad(out, [leaves[k] for k in needs], g.float())
    _, ref_grads = run(interchange_reference, inputs, g, upcast=True)
    for name, grad in zip(needs, grads, strict=True):
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}")


def test_dispatch_and_module():
    inputs = make_inputs(2, 7, 5, 88, 5, mask="random")
    expected = interchange_reference(**inputs)
    assert torch.equal(interchange(**inputs), expected)  # CPU tensors: the reference
    assert torch.equal(interchange(**inputs, use_triton=False), expected)
    assert_close(Interchange(use_triton=True)(**inputs), expected.double(), torch.float32, "module")


def test_bad_inputs_raise_clear_errors():
    inputs = make_inputs(2, 7, 5, 88, 5)
    h, S, A, W = inputs["h"], inputs["S"], inputs["A"], inputs["W"]
    with pytest.raises(ValueError, match="A must be"):
        interchange(h, S, A[:, :-1], W)
    with pytest.raises(ValueError, match="W must be"):
        interchange(h, S, A, W[:, :-1])
    with pytest.raises(ValueError, match="S must be"):
        interchange(h, S[..., :-1], A, W)
    with pytest.raises(ValueError, match="identity selection"):
        interchange(h, S, None, W)
    with pytest.raises(ValueError, match="position_mask"):
        interchange(h, S, A, W, torch.ones(2, 7))
    with pytest.raises(ValueError, match="supports"):
        interchange(h.double(), S.double(), A, W, use_triton=True)


def literal_interchange(h, S, A, W, position_mask):
    """The formula position by position, with explicit D x D projectors: slow, obviously right."""
    B, Tb, D = h.shape
    Ts = S.shape[1]
    rows = []
    for b in range(B):
        for j in range(Tb):
            if A is None:
                mixed = S[b, j]
            else:
                mixed = A[b, Ts, j] * h[b, j]
                for i in range(Ts):
                    mixed = mixed + A[b, i, j] * S[b, i]
            if W is None:
                new = mixed
            else:
                Wb = W[b] if W.dim() == 3 else W
                new = h[b, j] + (Wb @ Wb.T) @ (mixed - h[b, j])
            keep = position_mask is None or bool(position_mask[b, j])
            rows.append(new if keep else h[b, j])
    return torch.stack(rows).reshape(B, Tb, D)


@pytest.mark.parametrize(
    "case", ["batched-W Tb!=Ts", "shared-W r=1 mask", "full W=None mask", "identity batched-W mask", "masked example"]
)
def test_reference_matches_literal_loop_fp64(case):
    cfg = {**CASES[case], "D": 24}
    inputs = make_inputs(**cfg, dtype=torch.float64, seed=11)
    g = torch.randn(inputs["h"].shape, dtype=torch.float64)
    out, grads = run(interchange_reference, inputs, g)
    lit_out, lit_grads = run(literal_interchange, inputs, g)
    torch.testing.assert_close(out, lit_out, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, lit_grads[name], rtol=1e-12, atol=1e-12, msg=f"grad {name}")


def test_kernels_compile_for_sm90():
    """The interpreter never compiles; build every kernel variant to a Hopper cubin (no GPU needed)."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import hyperdas.kernels.interchange as ic

        def build(kernel, ptrs, constexprs, num_warps):
            sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "i32") for n in kernel.arg_names}
            cx = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
            src = ASTSource(fn=kernel, signature=sig, constexprs=cx)
            assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["cubin"]

        for t, dtype, dot, prec, r in (
            ("*bf16", torch.bfloat16, tl.bfloat16, "tf32", 128),
            ("*fp32", torch.float32, tl.float32, "ieee", 5),
        ):
            cfg, nw = ic._tiles(64, 40, r, dtype)
            cfg.update(DOT=dot, PREC=prec)
            f = "*fp32"
            for weighted, proj in ((True, True), (False, True), (True, False)):
                build(ic._interchange_fwd_kernel, dict(h_ptr=t, s_ptr=t, a_ptr=f, w_ptr=t, m_ptr="*u8", out_ptr=t,
                      c_ptr=f), dict(WEIGHTED=weighted, PROJECT=proj, HAS_MASK=True, STORE_C=proj, **cfg), nw)
                build(ic._interchange_bwd_rows_kernel, dict(g_ptr=t, h_ptr=t, s_ptr=t, a_ptr=f, w_ptr=t,
                      m_ptr="*u8", dc_ptr=f, dh_ptr=t, ds_ptr=t, da_ptr=f), dict(WEIGHTED=weighted, PROJECT=proj,
                      HAS_MASK=True, NEED_DH=True, NEED_DS=True, NEED_DA=True, STORE_DC=proj, **cfg), nw)
                if weighted:
                    build(ic._interchange_bwd_source_kernel, dict(g_ptr=t, a_ptr=f, w_ptr=t, m_ptr="*u8",
                          dc_ptr=f, ds_ptr=t), dict(PROJECT=proj, HAS_MASK=True, **cfg), nw)
                if proj:
                    build(ic._interchange_bwd_weight_kernel, dict(g_ptr=t, h_ptr=t, s_ptr=t, a_ptr=f, c_ptr=f,
                          dc_ptr=f, dw_ptr=f), dict(WEIGHTED=weighted, **cfg), nw)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if "No module named" in done.stderr and "nvidia" in done.stderr:
        pytest.skip("this triton build has no NVIDIA backend")
    assert done.returncode == 0, done.stderr[-4000:]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; the CPU twins above run the same checks")


@cuda
@pytest.mark.parametrize(
    "cfg",
    [
        dict(basis="batched", mask="random"),
        dict(basis="shared"),
        dict(basis="full", r=None),
        dict(select="identity", Ts=512),
        dict(B=16, Tb=64, Ts=64, mask="random"),  # the training step's shape (B=16, T=64)
    ],
)
def test_llama3_8b_shapes_bf16_cuda(cfg):
    """Llama-3-8B at layer 15: D=4096, r=128, 8 x 512 = 4096 base tokens (and the step's 16 x 64), bf16 states,
    fp32 A."""
    shape = dict(B=8, Tb=512, Ts=48, D=4096, r=128)
    shape.update(cfg)
    inputs = make_inputs(**shape, dtype=torch.bfloat16, device="cuda", seed=5)
    check_against_reference(inputs, torch.bfloat16)
    assert torch.equal(interchange(**inputs), interchange(**inputs, use_triton=True))
