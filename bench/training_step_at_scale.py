"""One HyperDAS training step at Llama-3-8B's shape on random weights, and the largest batch that fits.

    python bench/training_step_at_scale.py --json step.json             # CUDA: the paper's setting
    python bench/training_step_at_scale.py --smoke --json step.json     # CPU: the tiny Llama, seconds

The target is built from the Llama-3-8B config with random bf16 weights, on the device (no download: the
shapes, not the weights, set the speed). The step is `hyperdas train`'s (hyperdas.train.engine.PlainEngine:
bf16 autocast, fp32 masters, AdamW, grad-norm clipping) at bench/flop_model.py's paper case: L=8, r=128, B=16,
T=64, Te=12, intervention layer 15. Measured, each after one warm-up step (compilation, autotuning, optimizer
state): the two-pass step (hyperdas.model) and the literal four-pass step (hyperdas.literal), each with the
fused kernels on and off: time per step, pairs per second, TFLOP/s by flop_model's count, and peak CUDA memory
beside bench/memory_model.py's prediction (the two-pass step; the model has no four-pass form).

Then the largest batch that fits, for the plain two-pass step and with editor + target checkpointing: a
bounded search (at most 8 probes, and never one whose estimated time would overrun --budget-s) that starts at
memory_model.py's prediction for the device's memory, grows by 1.5x until a step runs out of memory, then
bisects to within 5%. Each probe records its measured peak beside the prediction at that batch. In --smoke
(CPU, no allocator limit) an out-of-memory is simulated where the prediction passes a pretend device's
memory, chosen so the plain step's prediction is 6 pairs; the real steps still run at every batch that fits.

Writes one JSON (after every measurement, so an overrun keeps what was done): machine_info and benchmarks in
pytest-benchmark's layout, so bench/make_tables.py tables them (op "training_step", paths two_pass / four_pass;
speed-up against four_pass), plus "largest_batch" and "errors".
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # fused kernels on CPU run in Triton's interpreter

import memory_model  # noqa: E402
from device_stamp import device_name, driver_version, package_version  # noqa: E402
from flop_model import CASES as FLOP_CASES  # noqa: E402
from flop_model import StepShape, step_macs  # noqa: E402

from hyperdas.data.batch import PairBatch

GIB = 2**30
PAPER_CASE = FLOP_CASES["llama3-8b B=16 T=64 (paper)"]
SMOKE_CASE = (
    "tiny",
    StepShape(batch=4, seq_len=12, instruction_len=6, label_tokens=3, editor_layers=2, rank=8, intervention_layer=1),
)
#: the pretend device of --smoke holds what memory_model.py predicts for this many pairs (plain step).
SMOKE_PLAIN_PAIRS = 6
MAX_PROBES = 8


def step_case(smoke: bool) -> tuple[str, StepShape]:
    """(memory_model preset, step shape): the paper's Llama-3-8B setting, or the tiny Llama for --smoke."""
    return SMOKE_CASE if smoke else PAPER_CASE


def memory_step(shape: StepShape, **overrides) -> memory_model.Step:
    """memory_model's description of this step (plain PyTorch, bf16, fused attention unless overridden)."""
    values = dict(
        batch=shape.batch,
        seq_len=shape.seq_len,
        instruction_len=shape.instruction_len,
        label_tokens=shape.label_tokens,
        editor_layers=shape.editor_layers,
        rank=shape.rank,
        intervention_layer=shape.intervention_layer,
        engine="plain",
        bf16=True,
        attention="fused",
    )
    values.update(overrides)
    return memory_model.Step(**values)


def build_target(preset: str, device: torch.device):
    """The frozen target with random bf16 weights, created on the device (no host copy of an 8B model)."""
    from hyperdas.targets import build_random_target

    with device:
        target = build_random_target(memory_model.target_config(preset), dtype=torch.bfloat16, seed=0)
    return target.to(device)


