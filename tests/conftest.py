"""Shared fixtures: a tiny random Llama target (odd sizes) and the embedded default, each built once."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; this must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hyperdas.targets import EMBEDDED_DEFAULT, FrozenTarget, build_random_target, load_target  # noqa: E402
from hyperdas.testing import llama_in_float64 as float64_llama  # noqa: E402
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
def llama_in_float64():
    """A float64 Llama computes in float64 throughout (see hyperdas.testing.llama_in_float64)."""
    with float64_llama():
        yield
