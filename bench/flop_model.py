"""Matmul work of one HyperDAS training step: the two-pass step against the literal four-pass step.

    python bench/flop_model.py                       # the embedded default as benchmarked, and Llama-3-8B
    python bench/flop_model.py --model llama3-8b --seq-len 64 --batch 16 --intervention-layer 15

The ratio four-pass / two-pass of this count is the speed-up the two-pass design can give when matmuls set the
time; bench/test_training_step.py measures the real one. Multiply-accumulates (MACs) of every matmul, per step:

target layer forward, per token at length T (D hidden, H / Hkv heads of hd, F MLP width):
    D·(H + 2·Hkv)·hd + H·hd·D + 3·D·F  (projections, SwiGLU)  +  2·T·H·hd  (scores, weighted sum)
target layer backward: the target is frozen, so only input gradients: the projections once more, attention
    twice (dQ, dK, dV, dP);
LM head: D·V per token, forward; its backward (input gradient) the same;
editor layer on Te instruction tokens: self-attention and MLP as above at length Te, and two cross-attentions
    whose keys and values are projected from the W·N states of a run's selectable tokens (2·D·Hkv·hd per
    state token; W the widest row's count) and attended by every query (2·W·N·H·hd per query token); it
    trains, so its backward is twice the forward, except for the state projections (weight gradient only:
    the states take none).

two-pass:  one no-grad pass over base and source (2B sequences, every layer, no LM head); layers k..end on the
           patched base with grad; the LM head at the P label positions only.
four-pass: three no-grad full passes (base, source, source again) with the LM head on every token; the patched
           base from the embeddings with the LM head on every token, backward through layers k..end and
           through the LM head on every token; W_k applied to every (source, base) pair (B, Ts, Tb, D) in the
           selection head; the projector W Wᵀ (B, D, D) built and applied.
Both: the editor. Left out (both paths, or small): norms, RoPE, softmax, the selection head, the subspace MLP,
elementwise work (the four-pass's Aᵀ S as a (B, Ts, Tb, D) product is memory traffic, not a matmul), the
optimizer.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

#: the two-pass step's part that a state cache replaces (bench/test_training_step.py's cached step leaves it out)
NO_GRAD_PASS = "no-grad pass (base+source)"


@dataclass(frozen=True)
class StepShape:
    """One training step's shapes. batch: B pairs; seq_len: T; instruction_len: Te; label_tokens: P;
    editor_layers: L; rank: r; intervention_layer: k; selectable_tokens: W, the widest row's selectable tokens
    in a run (the mean of base and source; None: T), whose states alone are the editor's keys."""

    batch: int
    seq_len: int
    instruction_len: int
    label_tokens: int
    editor_layers: int
    rank: int
    intervention_layer: int
    selectable_tokens: float | None = None


#: the shapes bench/test_training_step.py times (T: the mean of base 22 and source 20), and the paper's setting
#: (L=8, r=128, k=15; T=64 as the issue's kernel shapes; Te=12, an instruction "Vienna ; Paris - Country").
CASES: dict[str, tuple[str, StepShape]] = {
    "smollm2-135m B=16 (bench)": ("smollm2-135m", StepShape(16, 21, 12, 2, 2, 32, 10)),
    "llama3-8b B=16 T=64 (paper)": ("llama3-8b", StepShape(16, 64, 12, 3, 8, 128, 15)),
}


