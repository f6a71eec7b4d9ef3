"""Shared fixtures: a tiny random Llama target (odd sizes) and the embedded default, each built once."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; this must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hyperdas.targets import EMBEDDED_DEFAULT, FrozenTarget, build_random_target, load_target  # noqa: E402
from hyperdas.testing import tiny_llama_config  # noqa: E402


@pytest.fixture(scope="session")
def smollm2() -> FrozenTarget:
    """The embedded default target (SmolLM2-135M-Instruct), converted once per machine and cached."""
    return load_target(EMBEDDED_DEFAULT)


@pytest.fixture(scope="session")
def tiny_target(smollm2) -> FrozenTarget:
    """A random 3-layer Llama with SmolLM2's tokenizer, so real RAVEL text tokenises."""
    return build_random_target(tiny_llama_config(len(smollm2.tokenizer)), tokenizer=smollm2.tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_target_f64(smollm2) -> FrozenTarget:
    """The tiny random Llama in float64, for exact-equivalence tests."""
    return build_random_target(
        tiny_llama_config(len(smollm2.tokenizer)), tokenizer=smollm2.tokenizer, dtype=torch.float64, seed=0
    )



@pytest.fixture()
def llama_in_float64(monkeypatch):
    """Hugging Face's Llama computes two things in float32 even for float64 inputs: the RMSNorm (forward and
    backward) and the RoPE cos/sin tables. A float64 run is then only float32-accurate there (a 2**-24
    relative rounding that two independent float64 paths place differently). Float64 oracle comparisons lift
    those two casts, on both sides: the same formulas in at least float32, which leaves float32 and bfloat16
    inputs exactly as Hugging Face computes them."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    def norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        wide = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)

    def rope_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        dtype = torch.promote_types(x.dtype, torch.float32)
        freqs = position_ids[..., None].to(dtype) * self.inv_freq.to(device=x.device, dtype=dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    monkeypatch.setattr(LlamaRMSNorm, "forward", norm_forward)
    monkeypatch.setattr(LlamaRotaryEmbedding, "forward", rope_forward)
