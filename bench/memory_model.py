"""Per-device memory of one HyperDAS training step: target, editor, gradients, optimizer state, activations.

    # one configuration (Llama-3-8B, L=8, r=128, T=64, 16 pairs per device, ZeRO-3 on 8 devices)
    python bench/memory_model.py --model llama3-8b --editor-layers 8 --rank 128 --seq-len 64 --batch 16 \\
        --stage 3 --devices 8 --checkpoint-editor
    # the largest batch of counterfactual pairs that fits in 80 GB, for the same settings
    python bench/memory_model.py --model llama3-8b --stage 3 --devices 8 --largest-batch 80
    # the table of docs/scale_out.md (plain PyTorch and DeepSpeed on one 80 GB device, checkpointing on/off)
    python bench/memory_model.py --report --json bench/results/memory_model_llama3_8b.json
    # check the model against a measurement on the tiny random Llama on CPU
    python bench/memory_model.py --measure

Model states come from `hyperdas.train.memory_fit.model_state_bytes` (the same formula that refuses a
model too large for its ZeRO stage), with exact parameter counts from the model built on the meta device.
Activations are counted from what the two-pass step keeps for backward (hyperdas/model.py):

1. the no-grad target pass over base and source (2B sequences) keeps all N = n_layers + 1 states,
   2B·T·N·D values (twice that while the per-layer list is stacked);
2. each editor layer keeps its instruction-side tensors (B·Te·(...)) and, per cross-attention, the key and
   value projections of all T·N states of its run, 2·B·T·N·Hkv·hd values (the fused kernel keeps only
   those; the PyTorch path also keeps the normalised and RoPE'd copies);
3. selection head, subspace and interchange: a few (B, T, D) tensors and W (B, D, r);
4. target layers k..end run with grad: per layer, per token, the inputs of every matmul, the attention
   output and the SwiGLU intermediates;
5. logits and cross-entropy at the P label positions only: B·P·V.
Checkpointing keeps one (B, Te, D) input per editor layer / one (B, T, D) input per target layer instead,
and recomputes one layer at a time in backward. w is 2 bytes under bf16 (autocast or DeepSpeed bf16), else 4.
"""

from __future__ import annotations

import argparse
import json
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hyperdas.data.batch import PairBatch

GIB = 2**30

#: architecture presets: transformers config fields (Llama family); "tiny" is hyperdas.testing's random Llama.
PRESETS: dict[str, dict] = {
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}


@dataclass(frozen=True)
class Step:
    """One training step's settings, per device.

    Attributes:
        batch: counterfactual pairs per device per micro-batch (B).
        seq_len: base and source length (T).
        instruction_len: instruction length (Te).
        label_tokens: label positions with logits (P).
        editor_layers: L. rank: r. intervention_layer: k.
        engine: "deepspeed" or "plain" (single-process PyTorch: fp32 editor masters, bf16 autocast).
        stage: ZeRO stage (deepspeed). devices: processes sharing the model (deepspeed).
        offload: "none", "optimizer" (optimizer state and fp32 gradients in CPU memory), "param" (parameters
            only) or "all" (parameters and optimizer).
        bf16: bf16 weights (deepspeed) / autocast (plain), else fp32.
        checkpoint_editor / checkpoint_target: recompute editor layers / target layers k..end in backward.
        attention: "fused" (Triton kernel, CUDA) or "sdpa" (the PyTorch path, CPU).
    """

    batch: int = 16
    seq_len: int = 64
    instruction_len: int = 64
    label_tokens: int = 3
    editor_layers: int = 8
    rank: int = 128
    intervention_layer: int = 15
    engine: str = "deepspeed"
    stage: int = 3
    devices: int = 1
    offload: str = "none"
    bf16: bool = True
    checkpoint_editor: bool = False
    checkpoint_target: bool = False
    attention: str = "fused"


def target_config(model: str):
    """A preset's config, else the target's own (the embedded default's shorthand, a hub name or a folder)."""
    from transformers import LlamaConfig

    from hyperdas.targets import target_config as targets_config
    from hyperdas.testing import tiny_llama_config

    if model == "tiny":
        return tiny_llama_config(vocab_size=512)
    if model in PRESETS:
        return LlamaConfig(**PRESETS[model])
    return targets_config(model)


