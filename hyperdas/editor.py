"""The hypernetwork ("editor"): L decoder layers of the target's architecture that read both runs.

Each layer, with pre-RMSNorm and a residual around each block (METHOD.md §2):
  1. causal self-attention over the instruction tokens,
  2. cross-attention to the SOURCE run's states,
  3. cross-attention to the BASE run's states,
  4. SwiGLU MLP.
Keys/values of a cross-attention are all N hidden states of every selectable token of that run (its
intervention mask), each L2-normalised, flattened to S = W·N keys (``RunKeys``). Since the projections are linear,
k_proj(x/‖x‖) = k_proj(x)/‖x‖: the normalisation is passed as a per-key scale (``inv_norm``) and no
normalised copy of the (B, S, D) states is made. Every block owns its weights (the reference aliased one
tensor for all three attention blocks, so AdamW updated it three times a step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hyperdas.kernels.cross_attention import normalized_cross_attention
from hyperdas.targets import FrozenTarget, attention_kernel_for, causal_padding_bias, position_ids_from_mask


@dataclass
class RunKeys:
    """One target run, seen as the keys of a cross-attention: the selectable tokens' states at every layer.

    Keys of tokens outside the run's intervention mask are masked out of the attention anyway, so only the
    selectable tokens are kept, moved to the front of each row in their order (the attention is invariant to
    the order of its keys; each key keeps its own RoPE position). That skips the key/value projections, RoPE and
    scores of the masked majority of the T·N states (the base suffix, the labels, the source suffix, padding).

    Attributes:
        states: (B, S, D) raw hidden states, S = W·N with W the most selectable tokens of a row, token-major
            (s = w·N + n).
        inv_norm: (B, S) float32 (float64 for float64 states), 1/‖states_s‖.
        positions: (B, S) long RoPE positions: real-token index t'·N + n of the key's token t' and layer n.
        mask: (B, S) bool: the key is a selectable token's (False on the padding of rows with fewer).
    """

    states: torch.Tensor
    inv_norm: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_states(cls, states: torch.Tensor, attention_mask: torch.Tensor, intervention_mask: torch.Tensor):
        """states: (B, T, N, D); attention_mask: (B, T); intervention_mask: (B, T) bool."""
        b, t, n, d = states.shape
        selectable = intervention_mask.bool()
        counts = selectable.sum(dim=1)  # (B,)
        width = max(int(counts.max()), 1)
        # the selectable tokens first, in order (a stable sort of "not selectable"), then the others
        order = torch.argsort((~selectable).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, W)
        valid = torch.arange(width, device=states.device)[None] < counts[:, None]  # (B, W)
        picked = states.gather(1, order[:, :, None, None].expand(b, width, n, d))  # (B, W, N, D)
        flat = picked.reshape(b, width * n, d)
        # half-precision states accumulate in fp32 without materialising an fp32 copy of (B, S, D)
        wide = torch.float32 if flat.dtype in (torch.bfloat16, torch.float16) else None
        norm = torch.linalg.vector_norm(flat, dim=-1, dtype=wide)
        inv_norm = norm.to(torch.promote_types(norm.dtype, torch.float32)).clamp_min(1e-12).reciprocal()
        layer_index = torch.arange(n, device=states.device)
        token_positions = position_ids_from_mask(attention_mask).gather(1, order)  # (B, W)
        positions = (token_positions[:, :, None] * n + layer_index).reshape(b, width * n)
        mask = valid[:, :, None].expand(b, width, n).reshape(b, width * n)
        return cls(flat, inv_norm, positions, mask)


class CrossAttention(nn.Module):
    """Instruction queries over one run's flattened, normalised states (GQA, RoPE on both sides)."""

    def __init__(self, attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(
        self, x: torch.Tensor, q_positions: torch.Tensor, run: RunKeys, inv_freq: torch.Tensor, use_triton: bool | None
    ) -> torch.Tensor:
        """x: (B, Te, D) normed instruction states -> (B, Te, D)."""
        b, te, _ = x.shape
        s = run.states.shape[1]
        inv_norm = run.inv_norm
        keys_in = run.states
        if self.k_proj.bias is not None or self.v_proj.bias is not None:
            # k_proj(x/‖x‖) = k_proj(x)/‖x‖ needs a bias-free projection; otherwise normalise first.
            keys_in = (keys_in.float() * inv_norm[..., None]).to(keys_in.dtype)
            inv_norm = torch.ones_like(inv_norm)
        q = self.q_proj(x).view(b, te, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, Te, hd)
        k = self.k_proj(keys_in).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(keys_in).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = normalized_cross_attention(
            q, k, v, inv_norm, q_positions, run.positions, inv_freq, run.mask, use_triton=use_triton
        )  # (B, Hq, Te, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, te, self.num_heads * self.head_dim))


class EditorLayer(nn.Module):
    """Self-attention, source cross-attention, base cross-attention, MLP; each block its own weights.

    The paper's ablations: ``reads_source`` / ``reads_base`` False drop that cross-attention block (the editor
    then never attends to that run's tokens); ``symmetric`` reads both runs with ONE cross-attention block (its
    norm and weights shared by the two reads) instead of one block each. ``dropout`` p zeroes each element of
    every block's output with probability p in training (scaling the rest by 1/(1-p)) before it joins the
    residual stream: x + drop(block(norm(x))); evaluation (``eval()``) adds the block's output unchanged.
    """

    def __init__(
        self,
        decoder_layer: nn.Module,
        config,
        reads_source: bool = True,
        reads_base: bool = True,
        symmetric: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if symmetric and not (reads_source and reads_base):
            raise ValueError("a symmetric editor reads both runs: it needs reads_source and reads_base")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        own = copy.deepcopy  # every block gets its own copy of the weights it starts from

        def cross():
            return own(decoder_layer.input_layernorm), CrossAttention(
                own(decoder_layer.self_attn), heads, kv_heads, head_dim
            )

        self.self_attn_norm = own(decoder_layer.input_layernorm)
        self.self_attn = own(decoder_layer.self_attn)
        self.source_norm, self.source_attn = cross() if reads_source else (None, None)
        self.base_norm, self.base_attn = cross() if reads_base and not symmetric else (None, None)
        self.symmetric = symmetric
        self.mlp_norm = own(decoder_layer.post_attention_layernorm)
        self.mlp = own(decoder_layer.mlp)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x, self_bias, position_embeddings, q_positions, source: RunKeys, base: RunKeys, inv_freq, use_triton
    ):
        """x: (B, Te, D) -> (B, Te, D)."""
        attn = self.self_attn(
            hidden_states=self.self_attn_norm(x), position_embeddings=position_embeddings, attention_mask=self_bias
        )
        drop = self.dropout
        x = x + drop(attn[0] if isinstance(attn, tuple) else attn)
        if self.source_attn is not None:
            x = x + drop(self.source_attn(self.source_norm(x), q_positions, source, inv_freq, use_triton))
        base_norm, base_attn = (
            (self.source_norm, self.source_attn) if self.symmetric else (self.base_norm, self.base_attn)
        )
        if base_attn is not None:
            x = x + drop(base_attn(base_norm(x), q_positions, base, inv_freq, use_triton))
        return x + drop(self.mlp(self.mlp_norm(x)))


def _fresh_like(layer: nn.Module, config, index: int) -> nn.Module:
    """A freshly initialised decoder layer of the same class (initialize_from_scratch)."""
    fresh = type(layer)(config, index)
    std = getattr(config, "initializer_range", 0.02)
    for module in fresh.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return fresh.to(next(layer.parameters()).dtype)


class Editor(nn.Module):
    """The hypernetwork: instruction tokens in, encoding e (B, D) out (final-normed last instruction token)."""

    def __init__(
        self,
        target: FrozenTarget,
        num_layers: int,
        from_scratch: bool,
        trainable_embeddings: bool,
        reads_source: bool = True,
        reads_base: bool = True,
        symmetric: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        config = target.config
        rope_scale = getattr(target.rotary_emb, "attention_scaling", 1.0)
        if rope_scale != 1.0:
            raise ValueError(
                f"the target's RoPE attention_scaling is {rope_scale}; the editor's cross-attention supports 1.0"
            )
        firsts = list(target.layers[:num_layers])
        sources = [_fresh_like(layer, config, i) for i, layer in enumerate(firsts)] if from_scratch else firsts
        self.layers = nn.ModuleList(
            EditorLayer(layer, config, reads_source, reads_base, symmetric, dropout) for layer in sources
        )
        self.final_norm = copy.deepcopy(target.final_norm)
        self.rotary_emb = copy.deepcopy(target.rotary_emb)
        self.embed_tokens = copy.deepcopy(target.embed_tokens) if trainable_embeddings else None
        self.gradient_checkpointing = False
        self.use_triton: bool | None = None  # the cross-attention's path; None = Triton on CUDA
        self.attention = target.attention  # the self-attention kernel request, as the target's
        self.requires_grad_(True)
        self._set_attention_kernel()

    def _set_attention_kernel(self) -> None:
        """The copied self-attention layers hold their own config: give them the kernel for the editor's own
        device and dtype (`attention_kernel_for`), as the target does for its weights."""
        weight = next(self.parameters())
        kernel = attention_kernel_for(weight.device, weight.dtype, self.attention)
        for layer in self.layers:
            layer.self_attn.config._attn_implementation = kernel

    def _apply(self, fn, recurse: bool = True):
        """After ``.to()`` / ``.float()`` / ``.cuda()`` (the model casts the editor to its fp32 masters)."""
        super()._apply(fn, recurse)
        self._set_attention_kernel()
        return self

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.rotary_emb.inv_freq

    def forward(
        self,
        instruction_embeds: torch.Tensor,
        instruction_mask: torch.Tensor,
        source: RunKeys,
        base: RunKeys,
    ) -> torch.Tensor:
        """instruction_embeds: (B, Te, D), left padded; instruction_mask: (B, Te) -> encoding e: (B, D)."""
        x = instruction_embeds
        q_positions = position_ids_from_mask(instruction_mask)
        self_bias = causal_padding_bias(instruction_mask, x.dtype)
        position_embeddings = self.rotary_emb(x, q_positions)
        inv_freq = self.inv_freq.float()
        for layer in self.layers:
            args = (x, self_bias, position_embeddings, q_positions, source, base, inv_freq, self.use_triton)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.final_norm(x)[:, -1]
