"""RunKeys keeps only the selectable tokens' keys: the cross-attention over them equals the one over all T·N keys."""

from __future__ import annotations

import torch

from hyperdas.editor import RunKeys
from hyperdas.kernels.cross_attention_reference import cross_attention_reference
from hyperdas.targets import position_ids_from_mask


def _all_keys(states, attention_mask, intervention_mask):
    """Every token's N states flattened token-major, masked by the intervention mask (the unpruned layout)."""
    b, t, n, d = states.shape
    flat = states.reshape(b, t * n, d)
    positions = (position_ids_from_mask(attention_mask)[:, :, None] * n + torch.arange(n)).reshape(b, t * n)
    mask = intervention_mask[:, :, None].expand(b, t, n).reshape(b, t * n)
    return flat, 1.0 / flat.norm(dim=-1).clamp_min(1e-12), positions, mask


def test_pruned_keys_give_the_attention_over_every_key():
    g = torch.Generator().manual_seed(0)
    b, t, n, d, hq, hkv, hd, te = 3, 9, 5, 12, 4, 2, 6, 4
    states = torch.randn(b, t, n, d, dtype=torch.float64, generator=g)
    attention = torch.ones(b, t, dtype=torch.long)
    attention[1, :3] = 0  # left padding
    selectable = torch.zeros(b, t, dtype=torch.bool)
    selectable[0, [1, 2, 6]] = True  # not contiguous
    selectable[1, 4:7] = True
    selectable[2, 8] = True
    w_k = torch.randn(hkv * hd, d, dtype=torch.float64, generator=g)
    w_v = torch.randn(hkv * hd, d, dtype=torch.float64, generator=g)
    q = torch.randn(b, hq, te, hd, dtype=torch.float64, generator=g)
    q_positions = torch.arange(te).expand(b, te)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def attend(flat, inv_norm, positions, mask):
        s = flat.shape[1]
        k = (flat @ w_k.T).view(b, s, hkv, hd).transpose(1, 2)
        v = (flat @ w_v.T).view(b, s, hkv, hd).transpose(1, 2)
        return cross_attention_reference(q, k, v, inv_norm, q_positions, positions, inv_freq, mask)

    keys = RunKeys.from_states(states, attention, selectable)
    assert keys.states.shape == (b, 3 * n, d)  # the widest row has 3 selectable tokens
    assert keys.mask.sum(dim=1).tolist() == [3 * n, 3 * n, 1 * n]
    pruned = attend(keys.states, keys.inv_norm.double(), keys.positions, keys.mask)
    full = attend(*_all_keys(states, attention, selectable))
    torch.testing.assert_close(pruned, full, rtol=1e-12, atol=1e-12)