def parameter_counts(model: str, step: Step):
    """Exact parameter counts of HyperDAS on ``model`` with this step's L and r (built on the meta device)."""
    from hyperdas.config import HyperDASConfig
    from hyperdas.train.memory_fit import count_parameters

    config = HyperDASConfig(
        target=model,
        intervention_layer=step.intervention_layer,
        das_dimension=step.rank,
        chop_editor_at_layer=step.editor_layers,
    )
    return count_parameters(config, target_config(model))


def _ds_config(step: Step) -> dict:
    zero: dict = {"stage": step.stage}
    if step.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if step.offload in ("param", "all"):
        zero["offload_param"] = {"device": "cpu"}
    # as resolve_ds_config: stage 0 keeps fp32 trained weights under bf16 autocast
    return {"bf16": {"enabled": step.bf16 and step.stage > 0}, "zero_optimization": zero}


def state_bytes(counts, step: Step) -> dict[str, int]:
    """Model states per device: weights, gradients, optimizer state (and ZeRO-3's gathered working set)."""
    from hyperdas.train.memory_fit import model_state_bytes

    if step.engine == "deepspeed":
        return model_state_bytes(counts, _ds_config(step), step.devices, 2 if step.bf16 else 4)
    # plain PyTorch: target in its dtype; fp32 editor, fp32 gradients, AdamW's two fp32 moments
    return {
        "target_weights": counts.target * (2 if step.bf16 else 4),
        "editor_weights": counts.editor * 4,
        "gradients": counts.editor * 4,
        "optimizer": counts.editor * 8,
        "gathered": 0,
    }


def activation_bytes(config, step: Step) -> dict[str, int]:
    """Activations of one micro-batch: what the forward keeps for backward, and the backward's extra peak."""
    b, t, te, p = step.batch, step.seq_len, step.instruction_len, step.label_tokens
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // hq
    n = config.num_hidden_layers + 1
    s = t * n  # keys per cross-attention
    w = 2 if step.bf16 else 4
    after = config.num_hidden_layers - step.intervention_layer  # target layers run with grad

    states = 2 * b * t * n * d * w
    run_keys = 2 * b * s * (4 + 8 + 2)  # 1/||x|| (fp32), RoPE positions (long), masks (bool)
    norm_upcast = 2 * b * s * d * 4 if w == 2 else 0  # ||x|| of bf16 states is taken in fp32 (transient)
    kv_copies = 2 if step.attention == "fused" else 6  # k, v (+ r·k, RoPE(r·k) and its halves, r·v)
    cross = 2 * (kv_copies * b * s * hkv * hd + b * te * (d + 2 * hq * hd))  # source and base
    self_attn = b * te * (3 * d + 2 * (hq + 2 * hkv) * hd + 2 * hq * hd)
    mlp = b * te * (d + 4 * f)
    editor_layer = (cross + self_attn + mlp) * w
    editor_input = b * te * d * w
    editor = step.editor_layers * (editor_input if step.checkpoint_editor else editor_layer)
    selection = 8 * b * t * d * w + b * hq * (t + 1) * t * 4
    subspace = 2 * b * d * step.rank * 4 + 3 * b * t * d * w
    # saved per token: layer input, normed input, RoPE'd q and k, v, attention output, residual, normed
    # residual, gate, up, silu(gate), silu(gate)·up
    target_layer = b * t * (4 * d + (hq + 2 * hkv) * hd + hq * hd + 4 * f) * w
    target_input = b * t * d * w
    target = after * (target_input if step.checkpoint_target else target_layer) + b * t * t * w
    logits = b * p * (d * w + v * (w + 4 + 4))
    # backward: a recomputed layer when checkpointing (its tensors are freed as its backward proceeds: about
    # half live at once), else the gradients of about half of the largest layer's tensors
    recompute = max(editor_layer if step.checkpoint_editor else 0, target_layer if step.checkpoint_target else 0)
    backward = (recompute or max(editor_layer, target_layer)) // 2
    return {
        "target_states": states,
        "run_keys": run_keys,
        "editor": editor,
        "selection_subspace": selection + subspace,
        "target_k_to_end": target,
        "logits": logits,
        "forward_transient": max(states, norm_upcast),
        "backward_transient": backward,
    }


