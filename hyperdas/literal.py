"""A literal, four-pass HyperDAS step: METHOD.md written out the way the reference computes it.

This is the oracle that the two-pass step in hyperdas.model must equal (same loss, same gradients) and the
baseline the step benchmark compares against. It is deliberately wasteful, as the reference is:

1. base run through the whole target (full-vocabulary logits, unread) to collect every hidden state;
2. source run likewise;
3. source run AGAIN just to read layer k;
4. base run AGAIN from the embeddings with a forward hook that replaces layer k's input with the patched
   states, full-vocabulary logits, then the label positions are picked.
The selection materialises the pair tensor c (B, Ts, Tb, D), the interchange materialises Aᵀ S as
(B, Ts, Tb, D) and W Wᵀ as (B, D, D). Only the editor and the subspace MLP are shared with the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyperdas.editor import RunKeys
from hyperdas.model import HyperDAS, LossWeights, sparsity_penalty, weighted_label_loss
from hyperdas.selection import apply_selection_mode
from hyperdas.subspace import MaskSelect, ReflectSelect, StaticDAS
from hyperdas.targets import position_ids_from_mask


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x: (..., T, H, hd) rotated at positions (..., T) the Hugging Face way (rotate_half)."""
    freqs = positions[..., None].to(torch.float64) * inv_freq.to(torch.float64)  # (..., T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[..., None, :].to(x.dtype)  # (..., T, 1, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def _run_collecting_states(model: HyperDAS, ids: torch.Tensor, mask: torch.Tensor, patch=None):
    """A full target forward (LM head on every position); returns (logits, states (B, T, N, D)).

    ``patch``: optional (k, states) replacing the input of decoder layer k (k = 0: the embeddings).
    """
    target = model.target
    captured: list[torch.Tensor] = []
    handles = []

    def keep(_module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        if patch is not None and len(captured) == patch[0]:
            out = patch[1]
        captured.append(out)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handles.append(target.embed_tokens.register_forward_hook(keep))
    handles.extend(layer.register_forward_hook(keep) for layer in target.layers)
    try:
        logits = target.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, torch.stack(captured, dim=2)


def _literal_selection(model: HyperDAS, encoding, h, s, base_positions, base_mask, source_mask):
    head = model.selection_head
    heads, hd = head.num_heads, head.head_dim
    b_hat, s_hat = F.normalize(h, dim=-1), F.normalize(s, dim=-1)
    pairs = head.base_proj(b_hat)[:, None, :, :] + head.source_proj(s_hat)[:, :, None, :]  # (B, Ts, Tb, D)
    keys = head.key_proj(pairs).unflatten(-1, (heads, hd))  # (B, Ts, Tb, H, hd)
    self_keys = head.key_proj(b_hat).unflatten(-1, (heads, hd))[:, None]  # (B, 1, Tb, H, hd)
    keys = torch.cat([keys, self_keys], dim=1)  # (B, Ts+1, Tb, H, hd)
    ts1 = keys.shape[1]
    keys = _rope(keys, base_positions[:, None, :].expand(-1, ts1, -1), model.editor.inv_freq)
    query = head.query_proj(encoding).unflatten(-1, (heads, hd))  # (B, H, hd)
    logits = torch.einsum("bhd,bijhd->bij", query, keys)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / (heads * hd**0.5)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[:, :-1] = source_mask[:, :, None] & base_mask[:, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=1)


def _literal_basis(model: HyperDAS, encoding):
    sub = model.subspace
    if isinstance(sub, ReflectSelect):
        rotation = sub.rotation()
        u = sub.reflector(encoding)
        v = u / u.norm(dim=-1, keepdim=True)
        eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
        householder = eye - 2.0 * v[:, :, None] * v[:, None, :]  # (B, D, D)
        return householder @ rotation
    if isinstance(sub, MaskSelect):
        rotation = sub.rotation()
        mask = torch.sigmoid(sub.mask_logits(encoding) / sub.temperature)
        return rotation[None] * mask.sqrt()[:, None, :]
    if isinstance(sub, StaticDAS):
        return sub.rotation()[None].expand(encoding.shape[0], -1, -1)
    return None


def literal_four_pass_forward(
    model: HyperDAS, batch: dict, mode: str = "soft", loss_weights: LossWeights | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's step, literally: returns (loss, logits at the label positions (B, P, V))."""
    with model.precision_context(batch["base_input_ids"].device):
        return _literal_four_pass(model, batch, mode, loss_weights)


def _literal_four_pass(model, batch, mode, loss_weights):
    k = model.config.intervention_layer
    base_ids, base_att = batch["base_input_ids"], batch["base_attention_mask"]
    src_ids, src_att = batch["source_input_ids"], batch["source_attention_mask"]
    base_mask = batch["base_intervention_mask"].bool()
    source_mask = batch["source_intervention_mask"].bool()
    with torch.no_grad():
        _, base_states = _run_collecting_states(model, base_ids, base_att)  # pass 1
        _, source_states = _run_collecting_states(model, src_ids, src_att)  # pass 2
        _, source_again = _run_collecting_states(model, src_ids, src_att)  # pass 3: layer k only
    encoding = model.editor(
        model.instruction_embeddings(batch["instruction_input_ids"]),
        batch["instruction_attention_mask"],
        RunKeys.from_states(source_states, src_att, source_mask),
        RunKeys.from_states(base_states, base_att, base_mask),
    )
    h, s = base_states[:, :, k], source_again[:, :, k]
    soft = _literal_selection(model, encoding, h, s, position_ids_from_mask(base_att), base_mask, source_mask)
    selection = apply_selection_mode(
        soft, mode, base_mask, source_mask, batch.get("base_entity_last"), batch.get("source_entity_last")
    ).to(h.dtype)
    taken = (selection[:, :-1, :, None] * s[:, :, None, :]).sum(dim=1)  # (B, Ts, Tb, D) summed over Ts
    mixed = taken + selection[:, -1, :, None] * h  # s̃: (B, Tb, D)
    basis = _literal_basis(model, encoding)
    if basis is None:
        patched = mixed
    else:
        projector = basis @ basis.transpose(1, 2)  # (B, D, D)
        patched = h + (mixed - h) @ projector
    patched = torch.where(base_mask[..., None], patched, h)
    full_logits, _ = _run_collecting_states(model, base_ids, base_att, patch=(k, patched))  # pass 4
    positions = batch["label_positions"]
    logits = full_logits.gather(1, positions[..., None].expand(-1, -1, full_logits.shape[-1]))
    weights = loss_weights or LossWeights()
    loss = weighted_label_loss(logits, batch["label_ids"], batch["is_causal"], weights)
    return loss + weights.sparsity * sparsity_penalty(selection), logits
