"""DeepSpeed engine, 2 processes over gloo on CPU, tiny random Llama target, synthetic pairs.

Every run goes through tests/train/ds_worker.py in its own processes (torchrun), on the same global batches cut
the trainer's way:

- plain data parallel (2 processes) equals the single-process PlainEngine run exactly: every step's loss and
  the trained weights, bitwise;
- ZeRO-3 on 2 processes (target and editor partitioned, gradient checkpointing on) equals ZeRO-3 on 1 process
  (no checkpointing) exactly: partitioning, gathering, the reduce-scatter and the export change nothing;
- ZeRO-3's gradients equal the single process's to float32 rounding, with gradient accumulation across the
  processes, and checkpointing on equals off bitwise;
- the exported editor loads in one process (``HyperDAS.from_pretrained``) and gives the distributed model's
  evaluation outputs, bitwise.

Why exact where it can be: AdamW divides by √v + 1e-8, so on entries whose gradient is near zero it turns an
absolute gradient difference δ into a weight difference of up to lr·δ/1e-8. float32 rounding noise (~1e-11 on
sums of 1e-3 terms) then grows into 1e-7 .. 1e-6 weight differences within a few steps, on entries that depend
on the CPU's summation order: no tolerance derived from the arithmetic survives that. So the training runs do
the same arithmetic on both sides: the same micro-batches (the trainer's contiguous per-process slices), one
micro-batch of 4 per process against two accumulated on one process (g1/2 + g2/2 there, (g1 + g2)/2 reduced
over two processes: bitwise the same sum) and no clipping (the norms stay below 4). ZeRO-3 cannot equal the
PlainEngine bitwise: its module hooks change the order in which autograd sums an activation's gradient
contributions (1 ulp on every gradient), so that comparison is made on one step's gradients, against float64.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperdas.data.batch import PairBatch
from hyperdas.testing import torchrun_command

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("ds_worker.py")
CONFIGS = Path(__file__).parents[2] / "train" / "configs"
RUN_TIMEOUT_S = 300
STEPS = 4


THREADS = 1  # the workers' thread count; in-process comparisons use the same (it sets the GEMMs' blocking)


def _run_worker(out: Path, *args: str, processes: int) -> Path:
    """Run the worker (torchrun with ``processes`` processes, plain python for the plain engine) -> ``out``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    if "plain" in args:
        command = [sys.executable, str(WORKER)]
    else:
        command = torchrun_command(WORKER, processes)
    result = subprocess.run(
        [*command, "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    if result.returncode != 0:
        raise AssertionError(f"worker failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return out


def _ds_json(tmp: Path, name: str) -> Path:
    """A shipped DeepSpeed config; for ZeRO-3, every parameter is partitioned (no small-parameter exemption)."""
    values = json.loads((CONFIGS / name).read_text())
    if values["zero_optimization"]["stage"] == 3:
        values["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / name
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_target) -> Path:
    """A folder with the tiny target saved as a loadable model folder."""
    root = tmp_path_factory.mktemp("ds")
    tiny_target.model.save_pretrained(root / "target")
    tiny_target.tokenizer.save_pretrained(root / "target")
    return root


def _common(workdir: Path) -> list[str]:
    """8 pairs a step in micro-batches of 4: one per process on two, two accumulated on one."""
    return ["--target", str(workdir / "target"), "--steps", str(STEPS), "--global-batch", "8", "--micro-batch", "4"]


@pytest.fixture(scope="module")
def plain_run(workdir) -> Path:
    return _run_worker(workdir / "plain", "--engine", "plain", *_common(workdir), processes=1)


@pytest.fixture(scope="module")
def zero3_run(workdir) -> Path:
    ds = _ds_json(workdir, "zero3.json")
    # with gradient checkpointing of the editor and of target layers k..end; the reference runs without
    return _run_worker(
        workdir / "zero3", "--engine", "deepspeed", "--ds", str(ds), "--checkpointing", *_common(workdir), processes=2
    )


@pytest.fixture(scope="module")
def zero3_one_process(workdir) -> Path:
    ds = _ds_json(workdir, "zero3.json")
    return _run_worker(workdir / "zero3_one", "--engine", "deepspeed", "--ds", str(ds), *_common(workdir), processes=1)


def _curves(run: Path) -> dict[str, dict[int, float]]:
    """{"loss": {step: global loss}, "grad_norm": {step: global gradient norm before clipping}}."""
    curves = json.loads((run / "losses.json").read_text())
    return {name: {int(k): v for k, v in values.items()} for name, values in curves.items()}


def norm_tolerance(num_entries: int) -> float:
    """Relative bound for one gradient's 2-norm taken by two engines (DeepSpeed sums the squares per partition):
    the same N squares summed in two orders differ by at most 2(N − 1)·u relative, u = 2^-24; in practice by
    about √N·u (rounding errors of random sign). 8·√N·u leaves that a factor 8."""
    return 8 * math.sqrt(num_entries) * 2.0**-24


def _assert_same_training(run: Path, reference: Path) -> None:
    curves, expected = _curves(run), _curves(reference)
    weights = load_file(str(run / "export" / "hyperdas.safetensors"))
    reference_weights = load_file(str(reference / "export" / "hyperdas.safetensors"))
    entries = sum(v.numel() for v in reference_weights.values())
    for name in ("loss", "grad_norm"):
        assert sorted(curves[name]) == list(range(1, STEPS + 1))
    for step, value in expected["loss"].items():
        assert curves["loss"][step] == value, f"loss at step {step}"  # same arithmetic: bitwise
    for step, value in expected["grad_norm"].items():  # each engine takes the norm its own way
        assert value < 4.0 and curves["grad_norm"][step] == pytest.approx(value, rel=norm_tolerance(entries))
    assert sorted(weights) == sorted(reference_weights)
    for name, value in reference_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)


def test_zero3_two_processes_match_one_process(zero3_run, zero3_one_process):
    _assert_same_training(zero3_run, zero3_one_process)


def test_zero3_processes_hold_half_the_target_and_never_all_of_it(zero3_run):
    """README: under ZeRO-3 the frozen target is created partitioned. Each of the 2 processes holds its ⌈n/2⌉
    share of every target parameter (nothing is left gathered once built), and no gather while building
    (transformers loading one module at a time, the editor copying the first L layers) spans the whole target."""
    for rank in (0, 1):
        report = json.loads((zero3_run / f"partitions_rank{rank}.json").read_text())
        assert report["gathered_now"] == []
        assert report["total"] / 2 <= report["held"] <= report["total"] / 2 + report["parameters"]
        assert 0 < report["largest_gather_while_building"] < report["total"]


def test_ddp_matches_single_process(workdir, plain_run):
    # (ZeRO-2 runs end to end in test_deepspeed_launch.py)
    ds = _ds_json(workdir, "ddp.json")
    run = _run_worker(workdir / "ddp", "--engine", "deepspeed", "--ds", str(ds), *_common(workdir), processes=2)
    _assert_same_training(run, plain_run)


def test_zero3_gradients_equal_the_single_process_ones_to_float32_rounding(workdir):
    """One global batch of 8 in micro-batches of 2: ZeRO-3 accumulates two per process and reduces over the
    two, (g1 + g3) + (g2 + g4) with its own summation order inside autograd; the single process sums
    ((g1 + g2) + g3) + g4. Both are float32 evaluations of the same gradient, so each must be as close to the
    exact (float64) gradient as float32 rounding allows: ZeRO-3's error, per tensor, within 4x the single-process
    float32 run's own error (one measured error sits well inside the bound it samples; 4x allows for another
    draw of signs). A wrong reduction (a missing average, a lost micro-batch) is off by O(|g|), 1e6 times more.
    Recomputing activations (checkpointing) is the same arithmetic again: bitwise equal."""
    ds = _ds_json(workdir, "zero3.json")
    grad_args = ["--target", str(workdir / "target"), "--global-batch", "8", "--micro-batch", "2", "--grads"]
    zero3 = torch.load(
        _run_worker(workdir / "grads_zero3", "--engine", "deepspeed", "--ds", str(ds), *grad_args, processes=2)
        / "grads.pt"
    )
    plain = torch.load(_run_worker(workdir / "grads_plain", "--engine", "plain", *grad_args, processes=1) / "grads.pt")
    exact = torch.load(
        _run_worker(workdir / "grads_float64", "--engine", "plain", "--float64", *grad_args, processes=1) / "grads.pt"
    )
    assert sorted(zero3["on"]) == sorted(plain["off"]) == sorted(exact["off"]) and len(plain["off"]) > 10
    u = 2.0**-24
    for name, reference in exact["off"].items():
        assert reference.abs().max() > 0, f"{name} gets no gradient"
        own_error = (plain["off"][name].double() - reference).abs().max().item()
        floor = u * reference.abs().max().item()  # where float32 happens to round (almost) exactly
        zero3_error = (zero3["off"][name].double() - reference).abs().max().item()
        assert zero3_error <= 4 * max(own_error, floor), f"{name}: {zero3_error:.3e} vs float32's {own_error:.3e}"
        torch.testing.assert_close(zero3["on"][name], zero3["off"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(plain["on"][name], plain["off"][name], rtol=0, atol=0, msg=name)


def test_exported_editor_loads_in_one_process_with_the_same_outputs(workdir, zero3_run):
    from hyperdas.model import HyperDAS
    from hyperdas.targets import load_target

    sys.path.insert(0, str(WORKER.parent))
    from ds_worker import LOSS_WEIGHTS, SyntheticPairs

    target = load_target(str(workdir / "target"))
    model = HyperDAS.from_pretrained(zero3_run / "export", target).eval()
    data = SyntheticPairs(6, target.config.vocab_size, seed=2)
    batch = PairBatch.from_mapping({k: torch.stack([item[k] for item in data.items]) for k in data.items[0]})
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # the workers' thread count: the same GEMM blocking, the same rounding
    try:
        with torch.no_grad():
            output = model(batch, loss_weights=LOSS_WEIGHTS)
    finally:
        torch.set_num_threads(threads)
    distributed = torch.load(zero3_run / "eval.pt")
    # the exported fp32 masters are the distributed model's weights and the batch is the same: bitwise equal
    torch.testing.assert_close(output.logits, distributed["logits"], rtol=0, atol=0)
    torch.testing.assert_close(output.selection, distributed["selection"], rtol=0, atol=0)
    torch.testing.assert_close(output.loss, distributed["loss"], rtol=0, atol=0)
    accuracy = (output.logits.argmax(-1) == batch.label_ids).float().mean()
    distributed_accuracy = (distributed["logits"].argmax(-1) == batch.label_ids).float().mean()
    assert accuracy == distributed_accuracy


def test_zero3_training_with_the_positions_given_leaves_the_selection_head_as_built(workdir):
    """``model.train_selection_mode=groundtruth`` (WHICH without WHERE): the step patches the last entity tokens
    whatever the head says, so the head gets no gradient. Under ZeRO-3 on 2 processes it must still train the
    rest and leave the head exactly as it was built (an optimizer that updated it anyway, e.g. weight decay on
    a filled-in zero gradient, would move it), and export it with the model."""
    ds = _ds_json(workdir, "zero3.json")
    run = _run_worker(
        workdir / "zero3_groundtruth",
        "--engine", "deepspeed", "--ds", str(ds), "--train-selection-mode", "groundtruth", "--export-initial",
        *_common(workdir),
        processes=2,
    )  # fmt: skip
    before = load_file(str(run / "initial" / "hyperdas.safetensors"))
    after = load_file(str(run / "export" / "hyperdas.safetensors"))
    assert sorted(before) == sorted(after)
    head = [name for name in after if name.startswith("selection_head.")]
    rest = [name for name in after if not name.startswith("selection_head.")]
    assert head and rest
    for name in head:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    moved = [name for name in rest if not torch.equal(after[name], before[name])]
    assert any(n.startswith("subspace.") for n in moved) and any(n.startswith("editor.") for n in moved), moved
    assert all(math.isfinite(v) for v in _curves(run)["loss"].values())