def predict(model: str, step: Step, counts=None) -> dict[str, int]:
    """Bytes per device, by component, and their sum under "total" (peak of one step)."""
    counts = counts or parameter_counts(model, step)
    config = target_config(model)
    states = state_bytes(counts, step)
    acts = activation_bytes(config, step)
    retained = sum(v for k, v in acts.items() if not k.endswith("transient"))
    peak_acts = retained + max(acts["forward_transient"], acts["backward_transient"])
    out = {f"state.{k}": v for k, v in states.items()} | {f"act.{k}": v for k, v in acts.items()}
    out["act.retained"] = retained
    out["total"] = sum(states.values()) + peak_acts
    return out


def largest_batch(model: str, step: Step, device_gib: float, reserve_gib: float = 2.0) -> int:
    """The most pairs per device whose predicted peak fits in ``device_gib`` minus a reserve (CUDA context,
    allocator fragmentation); 0 when not even one pair fits."""
    counts = parameter_counts(model, step)
    budget = (device_gib - reserve_gib) * GIB

    def fits(batch: int) -> bool:
        return predict(model, replace(step, batch=batch), counts)["total"] <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# --- measurement on the tiny model (CPU) --------------------------------------------------------------


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive: current and peak.

    Args:
        existing: tensors made before (parameters, buffers, inputs): views of them (a weight's transpose)
            come out of ops too, and must not count as new memory.
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self._seen = WeakIdKeyDictionary()
        for tensor in existing:
            self._seen[tensor.untyped_storage()] = 0
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, nbytes)
        return out


def synthetic_batch(vocab: int, step: Step, seed: int = 0) -> PairBatch:
    """Random pairs of the step's lengths, without padding: the fields HyperDAS.forward reads."""
    from hyperdas.data.batch import PairBatch

    g = torch.Generator().manual_seed(seed)
    b, t, te, p = step.batch, step.seq_len, step.instruction_len, step.label_tokens
    ones = torch.ones(b, t, dtype=torch.long)
    base = torch.randint(3, vocab, (b, t), generator=g)
    positions = torch.arange(t - p - 1, t - 1).expand(b, p)
    return PairBatch(
        base_input_ids=base,
        base_attention_mask=ones,
        base_intervention_mask=ones.bool(),
        source_input_ids=torch.randint(3, vocab, (b, t), generator=g),
        source_attention_mask=ones,
        source_intervention_mask=ones.bool(),
        instruction_input_ids=torch.randint(3, vocab, (b, te), generator=g),
        instruction_attention_mask=torch.ones(b, te, dtype=torch.long),
        label_positions=positions,
        label_ids=base.gather(1, positions + 1),
        is_causal=torch.arange(b) % 2 == 0,
    )


def measure_tiny(step: Step) -> dict[str, int]:
    """Measured activation bytes of one plain fp32 step of the tiny model on CPU: retained after the
    forward, and the peak of forward + backward (parameter gradients excluded: allocated beforehand)."""
    from hyperdas.config import HyperDASConfig
    from hyperdas.model import HyperDAS
    from hyperdas.targets import build_random_target

    config = target_config("tiny")
    target = build_random_target(config, seed=0)
    model = HyperDAS(
        HyperDASConfig(
            target="tiny",
            intervention_layer=step.intervention_layer,
            das_dimension=step.rank,
            chop_editor_at_layer=step.editor_layers,
            checkpoint_editor_layers=step.checkpoint_editor,
            checkpoint_target_layers=step.checkpoint_target,
            use_fused_kernels=False,
        ),
        target,
    )
    batch = synthetic_batch(config.vocab_size, step)
    model(batch).loss.backward()  # allocate the gradients first: the measured step accumulates into them
    grads = [p.grad for _, p in model.trainable_named_parameters() if p.grad is not None]
    tracker = LiveBytes([*model.parameters(), *model.buffers(), *batch.values(), *grads])
    with tracker:
        loss = model(batch).loss
        retained = tracker.current
        loss.backward()
    return {"retained": retained, "peak": tracker.peak}


def check_against_tiny(steps: list[Step]) -> list[dict]:
    """Predicted vs measured activations of the tiny model (plain, fp32, PyTorch attention) for each step."""
    rows = []
    for step in steps:
        step = replace(step, engine="plain", bf16=False, attention="sdpa")
        predicted = predict("tiny", step)
        measured = measure_tiny(step)
        peak_predicted = predicted["total"] - sum(v for k, v in predicted.items() if k.startswith("state."))
        rows.append(
            {
                "batch": step.batch,
                "seq_len": step.seq_len,
                "checkpoint": step.checkpoint_editor,
                "retained_predicted": predicted["act.retained"],
                "retained_measured": measured["retained"],
                "peak_predicted": peak_predicted,
                "peak_measured": measured["peak"],
            }
        )
    return rows


