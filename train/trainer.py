"""The training recipe: set up, train, checkpoint, resume, evaluate, report. One loop for every engine.

Single process (`hyperdas train`), torchrun and the `deepspeed` launcher (train/launch.py) all run
``Trainer(config, setup).run()``; only the ``EngineSetup`` differs (how the target is loaded and the model
wrapped). Data order is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted run would have, and each process takes its own slice of every global batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hyperdas.model import load_configured_target
from hyperdas.targets import target_config
from hyperdas.train.config import RUN_CONFIG_FILE, RunConfig, load_run_config, save_run_config
from hyperdas.train.data_source import RunData, cache_train_states, load_run_data
from hyperdas.train.engine import PlainEngine, TrainingEngine, micro_batch_plan
from hyperdas.train.evaluate import CURVE_PLOT, evaluate, write_evaluation
from hyperdas.train.learning_curve import CURVE_FILE, CURVE_SPLITS, curve_point
from hyperdas.train.schedule import TrainingSchedule

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAIN_LOG = "train_log.jsonl"
FINAL_MODEL = "model"


class EngineSetup(Protocol):
    """How a run gets its engine: process layout, target loading, model building, wrapping.

    A setup may also define ``check(config)`` to refuse a config before any heavy work; without one the
    trainer checks the model config against the target's config.json (``check_against_target``).
    """

    rank: int
    world_size: int
    is_main: bool

    def build(self, config: RunConfig) -> TrainingEngine:
        """Load the target, build the HyperDAS model and wrap it in an engine."""

    def barrier(self) -> None:
        """Wait for every process."""


class PlainSetup:
    """One process, plain PyTorch."""

    rank = 0
    world_size = 1
    is_main = True

    def build(self, config: RunConfig) -> TrainingEngine:
        from hyperdas.model import HyperDAS

        target = load_configured_target(config.model)
        config.model.validate(num_layers=target.num_layers, hidden_size=target.hidden_size)
        return PlainEngine(HyperDAS(config.model, target), config)

    def barrier(self) -> None:
        return None


def check_against_target(config: RunConfig) -> None:
    """Validate the model config against the target's config.json (no weights are loaded)."""
    target = target_config(config.model.target)
    config.model.validate(num_layers=target.num_hidden_layers, hidden_size=target.hidden_size)


#: consecutive global batches whose examples are regrouped by length (``step_batches``)
LENGTH_WINDOW = 8


def step_batches(
    num_examples: int, global_batch: int, seed: int, epoch: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """The global batches of one epoch, each with one example of every data shard (the tail is dropped).

    Shard q holds the examples i with i mod global_batch = q; each epoch permutes every shard (seeded by seed,
    epoch and q) and batch s takes the s-th example of each shard, in shard order. A process then takes a
    contiguous slice of every batch (``process_slices``), that is a fixed set of shards: whatever the number
    of processes the global batches are the same, and each process only ever sees its own shards' examples
    (so its state cache holds only those).

    With ``lengths`` (one per example), every window of ``LENGTH_WINDOW`` consecutive batches is regrouped:
    each shard's examples in the window are sorted by length and batch j takes the j-th shortest of every
    shard, then the window's batches are shuffled. Each batch still holds one example per shard, but of
    similar lengths, so left padding wastes less of every step.
    """
    steps = num_examples // global_batch
    shards = []
    for q in range(global_batch):
        members = torch.arange(q, num_examples, global_batch)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + q)
        shards.append(members[torch.randperm(len(members), generator=generator)][:steps].tolist())
    if lengths is None:
        return [[shards[q][s] for q in range(global_batch)] for s in range(steps)]
    batches = []
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7_919)
    for start in range(0, steps, LENGTH_WINDOW):
        window = range(start, min(start + LENGTH_WINDOW, steps))
        by_length = [sorted((shard[s] for s in window), key=lambda i: (lengths[i], i)) for shard in shards]
        grouped = [[by_length[q][j] for q in range(global_batch)] for j in range(len(window))]
        batches += [grouped[j] for j in torch.randperm(len(grouped), generator=generator).tolist()]
    return batches