def _dims(config) -> dict[str, int]:
    heads = config.num_attention_heads
    return dict(
        D=config.hidden_size,
        F=config.intermediate_size,
        V=config.vocab_size,
        layers=config.num_hidden_layers,
        H=heads,
        Hkv=getattr(config, "num_key_value_heads", None) or heads,
        hd=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def step_macs(config, shape: StepShape) -> dict[str, dict[str, float]]:
    """MACs of one step, by part, for both paths: {"two_pass": {...}, "four_pass": {...}}."""
    d = _dims(config)
    D, F, V, H, Hkv, hd, n_layers = d["D"], d["F"], d["V"], d["H"], d["Hkv"], d["hd"], d["layers"]
    B, T, Te, P, L, r, k = (
        shape.batch,
        shape.seq_len,
        shape.instruction_len,
        shape.label_tokens,
        shape.editor_layers,
        shape.rank,
        shape.intervention_layer,
    )
    projections = D * (H + 2 * Hkv) * hd + H * hd * D + 3 * D * F  # per token
    attention = 2 * T * H * hd  # per token at length T

    def layers_fwd(sequences: int, count: int) -> float:
        return sequences * T * count * (projections + attention)

    def layers_bwd(sequences: int, count: int) -> float:
        return sequences * T * count * (projections + 2 * attention)

    after_k = n_layers - k
    # the grad pass drops the last column (every left-padded row's last label token predicts nothing read)
    Tg = T - 1
    grad_pass = B * after_k * Tg * (2 * projections + 3 * 2 * Tg * H * hd)

    def editor_macs(key_tokens: float) -> float:
        states = key_tokens * (n_layers + 1)  # key tokens of one run for the editor's cross-attention
        instruction_side = Te * (projections + 2 * Te * H * hd) + 2 * Te * 2 * H * hd * D  # self-attn, MLP, q/o
        state_projections = 2 * states * 2 * D * Hkv * hd  # keys and values of both runs' states
        cross_scores = 2 * Te * 2 * states * H * hd
        # backward: inputs and weights on the instruction side (2x) and in attention (dQ, dK, dV, dP: 2x); the
        # states take no gradient, so their projections need only the weight gradient (1x)
        return B * L * (3 * instruction_side + 2 * state_projections + 3 * cross_scores)

    # two-pass: the selectable tokens' states only; literal: all T·N, the others masked
    W = T if shape.selectable_tokens is None else shape.selectable_tokens
    # selection head, D x D projections W1, W2, W_k, W_q, trained: weight gradients for every projected token,
    # input gradients except where the input is a (no-grad) state. Two-pass: per token, W1 b̂, W2 ŝ, W_k b̂ and
    # W_k on W1 b̂ and W2 ŝ (input grads for the last two) and W_q e: (5T + 1) + (5T + 1) + (2T + 1) token-D².
    # Literal: [b̂ ; ŝ] (B, Ts, Tb, 2D) through W_c = [W1 W2] (weight gradient only, 4T²), W_k on every pair and
    # the SELF row (B, Ts+1, Tb, D) with input and weight gradients (3T² + 3T), W_q e (3): (7T² + 3T + 3) D².
    scores = 3 * B * (T + 1) * T * D  # q · keys per head over Ts + 1 rows, and its two gradients
    selection_two = B * (12 * T + 3) * D * D + scores
    selection_four = B * (7 * T * T + 3 * T + 3) * D * D + scores
    two = {
        NO_GRAD_PASS: layers_fwd(2 * B, n_layers),
        "grad pass k..end (T - 1 columns), fwd+bwd": grad_pass,
        "LM head (label positions), fwd+bwd": 2 * B * P * D * V,
        "editor (selectable tokens' keys), fwd+bwd": editor_macs(W),
        "selection head (per token), fwd+bwd": selection_two,
        "interchange Aᵀ S and W, fwd+bwd": 3 * B * (T * T * D + 2 * T * D * r),
    }
    four = {
        "3 no-grad full passes": 3 * layers_fwd(B, n_layers),
        "3 LM heads (every token)": 3 * B * T * D * V,
        "patched pass 0..end fwd, k..end bwd": layers_fwd(B, n_layers) + layers_bwd(B, after_k),
        "its LM head (every token), fwd+bwd": 2 * B * T * D * V,
        "editor (all T·N keys), fwd+bwd": editor_macs(T),
        "selection head (per pair), fwd+bwd": selection_four,
        # the Householder matrices (B, D, D) times R, then W Wᵀ built and applied
        "Householder H R, projector W Wᵀ (B, D, D), fwd+bwd": 3 * B * (2 * D * D * r + T * D * D),
    }
    return {"two_pass": two, "four_pass": four}


def report(cases: dict[str, tuple[str, StepShape]]) -> list[dict]:
    from memory_model import target_config

    rows = []
    for name, (model, shape) in cases.items():
        config = target_config(model)
        macs = step_macs(config, shape)
        two, four = sum(macs["two_pass"].values()), sum(macs["four_pass"].values())
        editor_two = next(v for k, v in macs["two_pass"].items() if k.startswith("editor"))
        editor_four = next(v for k, v in macs["four_pass"].items() if k.startswith("editor"))
        rows.append(
            {
                "case": name,
                "model": model,
                "shape": asdict(shape),
                "macs": macs,
                "two_pass_gmacs": two / 1e9,
                "four_pass_gmacs": four / 1e9,
                "ratio": four / two,
                "ratio_without_editor": (four - editor_four) / (two - editor_two),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="preset (llama3-8b, tiny), smollm2-135m, hub name or folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--instruction-len", type=int, default=12)
    parser.add_argument("--label-tokens", type=int, default=3)
    parser.add_argument("--editor-layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--intervention-layer", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    cases = CASES
    if args.model is not None:
        shape = StepShape(
            args.batch,
            args.seq_len,
            args.instruction_len,
            args.label_tokens,
            args.editor_layers,
            args.rank,
            args.intervention_layer,
        )
        cases = {args.model: (args.model, shape)}
    rows = report(cases)
    for row in rows:
        print(
            f"\n{row['case']}: four-pass / two-pass = {row['ratio']:.2f} "
            f"({row['ratio_without_editor']:.2f} without the shared editor)"
        )
        for path in ("two_pass", "four_pass"):
            print(f"  {path}: {row[path + '_gmacs']:.1f} GMAC")
            for part, value in row["macs"][path].items():
                print(f"    {part:56s} {value / 1e9:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
