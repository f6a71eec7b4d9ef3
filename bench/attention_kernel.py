"""The target's attention kernel on CPU: eager (matmul, softmax, matmul) against SDPA, as hyperdas.targets picks.

    python bench/attention_kernel.py --json bench/results/attention_kernel_cpu.json

Times Hugging Face's own two attention functions (the ones the target's layers call) at the embedded default's
attention shape during training (SmolLM2-135M: 9 query heads, 3 key/value heads, head_dim 64; B=16 pairs of 22
tokens), in bf16 and fp32, forward alone and forward+backward, on one thread (as bench/conftest.py does: CPU
timings of small ops swing on a shared machine otherwise). Median of repeated runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

BATCH, TOKENS, HEADS, KV_HEADS, HEAD_DIM = 16, 22, 9, 3, 64


class _Attention(nn.Module):
    """The attributes transformers' attention functions read from a layer's attention module."""

    def __init__(self):
        super().__init__()
        self.num_key_value_groups = HEADS // KV_HEADS
        self.is_causal = True


def _inputs(dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(BATCH, KV_HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(BATCH, KV_HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype).requires_grad_(grad)
    causal = torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()
    bias = torch.zeros(BATCH, 1, TOKENS, TOKENS, dtype=dtype).masked_fill(~causal, torch.finfo(dtype).min)
    return q, k, v, bias


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after 5 warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(repeats: int) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    kernels = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}
    module = _Attention().eval()
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        for mode in ("fwd", "fwd+bwd"):
            for name, kernel in kernels.items():
                q, k, v, bias = _inputs(dtype, grad=mode != "fwd")

                def step(kernel=kernel, q=q, k=k, v=v, bias=bias, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            kernel(module, q, k, v, bias, dropout=0.0, scaling=HEAD_DIM**-0.5)
                    else:
                        out, _ = kernel(module, q, k, v, bias, dropout=0.0, scaling=HEAD_DIM**-0.5)
                        torch.autograd.grad(out.float().sum(), (q, k, v))

                results[f"{str(dtype).removeprefix('torch.')} {mode} {name}"] = _time(step, repeats) * 1e3
    return results


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None, help="write the results (milliseconds) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = measure(args.repeats)
    for key, ms in results.items():
        print(f"{key:24s} {ms:8.3f} ms")
    if args.json:
        record = {
            "device": _cpu_name(),
            "threads": 1,
            "torch": torch.__version__,
            "shape": {"batch": BATCH, "tokens": TOKENS, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
            "median_ms": results,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
