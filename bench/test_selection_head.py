"""Selection head benchmark: fused Triton op vs the pair-free PyTorch form vs the naive (pair-tensor) reference.

Run: `python -m pytest bench/test_selection_head.py` (add `--benchmark-json=...` or let bench/conftest.py save).
On CUDA the shape is Llama-3-8B's (B=16, Tb=Ts=64, H=32, hd=128, bf16) and all three paths run; on CPU only
the two PyTorch paths run, at a small shape. `fwd` is an inference forward (no autograd graph); `fwd_bwd` is
a training step: forward, then gradients of Σ w ⊙ A to the four key/query tensors.
Goal on GPU: the fused fwd_bwd has >= 10x lower peak memory and is >= 3x faster than the naive reference.
extra_info holds, per path: peak_memory_bytes (CUDA: torch.cuda.max_memory_allocated after a reset, minus
what was allocated before the call; None on CPU), and the naive reference's peak memory and median time
measured in the same process, with the ratios naive / this path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

from hyperdas.kernels.selection_head import fused_selection_head
from hyperdas.kernels.selection_head_reference import selection_head_naive, selection_head_torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (B, Ts, Tb, H, hd) and dtype: Llama-3-8B on a GPU, a small shape on CPU.
SHAPE = (16, 64, 64, 32, 128) if CUDA else (2, 16, 16, 4, 32)
DTYPE = torch.bfloat16 if CUDA else torch.float32

PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "naive": selection_head_naive,
    "torch": selection_head_torch,
    "fused": lambda *args: fused_selection_head(*args, use_triton=True),
}
_NAIVE_CACHE: dict[str, dict[str, float | int | None]] = {}


def make_inputs(seed: int = 0) -> list[torch.Tensor]:
    """Random inputs in the contract's order (keys and query require grad), a quarter of positions masked."""
    B, Ts, Tb, H, hd = SHAPE
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, Tb, H, hd), (B, Ts, H, hd), (B, Tb, H, hd), (B, H, hd))  # base, source, self keys; query
    keys = [torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=DTYPE).requires_grad_() for shape in shapes]
    positions = torch.arange(Tb).expand(B, Tb).contiguous()
    query_positions = torch.full((B,), 7)  # the last token of an 8-token instruction
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    base_mask = torch.rand(B, Tb, generator=gen) >= 0.25
    source_mask = torch.rand(B, Ts, generator=gen) >= 0.25
    return keys + [t.to(DEVICE) for t in (positions, query_positions, inv_freq, base_mask, source_mask)]


def make_step(fn: Callable[..., torch.Tensor], args: list[torch.Tensor], mode: str) -> Callable[[], None]:
    """One timed call: forward (no graph) or forward + backward, synchronised on CUDA."""
    B, Ts, Tb, _, _ = SHAPE
    weight = torch.randn(B, Ts + 1, Tb, device=DEVICE)

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(*args)
        else:
            torch.autograd.grad((fn(*args) * weight).sum(), args[:4])
        if CUDA:
            torch.cuda.synchronize()

    return step


def peak_memory(step: Callable[[], None]) -> int | None:
    """Bytes allocated at the peak of one step beyond what was allocated before it (CUDA only)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - start


def naive_reference(mode: str) -> dict[str, float | int | None]:
    """The naive path's peak memory and median time for this mode, measured once per process."""
    if mode not in _NAIVE_CACHE:
        step = make_step(selection_head_naive, make_inputs(), mode)
        step()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        _NAIVE_CACHE[mode] = {"peak_memory_bytes": peak_memory(step), "median_s": statistics.median(times)}
    return _NAIVE_CACHE[mode]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("path", list(PATHS))
def test_selection_head(benchmark, path: str, mode: str) -> None:
    if path == "fused" and not CUDA:
        pytest.skip("the fused Triton op is benchmarked on CUDA only")
    step = make_step(PATHS[path], make_inputs(), mode)
    step()  # compile / warm up
    peak = peak_memory(step)
    naive = naive_reference(mode)
    benchmark.group = f"selection_head {mode}"
    benchmark(step)
    B, Ts, Tb, H, hd = SHAPE
    info = {
        "path": path,
        "mode": mode,
        "shape": {"B": B, "Ts": Ts, "Tb": Tb, "H": H, "hd": hd},
        "dtype": str(DTYPE),
        "peak_memory_bytes": peak,
        "naive_peak_memory_bytes": naive["peak_memory_bytes"],
        "naive_median_s": naive["median_s"],
        "memory_ratio_naive_over_this": None if not peak else naive["peak_memory_bytes"] / peak,
        "speedup_vs_naive": None,
    }
    if benchmark.stats is not None:
        if path == "naive":  # the benchmark's own timing is better than the 5-call estimate; later paths use it
            naive["median_s"] = info["naive_median_s"] = benchmark.stats.stats.median
        info["speedup_vs_naive"] = naive["median_s"] / benchmark.stats.stats.median
    benchmark.extra_info.update(info)
