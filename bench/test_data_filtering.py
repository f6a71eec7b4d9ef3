"""Benchmark: RAVEL examples filtered per second by the embedded default target (SmolLM2-135M-Instruct).

    python -m pytest bench/test_data_filtering.py --benchmark-only

One round filters the same fixed candidates (the default request's city Country / Continent kinds, both
splits, causal and isolate) in batches of 64: tokenise, left pad, one no-grad forward per batch with logits at
the label positions only, argmax check. extra_info: examples_per_second (the figure that sizes
``DataRequest.max_examples``), the mean tokens per teacher-forced row, the pass rate, and the device.
On CPU, bench/conftest.py runs torch on HYPERDAS_BENCH_CPU_THREADS threads (default 1).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from hyperdas.data.build import DataRequest
from hyperdas.data.collate import encode_texts, label_token_ids
from hyperdas.data.examples import label_value, make_examples
from hyperdas.data.filtering import filter_examples
from hyperdas.targets import EMBEDDED_DEFAULT, load_target

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PER_KIND = 128 if CUDA else 8  # 8 kinds: 64 candidates on CPU (about 5 s a round on one core)
BATCH_SIZE = 64


@pytest.fixture(scope="module")
def target():
    return load_target(EMBEDDED_DEFAULT, device=DEVICE)


@pytest.fixture(scope="module")
def candidates():
    request = DataRequest()
    return make_examples(request.domain, request.attributes, PER_KIND, seed=request.seed)


def test_filter_throughput(benchmark, target, candidates):
    filter_examples(target, candidates[:BATCH_SIZE], batch_size=BATCH_SIZE, progress=False)  # warm-up
    keep = benchmark.pedantic(
        filter_examples,
        args=(target, candidates),
        kwargs={"batch_size": BATCH_SIZE, "progress": False},
        rounds=3,
        iterations=1,
    )
    tok = target.tokenizer
    prompts = encode_texts(tok, [e["verify_text"] for e in candidates])
    labels = label_token_ids(tok, [e["verify_text"] for e in candidates], [label_value(e) for e in candidates])
    benchmark.extra_info.update(
        {
            "op": "data_filtering",
            "case": f"{EMBEDDED_DEFAULT} city Country+Continent, {len(candidates)} candidates",
            "mode": "no_grad",
            "path": "logits_at",
            "examples_per_second": len(candidates) / benchmark.stats.stats.mean,
            "examples": len(candidates),
            "batch_size": BATCH_SIZE,
            "mean_tokens_per_row": statistics.fmean(len(p) + len(lab) for p, lab in zip(prompts, labels, strict=True)),
            "pass_rate": statistics.fmean(keep),
            "target": EMBEDDED_DEFAULT,
            "dtype": str(target.dtype),
            "device": DEVICE,
        }
    )