def process_slices(indices: list[int], rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
    """This process's micro-batches of one global batch: a contiguous 1/world_size slice, cut in micro-batches."""
    per_process = len(indices) // world_size
    mine = indices[rank * per_process : (rank + 1) * per_process]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


def process_examples(num_examples: int, global_batch: int, rank: int, world_size: int) -> list[int]:
    """Every example this process can see in any epoch: those of its shards (see ``step_batches``)."""
    per_process = global_batch // world_size
    mine = range(rank * per_process, (rank + 1) * per_process)
    return [i for i in range(num_examples) if i % global_batch in mine]


@dataclass
class TrainState:
    """What a checkpoint needs besides weights and optimizer state."""

    step: int = 0
    elapsed_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    #: learning-curve points taken so far (train/learning_curve.py); [] without ``curve_every``.
    curve: list[dict] = field(default_factory=list)


class Trainer:
    """One HyperDAS training run.

    Args:
        config: the run configuration (``config.resume`` set: continue that run folder).
        setup: how to build the engine; default single-process PyTorch.
    """

    def __init__(self, config: RunConfig, setup: EngineSetup | None = None):
        if config.resume and Path(config.out_dir).resolve() != Path(config.resume).resolve():
            config = load_run_config(None, [f"resume={config.resume}"])  # a RunConfig made in Python
        config.validate()
        self.config = config
        self.setup = setup or PlainSetup()
        micro_batch_plan(config.global_batch_size, self.setup.world_size, config.micro_batch_size)
        getattr(self.setup, "check", check_against_target)(config)
        self.out_dir = Path(config.out_dir)
        check_out_dir(self.out_dir, bool(config.resume), config.overwrite, remove=self.setup.is_main)
        self.engine: TrainingEngine | None = None
        self.data: RunData | None = None
        self.state = TrainState()
        self._batches: dict[int, list[list[int]]] = {}

    # --- the recipe ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train (or continue), then evaluate and write the run folder; returns the metrics."""
        self.prepare()
        self.train()
        return self.evaluate_and_report()

    def prepare(self) -> None:
        """Build the engine and the data; restore the last checkpoint when resuming."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        if cfg.model.basis_per_attribute and cfg.model.basis_attributes is None:
            # the bases are built with the model, before the data is: one per attribute the run asks for
            cfg.model.basis_attributes = sorted(cfg.data_request().requested_attributes())
        self.engine = self.setup.build(cfg)
        self.data = load_run_data(cfg, self.engine.model.target, self.setup)
        # the instruction routes by attribute name: record which the editor learns, so no other is ever scored
        trained = sorted(set(self.data.train["attribute"]))
        self.engine.model.config.trained_attributes = trained
        without = sorted(set(trained) - set(cfg.model.basis_attributes or trained))
        if without:
            raise ValueError(
                f"model.basis_attributes {cfg.model.basis_attributes} has no basis for {without}, which the "
                "training data asks; name every attribute of data.attributes, or leave it null to take them"
            )
        mine = process_examples(len(self.data.train), cfg.global_batch_size, self.setup.rank, self.setup.world_size)
        cache_train_states(self.data, self.engine.model.target, cfg, self.setup, mine)
        if self.setup.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_run_config(cfg, self.out_dir / RUN_CONFIG_FILE)
        self.setup.barrier()
        if cfg.resume:
            self.state = TrainState(**self._restore())

    def _restore(self) -> dict:
        """Load the newest checkpoint that loads, newest first (a damaged one is reported and skipped)."""
        candidates = self.checkpoints()
        if not candidates:
            raise FileNotFoundError(f"cannot resume {self.out_dir}: it holds no checkpoint under {CHECKPOINTS}/")
        for folder in candidates:
            try:
                return self.engine.load(folder)
            except (OSError, RuntimeError, EOFError, KeyError, ValueError) as err:
                if self.setup.is_main:
                    print(
                        f"hyperdas train: checkpoint {folder} cannot be loaded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'truncated'}); trying the one before"
                    )
        raise ValueError(f"cannot resume {self.out_dir}: none of its checkpoints {[c.name for c in candidates]} loads")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` (``step_batches``; grouped by length unless the config says not)."""
        if epoch not in self._batches:
            lengths = self.data.pair_lengths() if self.config.group_by_length else None
            self._batches = {
                epoch: step_batches(
                    len(self.data.train), self.config.global_batch_size, self.config.seed, epoch, lengths
                )
            }
        return self._batches[epoch]

    @property
    def steps_per_epoch(self) -> int:
        steps = len(self.data.train) // self.config.global_batch_size
        if steps == 0:
            raise ValueError(
                f"the training split has {len(self.data.train)} examples, fewer than one global batch "
                f"({self.config.global_batch_size}); lower global_batch_size or build more data"
            )
        return steps

    @property
    def total_steps(self) -> int:
        total = self.config.epochs * self.steps_per_epoch
        return min(total, self.config.max_steps) if self.config.max_steps else total

    @property
    def schedule(self) -> TrainingSchedule:
        """Learning-rate scale, loss weights and annealing progress at each step (train/schedule.py)."""
        return TrainingSchedule(self.total_steps, self.config.optim, self.config.loss)

    def train(self) -> None:
        """Optimizer steps from the current state to ``total_steps``; Ctrl-C saves a checkpoint first."""
        cfg, state = self.config, self.state
        total = self.total_steps
        bar = tqdm(total=total, initial=state.step, desc="train", disable=not self.setup.is_main, unit="step")
        started = time.perf_counter() - state.elapsed_seconds
        interrupted = _InterruptFlag()
        try:
            if state.step == 0:
                started += self._take_curve_point(bar)
            while state.step < total and not interrupted.raised:
                epoch, within = divmod(state.step, self.steps_per_epoch)
                indices = self.epoch_batches(epoch)[within]
                record = self._one_step(indices)
                state.step += 1
                state.elapsed_seconds = time.perf_counter() - started
                record.update(step=state.step, seconds=round(state.elapsed_seconds, 2))
                state.history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{record['ce']:.3f}")
                if cfg.curve_every and (state.step % cfg.curve_every == 0 or state.step == total):
                    started += self._take_curve_point(bar)  # the curve's time is not training time
                if state.step % cfg.log_every == 0 and self.setup.is_main:
                    left = state.elapsed_seconds / state.step * (total - state.step) if state.step else 0.0
                    bar.write(
                        f"step {state.step}/{total}  loss {record['loss']:.4f}  ce {record['ce']:.4f}  "
                        f"sparsity {record['sparsity_penalty']:.3f} x {record['sparsity_weight']:.2f}  "
                        f"grad norm {record['grad_norm']:.3f}  {state.elapsed_seconds:.0f} s, ~{left:.0f} s left"
                    )
                if state.step % cfg.save_every == 0 and state.step < total:
                    self.save_checkpoint()
        finally:
            bar.close()
            interrupted.restore()
        self.save_checkpoint()
        if interrupted.raised:
            raise KeyboardInterrupt(f"interrupted; checkpoint saved at step {state.step} in {self.out_dir}")

    def _take_curve_point(self, bar) -> float:
        """A learning-curve point at the current step (once per step, only with ``curve_every``); its seconds."""
        cfg, state = self.config, self.state
        if not cfg.curve_every or (state.curve and state.curve[-1]["step"] == state.step):
            return 0.0
        point = curve_point(
            self.engine,
            self.data,
            state.step,
            cfg.curve_examples,
            cfg.eval_batch_size,
            self.setup.rank,
            self.setup.world_size,
            cfg.seed,
        )
        state.curve.append(point)
        if self.setup.is_main:
            cells = "  ".join(
                f"{split} soft {100 * point[split]['soft']['disentangle']:.1f} "
                f"(floor {100 * point[split]['floor']['disentangle']:.1f})"
                for split in CURVE_SPLITS
            )
            bar.write(f"curve at step {state.step}: {cells}, {point['seconds']:.0f} s")
        return point["seconds"]

    def _one_step(self, indices: list[int]) -> dict:
        engine = self.engine
        now = self.schedule.at(self.state.step)
        weights = now.loss_weights
        engine.model.set_progress(now.progress)
        engine.set_lr_scale(now.lr_scale)
        micro_batches = process_slices(indices, self.setup.rank, self.setup.world_size, engine.micro_batch_size)
        losses, ces, penalties = [], [], []
        grad_norm = None
        for micro in micro_batches:
            batch = self.data.collate(self.data.train, micro)
            states = self.data.states.states_for(batch, engine.device) if self.data.states is not None else None
            if states is None and self.data.states is not None and self.setup.world_size > 1:
                # every process must run the same forwards under ZeRO-3: a live pass on one alone would hang
                raise RuntimeError(f"state cache miss on process {self.setup.rank}: it holds this process's shards")
            out = engine.forward(
                batch, mode=self.config.model.train_selection_mode, loss_weights=weights, states=states
            )
            engine.backward(out.loss)
            grad_norm = engine.step()
            losses.append(out.loss.item())
            ces.append(out.ce_loss.item())
            penalties.append(out.sparsity_penalty.item())
        if grad_norm is None:
            raise RuntimeError(
                f"no optimizer step after {len(micro_batches)} micro-batches: the engine expects "
                f"{engine.grad_accum_steps} per step"
            )
        loss, ce, penalty = self._mean_over_processes(
            [sum(losses) / len(losses), sum(ces) / len(ces), sum(penalties) / len(penalties)]
        )
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {self.state.step + 1}")
        return {
            "loss": loss,
            "ce": ce,
            "sparsity_penalty": penalty,
            "sparsity_weight": weights.sparsity,
            "grad_norm": grad_norm,
        }

    def _mean_over_processes(self, values: list[float]) -> list[float]:
        """The global batch's mean of per-process means (equal shares), so every launcher logs the same curve."""
        if self.setup.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(total)
        return (total / self.setup.world_size).tolist()

    # --- checkpoints ---------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, the one ``latest`` names first, then the others newest first."""
        root = self.out_dir / CHECKPOINTS
        found = sorted((p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".partial"), reverse=True)
        pointer = root / LATEST
        named = root / pointer.read_text().strip() if pointer.is_file() else None
        if named in found:
            found.remove(named)
            found.insert(0, named)
        elif named is not None and self.setup.is_main:
            print(f"hyperdas train: {pointer} names {named.name}, which is missing; using the newest checkpoint found")
        return found

    def save_checkpoint(self) -> Path:
        """Write step_NNNNNN atomically (a .partial folder renamed once complete), keep the last two."""
        root = self.out_dir / CHECKPOINTS
        name = f"step_{self.state.step:06d}"
        final, partial = root / name, root / f"{name}.partial"
        if self.setup.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.setup.barrier()
        self.engine.save(partial, client_state=self.state.__dict__.copy())
        self.setup.barrier()
        if self.setup.is_main:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            (root / LATEST).write_text(name + "\n")
            _write_jsonl(self.state.history, self.out_dir / TRAIN_LOG)
            if self.state.curve:
                _write_jsonl(self.state.curve, self.out_dir / CURVE_FILE)
            # keep this one and the one before it; later steps (a timeline resumed from an earlier checkpoint)
            # and older ones go
            steps = sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix != ".partial")
            previous = [p for p in steps if p.name < name][-1:]
            for stale in steps:
                if stale != final and stale not in previous:
                    shutil.rmtree(stale, ignore_errors=True)
        self.setup.barrier()
        return final

    # --- the end -------------------------------------------------------------------------------------
    def evaluate_and_report(self) -> dict:
        """Export the trained model, evaluate every mode on held-out templates, write metrics and report."""
        cfg = self.config
        self.engine.export_trained(self.out_dir / FINAL_MODEL)
        result = evaluate(
            self.engine,
            self.data,
            modes=cfg.eval_modes,
            batch_size=cfg.eval_batch_size,
            max_examples=cfg.eval_max_examples,
            heatmap_examples=cfg.heatmap_examples,
            rank=self.setup.rank,
            world_size=self.setup.world_size,
            seed=cfg.seed,
        )
        if self.setup.is_main:
            write_evaluation(result, self.out_dir, history=self.state.history, run_config=cfg, curve=self.state.curve)
        self.setup.barrier()
        return result.metrics


