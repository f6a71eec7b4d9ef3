"""A literal, four-pass HyperDAS step: METHOD.md written out from scratch, the oracle of hyperdas.model.

The two-pass step in hyperdas.model must equal this (same loss, same logits, same gradient of every trained
parameter), so nothing here is shared with the code it checks. It reads the model's config and the trained
parameters (the editor's, the selection head's, the subspace module's), and runs the frozen target through
its own Hugging Face forward; it calls no forward of the editor, selection head or subspace module and none
of hyperdas' helpers. Written from METHOD.md with plain matmuls: RMSNorm, RoPE, GQA attention, SwiGLU, the
cross-attention keys (every layer's states, L2-normalised, at position token·N + layer), the selection head
with its (B, Ts, Tb, 2D) pair tensor, every inference mode, the basis R from Gram-Schmidt, the Householder
matrices, the cross-entropy and the hinge.

It is also deliberately wasteful, as the reference is (the step benchmark's baseline):

1. base run through the whole target (full-vocabulary logits, unread) to collect every hidden state;
2. source run likewise;
3. source run AGAIN just to read layer k;
4. base run AGAIN from the embeddings with a forward hook that replaces layer k's input with the patched
   states, full-vocabulary logits, then the label positions are picked.
The selection materialises the pair tensor, the interchange Aᵀ S as (B, Ts, Tb, D) and W Wᵀ as (B, D, D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hyperdas.data.batch import PairBatch
from hyperdas.model import HyperDAS, LossWeights

#: METHOD.md's loss weights, used when the caller passes none (written here, not read from hyperdas.model).
CAUSAL_WEIGHT, ISOLATE_WEIGHT = 3.5, 0.5
#: bidding_argmax: the SELF weight is floored at this before the column argmax (METHOD.md section 3).
SELF_FLOOR = 0.1
LABEL_PAD = -100


# --- plain building blocks --------------------------------------------------------------------------------


def _real_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 -> (B, T): index among the real tokens (left padding not counted), 0 on padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _llama_rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """weight · x / sqrt(mean(x²) + eps) as Llama defines it, in float32 (float64 for float64 x: Hugging Face
    rounds that to float32 too; the float64 tests lift that cast on both sides), then back to x's dtype."""
    wide = _wide(x)
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def _rms_norm(x: torch.Tensor, norm: torch.nn.RMSNorm) -> torch.Tensor:
    """weight · x / sqrt(mean(x²) + eps) in x's dtype (the subspace modules' torch RMSNorm)."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def _linear(x: torch.Tensor, proj: torch.nn.Linear) -> torch.Tensor:
    out = x @ proj.weight.t()
    return out if proj.bias is None else out + proj.bias


def _swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    return _linear(F.silu(_linear(x, gate)) * _linear(x, up), down)


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd) rotated at positions (B, T): x·cos + rotate_half(x)·sin, angles p·inv_freq."""
    angle_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = positions.to(angle_dtype)[..., None] * inv_freq.to(angle_dtype)  # (B, T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * emb.cos().to(x.dtype) + rotated * emb.sin().to(x.dtype)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """GQA: q (B, Hq, Tq, hd), k/v (B, Hkv, Tk, hd), allowed (B, Tq, Tk) -> (B, Tq, Hq·hd); no key -> 0."""
    b, hq, tq, hd = q.shape
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # query head h reads h // group
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # (B, Hq, Tq, Tk)
    allowed = allowed[:, None]
    any_key = allowed.any(dim=-1, keepdim=True)
    scores = torch.where(any_key, scores.masked_fill(~allowed, float("-inf")), torch.zeros_like(scores))
    weights = scores.softmax(dim=-1) * allowed  # rows without any key: uniform * 0 = 0
    return (weights @ v).transpose(1, 2).reshape(b, tq, hq * hd)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H·hd) -> (B, H, T, hd)."""
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


# --- the editor -----------------------------------------------------------------------------------------


def _cross_keys(states: torch.Tensor, attention_mask: torch.Tensor, selectable: torch.Tensor):
    """A run as cross-attention keys: (B, T·N, D) L2-normalised states, positions t'·N + n, key mask."""
    b, t, n, d = states.shape
    normed = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    positions = _real_positions(attention_mask)[:, :, None] * n + torch.arange(n, device=states.device)
    keep = selectable.bool()[:, :, None].expand(b, t, n)
    return normed.reshape(b, t * n, d), positions.reshape(b, t * n), keep.reshape(b, t * n)


