"""One training process for the DeepSpeed tests, on synthetic counterfactual pairs over a tiny target.

Run under torchrun (``--engine deepspeed``, any number of processes) or as a plain single process
(``--engine plain``): both train the same HyperDAS on the same global batches, cut as the trainer cuts them
(`step_batches`, then each process's contiguous slice in micro-batches, `process_slices`), so their losses and
trained weights must agree. Writes ``losses.json`` (the global loss and gradient norm of every optimizer step),
the exported editor (``export/``, the ``from_pretrained`` format; with ``--export-initial`` also ``initial/``,
before the first step), ``eval.pt`` (the trained model's outputs on fixed evaluation pairs, computed by every
process), or with ``--grads`` only ``grads.pt`` (full gradients of the first global batch with gradient
checkpointing off and on). ``--float64`` runs the plain engine in float64 throughout, the exact reference that
float32 gradients are measured against.

    torchrun --nproc_per_node 2 tests/train/ds_worker.py --engine deepspeed --ds zero3.json --target DIR --out OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from hyperdas.config import HyperDASConfig
from hyperdas.model import LossWeights
from hyperdas.testing import llama_in_float64
from hyperdas.train.config import OptimConfig, RunConfig
from hyperdas.train.trainer import process_slices, step_batches

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
                    # the "entities" the groundtruth mode patches: the last selectable token of each run
                    "base_entity_last": torch.tensor(TB - P - 1),
                    "source_entity_last": torch.tensor(TS - 1),
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
        torch_dtype="float64" if args.float64 else "float32",
        checkpoint_editor_layers=args.checkpointing,
        checkpoint_target_layers=args.checkpointing,
        use_fused_kernels=False,
        train_selection_mode=args.train_selection_mode,
    )
    return RunConfig(
        model=model,
        optim=OptimConfig(editor_lr=4e-5),  # the paper's editor lr
        global_batch_size=args.global_batch,
        micro_batch_size=args.micro_batch,
        precision="fp32",
        seed=0,
        deepspeed=args.ds,
    )


@contextlib.contextmanager
def recording_gathers(sizes: list[int]) -> Iterator[None]:
    """Record, for every ``deepspeed.zero.GatheredParameters`` opened meanwhile, how many parameter entries it
    gathers at once (what loading a ZeRO-3 model makes one process hold in full)."""
    import deepspeed

    original = deepspeed.zero.GatheredParameters

    class Recording(original):
        def __init__(self, params, *args, **kwargs):
            params = [params] if isinstance(params, torch.nn.Parameter) else list(params or [])
            sizes.append(sum(getattr(p, "ds_numel", p.numel()) for p in params))
            super().__init__(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = Recording
    try:
        yield
    finally:
        deepspeed.zero.GatheredParameters = original


def partition_report(model, gathers: list[int]) -> dict:
    """What this process holds of the frozen target under ZeRO-3, after building it."""
    params = list(model.target.parameters())
    return {
        "parameters": len(params),
        "total": sum(p.ds_numel for p in params),
        "held": sum(p.ds_tensor.numel() for p in params),
        "gathered_now": [n for n, p in model.target.named_parameters() if p.ds_status.name != "NOT_AVAILABLE"],
        "largest_gather_while_building": max(gathers, default=0),
    }


def build_engine(run: RunConfig, engine_kind: str, out: Path):
    """(engine, world size, rank) for this process; under ZeRO-3 also writes partitions_rank<r>.json."""
    if engine_kind == "plain":
        from hyperdas.model import HyperDAS
        from hyperdas.targets import load_target
        from hyperdas.train.engine import PlainEngine

        target = load_target(run.model.target, dtype=getattr(torch, run.model.torch_dtype))
        torch.manual_seed(run.seed)
        return PlainEngine(HyperDAS(run.model, target), run, device=torch.device("cpu"))
    from hyperdas.train.deepspeed_engine import DeepSpeedEngine
    from hyperdas.train.distributed import init_distributed
    from hyperdas.train.ds_config import read_ds_config, resolve_ds_config
    from hyperdas.train.zero3_build import build_model

    init_distributed()
    ds = resolve_ds_config(read_ds_config(run.deepspeed), run, dist.get_world_size(), "cpu")
    gathers: list[int] = []
    with recording_gathers(gathers):
        model, keep_alive = build_model(run, ds, "cpu")
    engine = DeepSpeedEngine(model, run, ds, keep_alive)
    if engine.stage == 3:
        report = partition_report(engine.model, gathers)
        (out / f"partitions_rank{engine.rank}.json").write_text(json.dumps(report))
    return engine


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
    parser.add_argument("--float64", action="store_true", help="plain engine in float64 throughout (a reference)")
    parser.add_argument("--train-selection-mode", default="soft", help="model.train_selection_mode")
    parser.add_argument("--export-initial", action="store_true", help="also export the model before training")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args()


def work(args: argparse.Namespace) -> None:
    """Train, export and evaluate (or write the gradients) as the arguments say."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)

    run = run_config(args)
    engine = build_engine(run, args.engine, out)
    vocab = engine.model.target.config.vocab_size
    data = SyntheticPairs(4 * run.global_batch_size, vocab, seed=1)

    def micro_batches(step: int) -> list[dict]:
        """This process's micro-batches of global step ``step`` (0-based), in the trainer's order."""
        epoch, within = divmod(step, len(data) // run.global_batch_size)
        indices = step_batches(len(data), run.global_batch_size, run.seed, epoch)[within]
        slices = process_slices(indices, engine.rank, engine.world_size, engine.micro_batch_size)
        return [{k: torch.stack([data[i][k] for i in micro]) for k in data[0]} for micro in slices]

    if args.grads:
        saved = {}
        engine.set_lr_scale(0.0)  # step() then only clears the gradients
        for flag in (False, True):
            engine.model.config.checkpoint_target_layers = flag
            engine.model.editor.gradient_checkpointing = flag
            *firsts, last = micro_batches(0)
            for batch in firsts:
                engine.backward(engine.forward(batch, loss_weights=LOSS_WEIGHTS).loss)
                engine.step()  # not an accumulation boundary yet: bookkeeping only
            engine.backward(engine.forward(last, loss_weights=LOSS_WEIGHTS).loss)
            saved["on" if flag else "off"] = full_grads(engine)  # the global batch's, reduced over processes
            engine.step()
        if engine.is_main:
            torch.save(saved, out / "grads.pt")
        return

    if args.export_initial:
        engine.export_trained(out / "initial")
    losses, norms = {}, {}
    for step in range(args.steps):
        total = 0.0
        for batch in micro_batches(step):
            output = engine.forward(batch, mode=run.model.train_selection_mode, loss_weights=LOSS_WEIGHTS)
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
    args = parse_args()
    if args.float64 and args.engine != "plain":
        raise SystemExit("--float64 is for the plain engine (DeepSpeed's ZeRO reduces in at most float32)")
    with llama_in_float64() if args.float64 else contextlib.nullcontext():
        work(args)
    if dist.is_initialized():  # after `work` returned, so no engine is left holding a process group
        from hyperdas.train.distributed import leave_distributed

        leave_distributed()


if __name__ == "__main__":
    main()
