"""Small stand-ins for tests and benchmarks: a tiny Llama config with odd sizes and synthetic batches.

``tiny_llama_config`` + ``hyperdas.targets.build_random_target`` give a target in milliseconds;
``make_batch`` gives a collated batch shaped exactly as hyperdas.data.collate makes one, with random tokens
and uneven, left-padded lengths; ``PlantedTarget`` knows a planted set of prompts; ``llama_in_float64`` makes a
float64 Llama float64 throughout; ``torchrun_command`` launches a script on local processes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

from hyperdas.data.batch import PairBatch


def tiny_llama_config(vocab_size: int, **overrides):
    """A Llama config small enough for CPU tests, with deliberately odd sizes (D=40, 5 heads, 1 KV head)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=40,
        intermediate_size=56,
        num_hidden_layers=3,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def torchrun_command(script, processes: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` of ``script`` on ``processes`` local processes, on a free port."""
    import sys

    from hyperdas.train.launch import free_local_port

    port = str(free_local_port())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        port,
        str(script),
        *args,
    ]


def make_batch(
    vocab_size: int, batch: int = 3, tb: int = 9, ts: int = 7, te: int = 5, labels: int = 2, seed: int = 0
) -> PairBatch:
    """A left-padded batch: base = prompt + labels, source = prompt, instruction; row b is b tokens shorter."""
    g = torch.Generator().manual_seed(seed)

    def left_padded(width: int, lengths: list[int]):
        ids = torch.randint(3, vocab_size, (batch, width), generator=g)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for b, n in enumerate(lengths):
            ids[b, : width - n] = 2
            mask[b, width - n :] = 1
        return ids, mask

    base_len = [tb - b for b in range(batch)]
    source_len = [ts - (b % 2) for b in range(batch)]
    base_ids, base_att = left_padded(tb, base_len)
    source_ids, source_att = left_padded(ts, source_len)
    instr_ids, instr_att = left_padded(te, [te - (b % 2) for b in range(batch)])
    base_sel = base_att.bool().clone()
    base_sel[:, tb - labels - 1 :] = False  # the label tokens and one suffix token are not selectable
    source_sel = source_att.bool().clone()
    source_sel[:, -1] = False  # a one-token source suffix
    label_positions = torch.arange(tb - labels - 1, tb - 1).expand(batch, -1).clone()
    label_ids = base_ids[:, tb - labels :].clone()
    label_ids[0, -1] = -100  # an example with a shorter label
    return PairBatch(
        base_input_ids=base_ids,
        base_attention_mask=base_att,
        base_intervention_mask=base_sel,
        source_input_ids=source_ids,
        source_attention_mask=source_att,
        source_intervention_mask=source_sel,
        instruction_input_ids=instr_ids,
        instruction_attention_mask=instr_att,
        label_positions=label_positions,
        label_ids=label_ids,
        base_entity_last=torch.tensor([tb - labels - 2] * batch),
        base_entity_first=torch.tensor([tb - labels - 3] * batch),  # two-token entities
        source_entity_last=torch.tensor([ts - 2] * batch),
        source_entity_first=torch.tensor([ts - 3] * batch),
        is_causal=torch.tensor([b % 2 == 0 for b in range(batch)]),
    )


class PlantedTarget:
    """A stand-in target that knows exactly the prompts naming one of ``known`` entities (a planted "known" set).

    On a row whose text contains a planted entity it predicts every next token right (teacher forcing: the
    argmax at position p is the token at p + 1); on any other row it predicts token 0, so such prompts are
    unknown. It counts its forward calls and the rows it saw.

    Args:
        tokenizer: a real tokenizer (RAVEL text must tokenise as for the embedded default).
        known: the planted entities; None plants every entity (it knows everything).
        name: its name, as a request names its target.
        dtype: the dtype it claims to run in.
    """

    def __init__(self, tokenizer, known=None, name: str = "planted", dtype: torch.dtype = torch.float32):
        self.tokenizer, self.name, self.dtype = tokenizer, name, dtype
        self.known = None if known is None else set(known)
        self.device = torch.device("cpu")
        self.calls = 0
        self.rows_seen = 0
        self.vocab = len(tokenizer)
        planted = sorted(self.known) if self.known is not None else "everything"
        self.fingerprint = hashlib.sha256(f"{name}:{planted}".encode()).hexdigest()[:12]

    def knows(self, text: str) -> bool:
        return self.known is None or any(entity in text for entity in self.known)

    def logits_at(self, input_ids, attention_mask, positions):
        self.calls += 1
        self.rows_seen += input_ids.shape[0]
        assert attention_mask.all(), "known-prompt checking must not pad a row (its answer would depend on its batch)"
        following = input_ids.gather(1, positions + 1)  # (B, P)
        texts = [self.tokenizer.decode(row[mask.bool()]) for row, mask in zip(input_ids, attention_mask, strict=True)]
        knows = torch.tensor([self.knows(t) for t in texts])[:, None]
        return torch.nn.functional.one_hot(torch.where(knows, following, 0), self.vocab).float()


@contextlib.contextmanager
def llama_in_float64() -> Iterator[None]:
    """Hugging Face's Llama computes its RMSNorm (forward and backward) and its RoPE cos/sin tables in float32
    even for float64 inputs, so a float64 run is only float32-accurate there (a 2**-24 relative rounding that two
    independent float64 paths place differently). Inside this context both compute in at least float32, i.e.
    float64 for float64 inputs and exactly as Hugging Face does for float32 and bfloat16 ones."""
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

    saved = LlamaRMSNorm.forward, LlamaRotaryEmbedding.forward
    LlamaRMSNorm.forward, LlamaRotaryEmbedding.forward = norm_forward, rope_forward
    try:
        yield
    finally:
        LlamaRMSNorm.forward, LlamaRotaryEmbedding.forward = saved
