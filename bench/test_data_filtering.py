"""Benchmark: RAVEL prompts checked per second by the embedded default target (SmolLM2-135M-Instruct).

    python -m pytest bench/test_data_filtering.py --benchmark-only

One round checks the same fixed prompts (the main job's attributes, a few entities per template, both splits)
in batches of 64 in the main job's dtype (bf16): tokenise, left pad, one no-grad forward per batch with logits at
the label positions only, argmax check. extra_info: prompts_per_second (the figure that sizes
``DataRequest.entities_per_template``), the mean tokens per teacher-forced row, the known rate, and the device.
On CPU, bench/conftest.py runs torch on HYPERDAS_BENCH_CPU_THREADS threads (default 1).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from hyperdas.data.collate import encode_texts, label_token_ids
from hyperdas.data.examples import fill
from hyperdas.data.known import check_prompts, prompt_universe
from hyperdas.data.ravel import load_domain
from hyperdas.targets import EMBEDDED_DEFAULT, load_target

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PER_TEMPLATE = 16 if CUDA else 1  # 133 templates: 133 prompts a round on CPU
BATCH_SIZE = 64
ATTRIBUTES = ("Country", "Continent", "Language")


@pytest.fixture(scope="module")
def target():
    return load_target(EMBEDDED_DEFAULT, dtype=torch.bfloat16, device=DEVICE)


@pytest.fixture(scope="module")
def prompts():
    return prompt_universe(load_domain("city"), ATTRIBUTES, PER_TEMPLATE)


def test_prompt_check_throughput(benchmark, target, prompts):
    city = load_domain("city")
    check_prompts(target, city, prompts[:BATCH_SIZE], batch_size=BATCH_SIZE, progress=False)  # warm-up
    known = benchmark.pedantic(
        check_prompts,
        args=(target, city, prompts),
        kwargs={"batch_size": BATCH_SIZE, "progress": False},
        rounds=3,
        iterations=1,
    )
    tok = target.tokenizer
    texts = ["".join(fill(p.template, p.entity)) for p in prompts]
    rows = encode_texts(tok, texts)
    labels = label_token_ids(tok, texts, [city.value(p.entity, p.attribute) for p in prompts])
    benchmark.extra_info.update(
        {
            "op": "data_filtering",
            "case": f"{EMBEDDED_DEFAULT} city {'+'.join(ATTRIBUTES)}, {len(prompts)} prompts",
            "mode": "no_grad",
            "path": "logits_at",
            "prompts_per_second": len(prompts) / benchmark.stats.stats.mean,
            "prompts": len(prompts),
            "batch_size": BATCH_SIZE,
            "mean_tokens_per_row": statistics.fmean(len(r) + len(lab) for r, lab in zip(rows, labels, strict=True)),
            "known_rate": statistics.fmean(known),
            "target": EMBEDDED_DEFAULT,
            "dtype": str(target.dtype),
            "device": DEVICE,
        }
    )
