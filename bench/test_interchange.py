"""Benchmark of the interchange ("rotate, project, patch"), every implementation side by side in one run.

    python -m pytest bench/test_interchange.py --benchmark-only

Two cases, each forward ("fwd", no autograd graph) and forward + backward ("fwd_bwd", the training step):
- `hyperdas`: the HyperDAS op, h' = h + W W^T (A^T S + A_self h - h) with soft selection A: (B, Ts+1, Tb)
  fp32, a per-example fp32 basis W: (B, D, r) and a position mask; gradients to A and W (the target is
  frozen, so h and S need none). Paths: `fused` (Triton) and `reference` (the eager PyTorch oracle).
- `pyvene`: pyvene's DAS interchange, out = b + (s - b) R R^T at matching positions with one orthogonally
  parametrised R: (D, r) in fp32; gradient to R. Paths: `pyvene` (pyvene's LowRankRotatedSpaceIntervention),
  `fused` (FusedLowRankRotatedSpaceIntervention on Triton) and `reference` (the same class on the PyTorch
  reference). All three evaluate R's orthogonal parametrisation inside the step, as a pyvene user's
  forward does. This case needs pyvene and is skipped without it (the hyperdas case runs regardless).
CUDA: Llama-3-8B shapes (B=8 x Tb=512 = 4096 base tokens, Ts=48, D=4096, r=128, bf16 states). CPU: the
PyTorch paths only, at a small fp32 shape (Triton interpreter timings mean nothing).

extra_info per run: the minimal bytes the op must move (each input read once, each output written once)
and the achieved GB/s; a device-to-device copy bandwidth measured in the same process (bench/device_stamp.py)
and the fraction of it achieved (the goal: the fused forward reaches >= 80% of copy bandwidth); peak memory
(CUDA) and the bytes autograd saves for backward (any device).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from device_stamp import copy_bandwidth_gbps

from hyperdas.kernels.interchange import interchange
from hyperdas.kernels.interchange_reference import interchange_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = dict(B=8, Tb=512, Ts=48, D=4096, r=128) if CUDA else dict(B=2, Tb=64, Ts=16, D=256, r=16)
DTYPE = torch.bfloat16 if CUDA else torch.float32
MODES = ["fwd", "fwd_bwd"]


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write) of a 1 GiB buffer (CPU: 64 MiB), this process."""
    return copy_bandwidth_gbps(torch.device(DEVICE))


def hyperdas_inputs() -> dict[str, torch.Tensor]:
    B, Tb, Ts, D, r = (SHAPE[k] for k in ("B", "Tb", "Ts", "D", "r"))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, Ts + 1, Tb, generator=gen)
    W = torch.linalg.qr(torch.randn(B, D, r, generator=gen))[0]
    tensors = dict(
        h=torch.randn(B, Tb, D, generator=gen).to(DTYPE),
        S=torch.randn(B, Ts, D, generator=gen).to(DTYPE),
        A=torch.softmax(logits, dim=1),
        W=W,  # fp32, as hyperdas.subspace returns it
        position_mask=torch.rand(B, Tb, generator=gen) > 0.1,
    )
    return {k: v.to(DEVICE) for k, v in tensors.items()}


