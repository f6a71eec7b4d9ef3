"""DeepSpeed engine, 2 processes over gloo on CPU, tiny random Llama target, synthetic pairs.

Every run goes through tests/train/ds_worker.py in its own processes (torchrun), and is compared with a
single-process PlainEngine run of the same global batches:

- ZeRO-3 (target and editor partitioned, gradient checkpointing on) and plain data parallel: every step's
  global loss, gradient norm and the trained editor weights equal the single-process run's (no checkpointing);
- gradient checkpointing (editor layers and target layers k..end, non-reentrant) on and off give the same
  full gradients under ZeRO-3, and those equal the single-process gradients;
- the exported editor loads in one process (``HyperDAS.from_pretrained``) and gives the distributed model's
  evaluation outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperdas.train.launch import free_local_port

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("ds_worker.py")
CONFIGS = Path(__file__).parents[2] / "train" / "configs"
RUN_TIMEOUT_S = 300
STEPS = 4


def _run_worker(out: Path, *args: str, processes: int) -> Path:
    """Run the worker (torchrun with ``processes`` processes, or plain python for one) and return ``out``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if processes == 1:
        command = [sys.executable, str(WORKER)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_local_port()), str(WORKER)]
    result = subprocess.run([*command, "--out", str(out), *args], env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
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
    return ["--target", str(workdir / "target"), "--steps", str(STEPS), "--global-batch", "8", "--micro-batch", "2"]


@pytest.fixture(scope="module")
def plain_run(workdir) -> Path:
    return _run_worker(workdir / "plain", "--engine", "plain", *_common(workdir), processes=1)


@pytest.fixture(scope="module")
def zero3_run(workdir) -> Path:
    ds = _ds_json(workdir, "zero3.json")
    # with gradient checkpointing of the editor and of target layers k..end; the reference runs without
    return _run_worker(workdir / "zero3", "--engine", "deepspeed", "--ds", str(ds), "--checkpointing",
                       *_common(workdir), processes=2)


def _curves(run: Path) -> dict[str, dict[int, float]]:
    """{"loss": {step: global loss}, "grad_norm": {step: global gradient norm before clipping}}."""
    curves = json.loads((run / "losses.json").read_text())
    return {name: {int(k): v for k, v in values.items()} for name, values in curves.items()}


def _assert_same_training(run: Path, reference: Path) -> None:
    curves, expected = _curves(run), _curves(reference)
    for name in ("loss", "grad_norm"):
        assert sorted(curves[name]) == list(range(1, STEPS + 1))
        for step, value in expected[name].items():
            assert curves[name][step] == pytest.approx(value, rel=1e-5), f"{name} at step {step}"
    weights = load_file(str(run / "export" / "hyperdas.safetensors"))
    reference_weights = load_file(str(reference / "export" / "hyperdas.safetensors"))
    assert sorted(weights) == sorted(reference_weights)
    for name, value in reference_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_zero3_two_processes_match_single_process(zero3_run, plain_run):
    _assert_same_training(zero3_run, plain_run)


def test_ddp_matches_single_process(workdir, plain_run):
    # (ZeRO-2 runs end to end in test_deepspeed_launch.py)
    ds = _ds_json(workdir, "ddp.json")
    run = _run_worker(workdir / "ddp", "--engine", "deepspeed", "--ds", str(ds), *_common(workdir), processes=2)
    _assert_same_training(run, plain_run)


def test_zero3_checkpointing_gives_the_same_gradients(workdir):
    ds = _ds_json(workdir, "zero3.json")
    grad_args = ["--target", str(workdir / "target"), "--global-batch", "8", "--grads"]
    zero3 = torch.load(_run_worker(workdir / "grads_zero3", "--engine", "deepspeed", "--ds", str(ds), *grad_args,
                                   "--micro-batch", "4", processes=2) / "grads.pt")
    plain = torch.load(_run_worker(workdir / "grads_plain", "--engine", "plain", *grad_args, "--micro-batch", "8",
                                   processes=1) / "grads.pt")
    assert sorted(zero3["on"]) == sorted(plain["off"]) and len(plain["off"]) > 10
    for name, reference in plain["off"].items():
        assert reference.abs().max() > 0, f"{name} gets no gradient"
        torch.testing.assert_close(zero3["off"][name], reference, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(zero3["on"][name], zero3["off"][name], rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(plain["on"][name], reference, rtol=1e-5, atol=1e-8, msg=name)


def test_exported_editor_loads_in_one_process_with_the_same_outputs(workdir, zero3_run):
    from hyperdas.model import HyperDAS
    from hyperdas.targets import load_target

    sys.path.insert(0, str(WORKER.parent))
    from ds_worker import LOSS_WEIGHTS, SyntheticPairs

    target = load_target(str(workdir / "target"))
    model = HyperDAS.from_pretrained(zero3_run / "export", target).eval()
    data = SyntheticPairs(6, target.config.vocab_size, seed=2)
    batch = {k: torch.stack([item[k] for item in data.items]) for k in data.items[0]}
    with torch.no_grad():
        output = model(batch, loss_weights=LOSS_WEIGHTS)
    distributed = torch.load(zero3_run / "eval.pt")
    torch.testing.assert_close(output.logits, distributed["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.selection, distributed["selection"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss, distributed["loss"], rtol=1e-5, atol=1e-6)
    accuracy = (output.logits.argmax(-1) == batch["label_ids"]).float().mean()
    distributed_accuracy = (distributed["logits"].argmax(-1) == batch["label_ids"]).float().mean()
    assert accuracy == distributed_accuracy