def _write_jsonl(records: list[dict], path: Path) -> None:
    """One JSON record per line, the file rewritten whole (a resumed run's records are its checkpoint's)."""
    with open(path, "w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")


#: what an earlier run leaves in its out_dir (``overwrite=true`` removes these and nothing else)
RUN_OUTPUTS = (
    CHECKPOINTS,
    FINAL_MODEL,
    TRAIN_LOG,
    CURVE_FILE,
    CURVE_PLOT,
    RUN_CONFIG_FILE,
    "metrics.json",
    "report.md",
    "selection_heatmap.png",
    "eval",
)


def check_out_dir(out_dir: Path, resuming: bool, overwrite: bool, remove: bool = True) -> None:
    """Refuse an out_dir that is a file, is not writable, or holds another run (unless resuming or overwriting);
    with ``overwrite`` (and ``remove``: the main process) the earlier run's outputs are removed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; give a folder")
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise ValueError(f"out_dir {out_dir} cannot be written ({probe} is not writable)")
    used = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if used and not resuming:
        if not overwrite:
            raise ValueError(
                f"out_dir {out_dir} holds an earlier run ({', '.join(used)}): continue it with "
                f"resume={out_dir}, replace it with overwrite=true, or choose another out_dir"
            )
        for name in used if remove else ():
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


class _InterruptFlag:
    """Turns the first Ctrl-C or SIGTERM into a flag checked between steps (a second Ctrl-C stops at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.raised = False
        self._previous = {}
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