def random_target(config) -> Callable:
    """A ``make_target`` for ``hyperdas.train.zero3_build.build_model``: random weights from ``config``
    (under ZeRO-3 created partitioned, as a loaded target is)."""
    from hyperdas.targets import build_random_target

    return lambda name, dtype: build_random_target(config, dtype=dtype, seed=0)


def measured_state_bytes(engine, device_type: str | None = None) -> dict[str, int]:
    """Model states of a ZeRO-3 `DeepSpeedEngine` on this process, read off DeepSpeed's own buffers.

    Args:
        engine: the engine after at least one step (the optimizer state exists then).
        device_type: count only tensors on this kind of device ("cuda": what an offload moved to CPU memory is
            left out); None counts them all.
    """

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if device_type in (None, t.device.type))

    inner = engine.optimizer
    return {
        "target_weights": nbytes(p.ds_tensor for p in engine.model.target.parameters()),
        "editor_weights": nbytes(p.ds_tensor for _, p in engine.model.trainable_named_parameters()),
        "gradients": nbytes([inner.grad_partitions_flat_buffer]),
        "optimizer": nbytes(inner.fp32_partitioned_groups_flat)
        + nbytes(
            t for state in inner.optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0
        ),
    }


def measure_states() -> dict:
    """ZeRO-3 model states of the tiny model (fp32, CPU) after one step, measured in DeepSpeed's own buffers
    on this process, beside ``model_state_bytes``'s prediction. Run alone (a group of one) or under torchrun.
    """
    import torch.distributed as dist

    from hyperdas.config import HyperDASConfig
    from hyperdas.train.config import RunConfig
    from hyperdas.train.deepspeed_engine import DeepSpeedEngine
    from hyperdas.train.distributed import init_distributed, leave_distributed
    from hyperdas.train.ds_config import resolve_ds_config
    from hyperdas.train.launch import single_process_environment
    from hyperdas.train.memory_fit import count_parameters, model_state_bytes
    from hyperdas.train.zero3_build import build_model

    single_process_environment()
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    step = Step(batch=2, seq_len=12, instruction_len=6, editor_layers=2, rank=8, intervention_layer=1)
    model_config = HyperDASConfig(
        target="tiny", intervention_layer=1, das_dimension=8, chop_editor_at_layer=2, use_fused_kernels=False
    )
    run = RunConfig(model=model_config, global_batch_size=step.batch * world, precision="fp32")
    ds = resolve_ds_config(
        {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}, run, world, "cpu"
    )
    counts = count_parameters(model_config, target_config("tiny"))  # before ZeRO-3 construction is switched on
    model, keep_alive = build_model(run, ds, "cpu", random_target(target_config("tiny")))
    engine = DeepSpeedEngine(model, run, ds, keep_alive)
    batch = synthetic_batch(model.target.config.vocab_size, step)
    engine.backward(engine.forward(batch).loss)
    engine.step()
    measured = measured_state_bytes(engine)
    predicted = model_state_bytes(counts, ds, world)
    predicted.pop("gathered")
    del engine, model
    leave_distributed()
    return {"world_size": world, "rank": rank, "measured": measured, "predicted": predicted}