def run_benchmark(
    benchmark,
    memory_probe,
    copy_gbps: float,
    step: Callable[[], None],
    leaves: list[torch.Tensor],
    bytes_moved: int,
    info: dict,
) -> None:
    step()  # compile / warm up
    peak = memory_probe.peak_bytes(step)
    saved = memory_probe.saved_bytes(step, exclude=leaves)
    benchmark.group = f"interchange {info['case']} {info['mode']}"
    benchmark.pedantic(step, rounds=20 if CUDA else 5, iterations=5 if CUDA else 1, warmup_rounds=2)
    # --benchmark-disable runs the step once without statistics (a smoke test): no throughput then
    gbps = bytes_moved / benchmark.stats.stats.mean / 1e9 if benchmark.stats is not None else None
    benchmark.extra_info.update(
        {
            "op": "interchange",
            **info,
            "shape": dict(SHAPE),
            "dtype": str(DTYPE),
            "bytes_moved": bytes_moved,
            "GBps": gbps,
            "copy_GBps": copy_gbps,
            "fraction_of_copy_bandwidth": gbps / copy_gbps if gbps is not None else None,
            "peak_memory_bytes": peak,
            "saved_for_backward_bytes": saved,
        }
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_interchange_hyperdas(benchmark, memory_probe, copy_bandwidth, path: str, mode: str) -> None:
    if path == "fused" and not CUDA:
        pytest.skip("the fused Triton op is timed on CUDA only (interpreter timings mean nothing)")
    x = hyperdas_inputs()
    fn = interchange_reference if path == "reference" else lambda **kw: interchange(**kw, use_triton=True)
    out_bytes = _nbytes(x["h"])
    fwd_bytes = _nbytes(x["h"], x["S"], x["A"], x["W"], x["position_mask"]) + out_bytes
    if mode == "fwd":
        leaves: list[torch.Tensor] = []

        def step() -> None:
            with torch.no_grad():
                fn(**x)
            _sync()

        bytes_moved = fwd_bytes
    else:
        x["A"].requires_grad_()
        x["W"].requires_grad_()
        leaves = [x["A"], x["W"]]
        grad_out = torch.randn_like(x["h"])

        def step() -> None:
            torch.autograd.grad(fn(**x), leaves, grad_out)
            _sync()

        # backward reads g, h, S, A, W, mask and writes dA, dW
        bytes_moved = 2 * fwd_bytes + _nbytes(x["A"], x["W"])
    info = {"case": "hyperdas", "path": path, "mode": mode, "grads": "A, W" if mode == "fwd_bwd" else None}
    run_benchmark(benchmark, memory_probe, copy_bandwidth, step, leaves, bytes_moved, info)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["fused", "reference", "pyvene"])
def test_interchange_pyvene(benchmark, memory_probe, copy_bandwidth, path: str, mode: str) -> None:
    if path == "fused" and not CUDA:
        pytest.skip("the fused Triton op is timed on CUDA only (interpreter timings mean nothing)")
    pv = pytest.importorskip("pyvene", reason="pyvene is not installed (the GPU run carries it as a wheel)")
    from hyperdas.kernels.pyvene_intervention import FusedLowRankRotatedSpaceIntervention

    B, Tb, D, r = (SHAPE[k] for k in ("B", "Tb", "D", "r"))
    torch.manual_seed(0)
    theirs = pv.LowRankRotatedSpaceIntervention(embed_dim=D, low_rank_dimension=r).to(DEVICE)
    if path == "pyvene":
        intervention = theirs
    else:
        intervention = FusedLowRankRotatedSpaceIntervention(
            embed_dim=D, low_rank_dimension=r, use_triton=path == "fused"
        ).to(DEVICE)
        intervention.load_state_dict(theirs.state_dict())
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(B * Tb, D, generator=gen).to(device=DEVICE, dtype=DTYPE)
    source = torch.randn(B * Tb, D, generator=gen).to(device=DEVICE, dtype=DTYPE)
    weight_bytes = D * r * 4
    fwd_bytes = 3 * _nbytes(base) + weight_bytes
    if mode == "fwd":
        leaves: list[torch.Tensor] = []

        def step() -> None:
            with torch.no_grad():
                intervention(base, source)
            _sync()

        bytes_moved = fwd_bytes
    else:
        leaves = [intervention.rotate_layer.parametrizations.weight.original]
        grad_out = torch.randn_like(base)

        def step() -> None:
            torch.autograd.grad(intervention(base, source), leaves, grad_out)
            _sync()

        # backward reads g, base, source, R and writes dR
        bytes_moved = fwd_bytes + 3 * _nbytes(base) + 2 * weight_bytes
    info = {"case": "pyvene", "path": path, "mode": mode, "grads": "R" if mode == "fwd_bwd" else None}
    run_benchmark(benchmark, memory_probe, copy_bandwidth, step, leaves, bytes_moved, info)