def _cross_attention(block, x, q_positions, run, inv_freq, head_dim):
    keys, k_positions, keep = run
    q = _rope(_heads(_linear(x, block.q_proj), head_dim), q_positions, inv_freq)
    k = _rope(_heads(_linear(keys.to(x.dtype), block.k_proj), head_dim), k_positions, inv_freq)
    v = _heads(_linear(keys.to(x.dtype), block.v_proj), head_dim)
    allowed = keep[:, None, :].expand(-1, x.shape[1], -1)
    return _linear(_attention(q, k, v, allowed), block.o_proj)


def _self_attention(block, x, positions, token_mask, inv_freq, head_dim):
    t = x.shape[1]
    q = _rope(_heads(_linear(x, block.q_proj), head_dim), positions, inv_freq)
    k = _rope(_heads(_linear(x, block.k_proj), head_dim), positions, inv_freq)
    v = _heads(_linear(x, block.v_proj), head_dim)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    allowed = causal[None] & token_mask.bool()[:, None, :]
    return _linear(_attention(q, k, v, allowed), block.o_proj)


def _encoding(model: HyperDAS, batch: PairBatch, source_states, base_states, block_masks=None) -> torch.Tensor:
    """The editor's final-normed state at the last instruction token, e: (B, D). ``block_masks``: residual
    dropout's multipliers, x + m ⊙ block(norm(x)), one (B, Te, D) per block in order; None = all ones."""
    editor, target = model.editor, model.target
    config = target.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = target.rotary_emb.inv_freq
    ids, mask = batch.instruction_input_ids, batch.instruction_attention_mask
    table = editor.embed_tokens.weight if editor.embed_tokens is not None else target.embed_tokens.weight.detach()
    x = table[ids]  # (B, Te, D)
    positions = _real_positions(mask)
    source = _cross_keys(source_states, batch.source_attention_mask, batch.source_intervention_mask)
    base = _cross_keys(base_states, batch.base_attention_mask, batch.base_intervention_mask)
    masks = iter(block_masks) if block_masks is not None else None

    def dropped(out):
        return out if masks is None else out * next(masks)

    for layer in editor.layers:
        normed = _llama_rms_norm(x, layer.self_attn_norm)
        x = x + dropped(_self_attention(layer.self_attn, normed, positions, mask, inv_freq, head_dim))
        normed = _llama_rms_norm(x, layer.source_norm)
        x = x + dropped(_cross_attention(layer.source_attn, normed, positions, source, inv_freq, head_dim))
        normed = _llama_rms_norm(x, layer.base_norm)
        x = x + dropped(_cross_attention(layer.base_attn, normed, positions, base, inv_freq, head_dim))
        mlp = layer.mlp
        x = x + dropped(_swiglu(_llama_rms_norm(x, layer.mlp_norm), mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return _llama_rms_norm(x, editor.final_norm)[:, -1]


# --- selection ------------------------------------------------------------------------------------------


def _soft_selection(model: HyperDAS, encoding, h, s, batch) -> torch.Tensor:
    """A (B, Ts+1, Tb) from the literal pair tensor c_ij = W_c [b̂_j ; ŝ_i], SELF row c = b̂_j."""
    head = model.selection_head
    heads, hd = head.num_heads, head.head_dim
    inv_freq = model.target.rotary_emb.inv_freq
    b, tb, d = h.shape
    ts = s.shape[1]
    b_hat = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s_hat = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    pairs = torch.cat([b_hat[:, None].expand(b, ts, tb, d), s_hat[:, :, None].expand(b, ts, tb, d)], dim=-1)
    w_c = torch.cat([head.base_proj.weight, head.source_proj.weight], dim=1)  # (D, 2D)
    c = torch.cat([pairs @ w_c.t(), b_hat[:, None]], dim=1)  # (B, Ts+1, Tb, D)
    keys = (c @ head.key_proj.weight.t()).view(b, ts + 1, tb, heads, hd)
    base_positions = _real_positions(batch.base_attention_mask)  # (B, Tb)
    keys = _rope(
        keys.permute(0, 3, 1, 2, 4).reshape(b, heads, (ts + 1) * tb, hd),
        base_positions[:, None, :].expand(b, ts + 1, tb).reshape(b, (ts + 1) * tb),
        inv_freq,
    )
    keys = keys.view(b, heads, ts + 1, tb, hd)
    query = (encoding @ head.query_proj.weight.t()).view(b, heads, 1, hd)
    query_position = _real_positions(batch.instruction_attention_mask)[:, -1:]  # (B, 1)
    query = _rope(query, query_position, inv_freq)[:, :, 0]  # (B, H, hd)
    logits = _wide(torch.einsum("bhd,bhijd->bij", query, keys)) / (heads * math.sqrt(hd))
    logits = logits / model.selection_temperature  # the annealed selection temperature τ
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[:, :ts] = (
        batch.source_intervention_mask.bool()[:, :, None] & batch.base_intervention_mask.bool()[:, None, :]
    )
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=1)


def _hard_selection(soft: torch.Tensor, mode: str, batch: PairBatch) -> torch.Tensor:
    """METHOD.md's inference modes, one example and one column at a time."""
    if mode == "soft":
        return soft
    b, rows, tb = soft.shape
    ts = rows - 1
    base_ok = batch.base_intervention_mask.bool()
    source_ok = batch.source_intervention_mask.bool()
    values = soft.detach().tolist()
    choice = [[ts] * tb for _ in range(b)]  # the source row each base column takes (ts = SELF)
    for e in range(b):
        a = values[e]
        if mode == "column_argmax":
            for j in range(tb):
                column = [a[i][j] for i in range(rows)]
                choice[e][j] = column.index(max(column))
        elif mode == "bidding_argmax":
            bids = [[0.0] * tb for _ in range(ts)]
            for i in range(ts):
                if source_ok[e, i]:
                    best = a[i].index(max(a[i]))  # each source token bids for its best base position only
                    bids[i][best] = a[i][best]
            for j in range(tb):
                column = [bids[i][j] for i in range(ts)] + [max(a[ts][j], SELF_FLOOR)]
                choice[e][j] = column.index(max(column))
        elif mode == "global_argmax":
            pairs = [(a[i][j], i, j) for i in range(ts) for j in range(tb) if source_ok[e, i] and base_ok[e, j]]
            if pairs:
                best = max(pairs, key=lambda pair: pair[0])
                choice[e][best[2]] = best[1]
        elif mode == "groundtruth":
            choice[e][int(batch.base_entity_last[e])] = int(batch.source_entity_last[e])
        else:
            raise ValueError(f"unknown selection mode {mode!r}")
    hard = torch.zeros_like(soft)
    for e in range(b):
        for j in range(tb):
            hard[e, choice[e][j] if base_ok[e, j] else ts, j] = 1.0
    return hard


# --- the basis ------------------------------------------------------------------------------------------


def _gram_schmidt(p: torch.Tensor) -> torch.Tensor:
    """(D, r) -> (D, r) orthonormal columns spanning p's leading columns (QR with a positive diagonal)."""
    columns = []
    for k in range(p.shape[1]):
        v = p[:, k]
        for q in columns:
            v = v - (q @ v) * q
        columns.append(v / v.norm())
    return torch.stack(columns, dim=1)


def _rotations(model: HyperDAS, batch: PairBatch, b: int) -> torch.Tensor:
    """R per example (B, D, r): the shared basis, or the basis of the attribute each example's instruction names."""
    weight = _wide(model.subspace.rotation.weight)
    if not model.config.basis_per_attribute:
        return _gram_schmidt(weight)[None].expand(b, -1, -1)
    bank = {name: _gram_schmidt(weight[i]) for i, name in enumerate(model.config.basis_attributes)}
    return torch.stack([bank[name] for name in batch.attribute])


def _basis(model: HyperDAS, encoding: torch.Tensor, batch: PairBatch) -> torch.Tensor | None:
    """W (B, D, r) of the model's subspace module, or None for the full vector."""
    sub = model.subspace
    name = model.config.subspace_module
    if name == "full":
        return None
    b = encoding.shape[0]
    rotation = _rotations(model, batch, b)  # (B, D, r)
    e = _wide(encoding)
    if name == "DAS":
        return rotation
    mlp = sub.reflector if name == "ReflectSelect" else sub.mask_logits
    out = _wide(_swiglu(_rms_norm(e, mlp.norm), mlp.gate, mlp.up, mlp.down))
    if name == "ReflectSelect":
        d = rotation.shape[1]
        eye = torch.eye(d, dtype=out.dtype, device=out.device)
        basis = rotation
        for k in range(out.shape[-1] // d):  # W = H_K ··· H_1 R
            v = out[:, k * d : (k + 1) * d]
            v = v / v.norm(dim=-1, keepdim=True)
            householder = eye - 2.0 * v[:, :, None] * v[:, None, :]  # (B, D, D)
            basis = householder @ basis
        return basis
    if name == "MaskSelect":
        mask = torch.sigmoid(out / float(sub.temperature))  # (B, r)
        return rotation * mask.sqrt()[:, None, :]
    raise ValueError(f"unknown subspace module {name!r}")


# --- the losses -----------------------------------------------------------------------------------------


def _label_loss(logits: torch.Tensor, batch: PairBatch, weights: LossWeights | None) -> torch.Tensor:
    """mean_b w_b · mean over b's label tokens of −log p(label); w = causal or isolate weight."""
    causal, isolate = (CAUSAL_WEIGHT, ISOLATE_WEIGHT) if weights is None else (weights.causal, weights.isolate)
    log_probs = _wide(logits).log_softmax(dim=-1)  # (B, P, V)
    labels = batch.label_ids
    real = labels != LABEL_PAD
    picked = log_probs.gather(-1, labels.clamp_min(0)[..., None])[..., 0]  # (B, P)
    per_example = -(picked * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
    is_causal = batch.is_causal.bool()
    weight = torch.tensor(
        [causal if c else isolate for c in is_causal.tolist()], dtype=per_example.dtype, device=per_example.device
    )
    return (weight * per_example).mean()


def _hinge(selection: torch.Tensor) -> torch.Tensor:
    """mean_b Σ_i max(σ_i − 1, 0) with σ_i = Σ_j A_ij over the real source rows (SELF excluded); its gradient is
    0 at the kink σ_i = 1, where a hard selection's source taken by one base position sits exactly."""
    sigma = selection[:, :-1].sum(dim=2)
    return torch.where(sigma > 1.0, sigma - 1.0, torch.zeros_like(sigma)).sum(dim=1).mean()


# --- the step ---------------------------------------------------------------------------------------------


def _run_collecting_states(model: HyperDAS, ids: torch.Tensor, mask: torch.Tensor, patch=None):
    """The target's own full forward (LM head on every position); returns (logits, states (B, T, N, D)).

    ``patch``: optional (k, states) replacing hidden state k (the input of decoder layer k; k = 0: embeddings).
    """
    target = model.target
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        if patch is not None and len(captured) == patch[0]:
            out = patch[1]
        captured.append(out)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handles = [target.embed_tokens.register_forward_hook(keep)]
    handles.extend(layer.register_forward_hook(keep) for layer in target.layers)
    try:
        logits = target.model(input_ids=ids, attention_mask=mask, position_ids=_real_positions(mask)).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, torch.stack(captured, dim=2)


def literal_four_pass_forward(
    model: HyperDAS,
    batch: PairBatch,
    mode: str = "soft",
    loss_weights: LossWeights | None = None,
    block_masks: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's step, literally: returns (loss, logits at the label positions (B, P, V)).
    ``block_masks``: the editor's residual-dropout multipliers (zeros and 1/(1-p)), one (B, Te, D) per editor
    block in order (self-attention, source, base, MLP of each layer); None = no dropout."""
    with model.precision_context(batch.base_input_ids.device):
        return _literal_four_pass(model, batch, mode, loss_weights, block_masks)


def _literal_four_pass(model, batch, mode, loss_weights, block_masks=None):
    k = model.config.intervention_layer
    base_ids, base_att = batch.base_input_ids, batch.base_attention_mask
    src_ids, src_att = batch.source_input_ids, batch.source_attention_mask
    with torch.no_grad():
        _, base_states = _run_collecting_states(model, base_ids, base_att)  # pass 1
        _, source_states = _run_collecting_states(model, src_ids, src_att)  # pass 2
        _, source_again = _run_collecting_states(model, src_ids, src_att)  # pass 3: layer k only
    encoding = _encoding(model, batch, source_states, base_states, block_masks)
    h, s = base_states[:, :, k], source_again[:, :, k]
    soft = _soft_selection(model, encoding, h, s, batch)
    selection = _hard_selection(soft, mode, batch)
    if mode not in ("soft", "groundtruth"):  # straight-through: exactly the hard value, the soft A's gradient
        selection = selection + soft - soft.detach()
    selection = selection.to(h.dtype)
    taken = (selection[:, :-1, :, None] * s[:, :, None, :]).sum(dim=1)  # (B, Ts, Tb, D) summed over Ts
    mixed = taken + selection[:, -1, :, None] * h  # s̃: (B, Tb, D)
    basis = _basis(model, encoding, batch)
    if basis is None:
        patched = mixed
    else:
        projector = basis @ basis.transpose(1, 2)  # (B, D, D)
        patched = (_wide(h) + (_wide(mixed) - _wide(h)) @ projector).to(h.dtype)
    patched = torch.where(batch.base_intervention_mask.bool()[..., None], patched, h)
    full_logits, _ = _run_collecting_states(model, base_ids, base_att, patch=(k, patched))  # pass 4
    positions = batch.label_positions
    logits = full_logits.gather(1, positions[..., None].expand(-1, -1, full_logits.shape[-1]))
    sparsity = 0.0 if loss_weights is None else loss_weights.sparsity
    return _label_loss(logits, batch, loss_weights) + sparsity * _hinge(selection), logits
