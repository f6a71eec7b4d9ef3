"""One training process for the DeepSpeed tests, on synthetic counterfactual pairs over a tiny target.

Run under torchrun (``--engine deepspeed``, any number of processes) or as a plain single process
(``--engine plain``): both train the same HyperDAS on the same global batches, so their losses and trained
weights must agree. Writes ``losses.json`` (the global loss and gradient norm of every optimizer step),
the exported editor (``export/``, the ``from_pretrained`` format), ``eval.pt`` (the trained model's outputs
on fixed evaluation pairs, computed by every process), or with ``--grads`` only ``grads.pt`` (full gradients
of one step with gradient checkpointing off and on).

    torchrun --nproc_per_node 2 tests/train/ds_worker.py --engine deepspeed --ds zero3.json --target DIR --out OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from hyperdas.config import HyperDASConfig
from hyperdas.model import LossWeights
from hyperdas.train.config import OptimConfig, RunConfig

TB, TS, TE, P = 9, 7, 5, 3  # base, source, instruction lengths; label tokens per example
LOSS_WEIGHTS = LossWeights(causal=3.5, isolate=0.5, sparsity=0.5)


class SyntheticPairs(Dataset):
    """Fixed random pairs (left padded) whose fields have the keys HyperDAS.forward reads."""

    def __init__(self, size: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(size):
            base = torch.randint(3, vocab, (TB,), generator=g)
            source = torch.randint(3, vocab, (TS,), generator=g)
            instruction = torch.randint(3, vocab, (TE,), generator=g)
            base_mask = (torch.arange(TB) >= int(torch.randint(0, 3, (1,), generator=g))).long()
            source_mask = (torch.arange(TS) >= int(torch.randint(0, 3, (1,), generator=g))).long()
            instruction_mask = (torch.arange(TE) >= int(torch.randint(0, 2, (1,), generator=g))).long()
            base_selectable = base_mask.bool() & (torch.arange(TB) < TB - P)  # labels are not selectable
            label_positions = torch.arange(TB - P - 1, TB - 1)
            self.items.append(
                {
                    "base_input_ids": base * base_mask,
                    "base_attention_mask": base_mask,
                    "base_intervention_mask": base_selectable,
                    "source_input_ids": source * source_mask,
                    "source_attention_mask": source_mask,
                    "source_intervention_mask": source_mask.bool(),
                    "instruction_input_ids": instruction * instruction_mask,
                    "instruction_attention_mask": instruction_mask,
                    "label_positions": label_positions,
                    "label_ids": base[label_positions + 1],
                    "is_causal": torch.randint(0, 2, (), generator=g).bool(),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def run_config(args: argparse.Namespace) -> RunConfig:
    model = HyperDASConfig(
        target=args.target,
        intervention_layer=1,
        das_dimension=8,
        chop_editor_at_layer=2,
        torch_dtype="float32",
        checkpoint_editor_layers=args.checkpointing,
        checkpoint_target_layers=args.checkpointing,
        use_fused_kernels=False,
    )
    return RunConfig(
        model=model,
        # the paper's editor lr, pinned: Adam turns 1e-9 gradient differences on near-zero gradients into
        # O(lr) weight differences, so the weight tolerances below are set for this lr, not the main job's
        optim=OptimConfig(editor_lr=4e-5),
        global_batch_size=args.global_batch,
        micro_batch_size=args.micro_batch,
        precision="fp32",
        seed=0,
        deepspeed=args.ds,
    )


def build_engine(run: RunConfig, engine_kind: str):
    """(engine, world size, rank) for this process."""
    if engine_kind == "plain":
        from hyperdas.model import HyperDAS
        from hyperdas.targets import load_target
        from hyperdas.train.engine import PlainEngine

        target = load_target(run.model.target, dtype=torch.float32)
        torch.manual_seed(run.seed)
        return PlainEngine(HyperDAS(run.model, target), run, device=torch.device("cpu"))
    from hyperdas.train.deepspeed_engine import (
        DeepSpeedEngine,
        build_model,
        init_distributed,
        read_ds_config,
        resolve_ds_config,
    )

    init_distributed()
    ds = resolve_ds_config(read_ds_config(run.deepspeed), run, dist.get_world_size(), "cpu")
    model, keep_alive = build_model(run, ds, "cpu")
    return DeepSpeedEngine(model, run, ds, keep_alive)


def global_mean(value: float, engine) -> float:
    """Mean of a per-process number over every process."""
    if engine.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / engine.world_size


def full_grads(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter's whole gradient (gathered from the shards under ZeRO)."""
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in engine.model.trainable_named_parameters()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["plain", "deepspeed"], required=True)
    parser.add_argument("--ds", default=None, help="DeepSpeed JSON (deepspeed engine)")
    parser.add_argument("--target", required=True, help="folder of the tiny target")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--grads", action="store_true", help="write grads.pt (checkpointing off, then on)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args()


def work(args: argparse.Namespace) -> None:
    """Train, export and evaluate (or write the gradients) as the arguments say."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)

    run = run_config(args)
    engine = build_engine(run, args.engine)
    vocab = engine.model.target.config.vocab_size
    data = SyntheticPairs(4 * run.global_batch_size, vocab, seed=1)
    sampler = DistributedSampler(data, num_replicas=engine.world_size, rank=engine.rank, shuffle=True, seed=0,
                                 drop_last=True)
    loader = DataLoader(data, batch_size=engine.micro_batch_size, sampler=sampler)
    steps_per_epoch = len(loader) // engine.grad_accum_steps

    if args.grads:
        batch = next(iter(loader))
        grads = {}
        engine.set_lr_scale(0.0)  # step() then only clears the gradients
        for flag in (False, True):
            engine.model.config.checkpoint_target_layers = flag
            engine.model.editor.gradient_checkpointing = flag
            engine.backward(engine.forward(batch, loss_weights=LOSS_WEIGHTS).loss)
            grads[flag] = full_grads(engine)
            engine.step()
        if engine.is_main:
            torch.save({"off": grads[False], "on": grads[True]}, out / "grads.pt")
        return

    losses, norms = {}, {}
    for step in range(args.steps):
        if step % steps_per_epoch == 0:
            sampler.set_epoch(step // steps_per_epoch)
            batches = iter(loader)
        total = 0.0
        for _ in range(engine.grad_accum_steps):
            output = engine.forward(next(batches), loss_weights=LOSS_WEIGHTS)
            engine.backward(output.loss)
            total += float(output.loss.detach()) / engine.grad_accum_steps
            norm = engine.step()
        losses[step + 1] = global_mean(total, engine)
        norms[step + 1] = norm
    if engine.is_main:
        (out / "losses.json").write_text(json.dumps({"loss": losses, "grad_norm": norms}))
    engine.export_trained(out / "export")

    eval_data = SyntheticPairs(6, vocab, seed=2)
    batch = {k: torch.stack([item[k] for item in eval_data.items]) for k in eval_data.items[0]}
    engine.model.eval()
    with torch.no_grad():
        output = engine.forward(batch, loss_weights=LOSS_WEIGHTS)
    if engine.is_main:
        torch.save({"loss": output.loss, "logits": output.logits, "selection": output.selection}, out / "eval.pt")


def main() -> None:
    work(parse_args())
    if dist.is_initialized():  # after `work` returned, so no engine is left holding a process group
        from hyperdas.train.deepspeed_engine import leave_distributed

        leave_distributed()


if __name__ == "__main__":
    main()