def new_engine(preset: str, target, shape: StepShape, fused: bool | None, checkpoint: bool, device: torch.device):
    """`hyperdas train`'s single-process engine over a fresh HyperDAS on ``target``."""
    from hyperdas.config import HyperDASConfig
    from hyperdas.model import HyperDAS
    from hyperdas.train.config import RunConfig
    from hyperdas.train.engine import PlainEngine

    config = HyperDASConfig(
        target=preset,
        intervention_layer=shape.intervention_layer,
        das_dimension=shape.rank,
        chop_editor_at_layer=shape.editor_layers,
        use_fused_kernels=fused,
        checkpoint_editor_layers=checkpoint,
        checkpoint_target_layers=checkpoint,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with device:
        model = HyperDAS(config, target)
    return PlainEngine(model, RunConfig(model=config, global_batch_size=shape.batch, precision="bf16"), device)


def device_batch(vocab: int, shape: StepShape, batch: int, device: torch.device) -> PairBatch:
    """Synthetic pairs of the step's lengths (memory_model.synthetic_batch) on the device."""
    return memory_model.synthetic_batch(vocab, memory_step(shape, batch=batch)).to(device)


def train_step(engine, batch: PairBatch, path: str) -> None:
    """Forward, backward and optimizer step; path "two_pass" (hyperdas.model) or "four_pass" (hyperdas.literal)."""
    from hyperdas.literal import literal_four_pass_forward
    from hyperdas.model import LossWeights

    weights = LossWeights(sparsity=0.5)
    if path == "two_pass":
        loss = engine.forward(batch, loss_weights=weights).loss
    else:
        loss = literal_four_pass_forward(engine.model, batch, loss_weights=weights)[0]
    engine.backward(loss)
    engine.step()
    if batch.base_input_ids.is_cuda:
        torch.cuda.synchronize()


def timed_steps(step: Callable[[], None], device: torch.device, steps: int) -> tuple[list[float], int | None]:
    """One warm-up step, then ``steps`` timed ones: (seconds of each, peak CUDA bytes allocated over them)."""
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times, torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def benchmark_entry(case: str, path: str, fused: bool, times: list[float], info: dict) -> dict:
    """One result in pytest-benchmark's JSON layout (what bench/make_tables.py reads)."""
    kernels = "fused" if fused else "unfused"
    return {
        "name": f"training_step_at_scale[{path}-{kernels}]",
        "group": f"training step {case}",
        "params": {"path": path, "fused": fused},
        "stats": {
            "mean": statistics.fmean(times),
            "median": statistics.median(times),
            "min": min(times),
            "max": max(times),
            "stddev": statistics.pstdev(times),
            "rounds": len(times),
            "data": times,
        },
        "extra_info": {
            "op": "training_step",
            "case": f"{case}, {kernels} kernels",
            "mode": "fwd+bwd+adamw",
            "path": path,
            **info,
        },
    }


def is_out_of_memory(err: RuntimeError) -> bool:
    """torch's OutOfMemoryError, or cuBLAS / cuDNN failing to allocate their workspace."""
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


@dataclass
class Probe:
    """One step at a batch size in the largest-batch search."""

    batch: int
    fits: bool
    predicted_bytes: int
    peak_bytes: int | None = None
    seconds: float | None = None
    note: str = ""


def search_largest_batch(
    probe: Callable[[int], Probe],
    start: int,
    seconds_for: Callable[[int], float],
    time_left: Callable[[], float],
    max_probes: int = MAX_PROBES,
) -> dict:
    """The largest batch for which ``probe`` fits: up from ``start`` by 1.5x to a failure (down by 2/3 to a fit),
    then bisection until the gap is within 5%; no more than ``max_probes`` probes, and none whose
    ``seconds_for(batch)`` estimate exceeds ``time_left()``.

    Returns:
        {"largest_fit": the largest batch seen to fit (0: none), "smallest_failure": the smallest seen to fail
        (None: none), "probes": [Probe as dict], "stopped": why the search ended}.
    """
    probes: list[Probe] = []
    fit, fail = 0, None
    batch = max(1, start)
    stopped = "converged to within 5%"
    while True:
        if len(probes) == max_probes:
            stopped = f"probe limit ({max_probes})"
            break
        if seconds_for(batch) > time_left():
            stopped = f"time limit (a step at batch {batch} would take ~{seconds_for(batch):.0f} s)"
            break
        result = probe(batch)
        probes.append(result)
        if result.fits:
            fit = max(fit, batch)
        else:
            fail = batch if fail is None else min(fail, batch)
        if fail is None:
            batch = max(batch + 1, batch * 3 // 2)
        elif fit == 0:
            if fail == 1:
                stopped = "not even one pair fits"
                break
            batch = max(1, fail * 2 // 3)
        elif fail - fit <= max(1, fit // 20):
            break
        else:
            batch = (fit + fail) // 2
    return {"largest_fit": fit, "smallest_failure": fail, "probes": [asdict(p) for p in probes], "stopped": stopped}


class StepBenchmark:
    """The measurements of this script, saved to ``out`` after each one."""

    def __init__(self, out: Path, smoke: bool, budget_s: float, steps: int):
        self.out = out
        self.smoke = smoke
        self.deadline = time.monotonic() + budget_s
        self.steps = steps
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.preset, self.shape = step_case(smoke)
        self.case = (
            f"{self.preset} B={self.shape.batch} T={self.shape.seq_len} L={self.shape.editor_layers} "
            f"r={self.shape.rank} k={self.shape.intervention_layer} (random weights)"
        )
        self.config = memory_model.target_config(self.preset)
        self.counts = memory_model.parameter_counts(self.preset, memory_step(self.shape))
        self.macs = {path: sum(parts.values()) for path, parts in step_macs(self.config, self.shape).items()}
        self.result: dict = {
            "machine_info": {
                "device": device_name(),
                "device_kind": self.device.type,
                "driver": driver_version(),
                "cuda_version": torch.version.cuda,
                "torch": torch.__version__,
                "triton": package_version("triton"),
                "transformers": package_version("transformers"),
                "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
            "case": {"preset": self.preset, "shape": asdict(self.shape), "smoke": smoke},
            "benchmarks": [],
            "largest_batch": [],
            "errors": [],
        }
        self.seconds_per_pair: float | None = None

    def save(self) -> None:
        self.out.write_text(json.dumps(self.result, indent=2) + "\n")

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def error(self, what: str, err: BaseException) -> None:
        message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        print(f"{what}: FAILED {message}", flush=True)
        self.result["errors"].append({"what": what, "error": message})
        self.save()

    def predicted_bytes(self, step: memory_model.Step) -> int:
        return memory_model.predict(self.preset, step, self.counts)["total"]

    # --- two-pass vs four-pass, fused vs unfused ----------------------------------------------------
    def compare_paths(self, target) -> None:
        batch = device_batch(self.config.vocab_size, self.shape, self.shape.batch, self.device)
        for fused in (True, False):
            try:
                engine = new_engine(self.preset, target, self.shape, fused, False, self.device)
            except Exception as err:  # noqa: BLE001 - recorded; the other setting still runs
                self.error(f"building the {'fused' if fused else 'unfused'} model", err)
                continue
            for path in ("two_pass", "four_pass"):
                self.time_path(engine, batch, path, fused)
            engine = None
            self.free()

    def time_path(self, engine, batch: PairBatch, path: str, fused: bool) -> None:
        what = f"{path} step, {'fused' if fused else 'unfused'} kernels"
        try:
            times, peak = timed_steps(lambda: train_step(engine, batch, path), self.device, self.steps)
        except Exception as err:  # noqa: BLE001 - an out-of-memory or kernel error is a result to record
            self.error(what, err)
            engine.optimizer.zero_grad(set_to_none=True)
            self.free()
            return
        mean = statistics.fmean(times)
        predicted = self.predicted_bytes(memory_step(self.shape, attention="fused" if fused else "sdpa"))
        info = {
            "pairs_per_second": self.shape.batch / mean,
            "tflops": 2 * self.macs[path] / mean / 1e12,
            "peak_memory_bytes": peak,
            "predicted_peak_bytes": predicted if path == "two_pass" else None,  # the model is of the two-pass step
        }
        if path == "two_pass" and fused == (self.device.type == "cuda"):  # the kernels the search runs
            self.seconds_per_pair = mean / self.shape.batch
        self.result["benchmarks"].append(benchmark_entry(self.case, path, fused, times, info))
        self.save()
        print(
            f"{what}: {mean:.3f} s ({info['pairs_per_second']:.1f} pairs/s), peak "
            f"{'—' if peak is None else f'{peak / GIB:.2f} GiB'}",
            flush=True,
        )

    # --- the largest batch ----------------------------------------------------------------------------
    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def capacity_bytes(self) -> tuple[int, str]:
        """Device memory the search fills: the GPU's, or in --smoke a pretend device (see the module docstring)."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory, "the device's memory"
        step = memory_step(self.shape, batch=SMOKE_PLAIN_PAIRS, attention="sdpa")
        pretend = self.predicted_bytes(step) + 2 * GIB  # memory_model.largest_batch keeps a 2 GiB reserve
        return pretend, f"a pretend device of {pretend / GIB:.3f} GiB (CPU smoke: out-of-memory simulated)"

    def largest_batches(self, target) -> None:
        capacity, what = self.capacity_bytes()
        for name, checkpoint in (("plain two-pass step", False), ("editor + target checkpointing", True)):
            # the first search may use half of the time left, the second the rest
            deadline = self.deadline - (0 if checkpoint else self.time_left() / 2)
            entry = self.search(target, name, checkpoint, capacity, what, deadline)
            print(
                f"largest batch, {name}: {entry.get('largest_fit')} (predicted {entry['predicted_largest']}; "
                f"{entry.get('stopped', 'failed')})",
                flush=True,
            )
        plain, checkpointed = (entry.get("largest_fit") for entry in self.result["largest_batch"])
        if plain and checkpointed:
            self.result["batch_ratio_checkpointed_over_plain"] = checkpointed / plain
            self.save()

    def search(self, target, name: str, checkpoint: bool, capacity: int, what: str, deadline: float) -> dict:
        """One bounded search; its entry in the results grows (and is saved) probe by probe."""
        # the fused kernels where they are the default (CUDA); the PyTorch path on CPU
        step = memory_step(
            self.shape,
            checkpoint_editor=checkpoint,
            checkpoint_target=checkpoint,
            attention="fused" if self.device.type == "cuda" else "sdpa",
        )
        predicted = memory_model.largest_batch(self.preset, step, capacity / GIB)
        entry = {
            "setting": name,
            "checkpoint_editor": checkpoint,
            "checkpoint_target": checkpoint,
            "capacity_bytes": capacity,
            "capacity": what,
            "predicted_largest": predicted,
            "probes": [],
        }
        self.result["largest_batch"].append(entry)
        per_pair = (self.seconds_per_pair or 0.05) * (1.5 if checkpoint else 1.0)  # recomputation costs ~1.5x

        def probe(batch: int) -> Probe:
            result = self.probe(engine, step, batch, capacity)
            entry["probes"].append(asdict(result))
            self.save()
            return result

        try:
            engine = new_engine(self.preset, target, self.shape, None, checkpoint, self.device)
            entry.update(
                search_largest_batch(
                    probe,
                    predicted,
                    seconds_for=lambda batch: 2.0 + 2 * per_pair * batch,  # with a 2x margin for the estimate
                    time_left=lambda: deadline - time.monotonic(),
                )
            )
        except Exception as err:  # noqa: BLE001 - recorded; the other setting still runs
            self.error(f"largest batch, {name}", err)
        engine = None
        self.free()
        return entry

    def probe(self, engine, step: memory_model.Step, batch: int, capacity: int) -> Probe:
        predicted = self.predicted_bytes(replace(step, batch=batch))
        if self.device.type != "cuda" and predicted > capacity - 2 * GIB:
            print(f"  probe batch {batch}: simulated out-of-memory", flush=True)
            return Probe(batch, False, predicted, note="simulated out-of-memory")
        pairs = device_batch(self.config.vocab_size, self.shape, batch, self.device)
        self.free()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fits, note = True, ""
        try:
            train_step(engine, pairs, "two_pass")
        except RuntimeError as err:  # torch's OutOfMemoryError, or a library's failed workspace allocation
            if not is_out_of_memory(err):
                raise
            fits, note = False, f"out of memory: {str(err).strip().splitlines()[0][:160]}"
        seconds = time.perf_counter() - start
        engine.optimizer.zero_grad(set_to_none=True)
        del pairs
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
        self.free()
        print(f"  probe batch {batch}: {'fits' if fits else note} in {seconds:.1f} s", flush=True)
        return Probe(batch, fits, predicted, peak, seconds, note)

    def run(self) -> None:
        self.save()
        try:
            target = build_target(self.preset, self.device)
        except Exception as err:  # noqa: BLE001 - nothing else can run; the error is the result
            self.error("building the random target", err)
            return
        self.compare_paths(target)
        self.largest_batches(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--smoke", action="store_true", help="the tiny Llama on CPU: a quick check of this script")
    parser.add_argument("--budget-s", type=float, default=240.0, help="the largest-batch search stops within this")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5; smoke 2)")
    args = parser.parse_args(argv)
    bench = StepBenchmark(args.json, args.smoke, args.budget_s, args.steps or (2 if args.smoke else 5))
    bench.run()
    return 1 if bench.result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