def report(device_gib: float = 80.0) -> list[dict]:
    """Largest batch per device for Llama-3-8B, L=8, r=128, T=64, with and without checkpointing."""
    base = Step(seq_len=64, instruction_len=64, editor_layers=8, rank=128, intervention_layer=15)
    setups = {
        "plain PyTorch, 1 device": replace(base, engine="plain"),
        "ZeRO-3, 1 device": replace(base, stage=3, devices=1),
        "ZeRO-3 + CPU offload, 1 device": replace(base, stage=3, devices=1, offload="all"),
        "ZeRO-2, 8 devices": replace(base, stage=2, devices=8),
        "ZeRO-3, 8 devices": replace(base, stage=3, devices=8),
    }
    rows = []
    for name, step in setups.items():
        for editor, target in ((False, False), (True, False), (True, True)):
            chosen = replace(step, checkpoint_editor=editor, checkpoint_target=target)
            largest = largest_batch("llama3-8b", chosen, device_gib)
            states = sum(v for k, v in predict("llama3-8b", replace(chosen, batch=1)).items() if k.startswith("state."))
            rows.append(
                {
                    "setup": name,
                    "checkpoint_editor": editor,
                    "checkpoint_target": target,
                    "model_states_gib": round(states / GIB, 1),
                    "largest_batch": largest,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="llama3-8b",
        help=f"preset {sorted([*PRESETS, 'tiny'])}, smollm2-135m, or a hub name / folder",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--instruction-len", type=int, default=64)
    parser.add_argument("--editor-layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--intervention-layer", type=int, default=15)
    parser.add_argument("--engine", choices=["deepspeed", "plain"], default="deepspeed")
    parser.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=3)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--offload", choices=["none", "optimizer", "param", "all"], default="none")
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16")
    parser.add_argument("--checkpoint-editor", action="store_true")
    parser.add_argument("--checkpoint-target", action="store_true")
    parser.add_argument("--attention", choices=["fused", "sdpa"], default="fused")
    parser.add_argument("--largest-batch", type=float, default=None, metavar="GIB", help="device memory in GiB")
    parser.add_argument("--report", action="store_true", help="the docs/scale_out.md table (80 GiB)")
    parser.add_argument("--measure", action="store_true", help="check activations against the tiny model on CPU")
    parser.add_argument(
        "--measure-states",
        action="store_true",
        help="check ZeRO-3 model states against DeepSpeed's buffers (tiny model; alone or torchrun)",
    )
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    step = Step(
        batch=args.batch,
        seq_len=args.seq_len,
        instruction_len=args.instruction_len,
        editor_layers=args.editor_layers,
        rank=args.rank,
        intervention_layer=args.intervention_layer,
        engine=args.engine,
        stage=args.stage,
        devices=args.devices,
        offload=args.offload,
        bf16=not args.fp32,
        checkpoint_editor=args.checkpoint_editor,
        checkpoint_target=args.checkpoint_target,
        attention=args.attention,
    )
    if args.measure:
        tiny = Step(batch=4, seq_len=12, instruction_len=6, editor_layers=2, rank=8, intervention_layer=1)
        steps = [
            replace(tiny, batch=b, checkpoint_editor=c, checkpoint_target=c) for b in (4, 16) for c in (False, True)
        ]
        result: object = check_against_tiny(steps)
        print("| B | T | checkpointing | retained predicted | measured | ratio | peak predicted | measured | ratio |")
        print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in result:
            print(
                f"| {r['batch']} | {r['seq_len']} | {'on' if r['checkpoint'] else 'off'} | "
                f"{r['retained_predicted'] / 1024:.0f} KiB | {r['retained_measured'] / 1024:.0f} KiB | "
                f"{r['retained_predicted'] / r['retained_measured']:.2f} | {r['peak_predicted'] / 1024:.0f} KiB | "
                f"{r['peak_measured'] / 1024:.0f} KiB | {r['peak_predicted'] / r['peak_measured']:.2f} |"
            )
    elif args.measure_states:
        result = measure_states()
        if result["rank"] == 0:
            print(f"ZeRO-3, {result['world_size']} process(es), bytes per process: predicted / measured")
            for name, value in result["measured"].items():
                print(f"{name:16s} {result['predicted'][name]:10d} {value:10d}")
    elif args.report:
        result = report()
        print("| setup | checkpoint editor | checkpoint target k..end | model states (GiB) | largest batch |")
        print("| --- | --- | --- | ---: | ---: |")
        for r in result:
            print(
                f"| {r['setup']} | {'on' if r['checkpoint_editor'] else 'off'} | "
                f"{'on' if r['checkpoint_target'] else 'off'} | {r['model_states_gib']} | {r['largest_batch']} |"
            )
    elif args.largest_batch is not None:
        result = {
            "step": asdict(step),
            "device_gib": args.largest_batch,
            "largest_batch": largest_batch(args.model, step, args.largest_batch),
        }
        print(f"largest batch per device: {result['largest_batch']}")
    else:
        result = {"step": asdict(step), "bytes": predict(args.model, step)}
        for name, value in result["bytes"].items():
            print(f"{name:28s} {value / GIB:10.3f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
