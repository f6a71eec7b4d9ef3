"""train/launch.py end to end: the shared trainer under torchrun and the deepspeed launcher, against `hyperdas train`.

A tiny random Llama cannot pass the data filter, so the run's dataset is written into a scratch cache unfiltered
(the trainer then loads it as a built dataset). Global batches of 8 in micro-batches of 4: one per process on two,
two accumulated on one, which is bitwise the same sum (see tests/train/test_deepspeed_zero.py for why the runs
are set up to do the same arithmetic). ZeRO-2 on 2 processes equals `hyperdas train` exactly; ZeRO-3 on 2
processes (torchrun) equals ZeRO-3 on 1 exactly, and `hyperdas train` on its first step exactly and within a bound
after (DeepSpeed's ZeRO-3 hooks reorder autograd's sums); every run's metrics are the same, and the export gives
the distributed run's metrics under `hyperdas eval` in one process. A ZeRO-3 run cut off after its step-2
checkpoint and resumed continues with the uninterrupted run's losses and ends with its weights, exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hyperdas.testing import torchrun_command
from hyperdas.train.distributed import SHM_COMM_OP
from hyperdas.train.launch import free_local_port

pytest.importorskip("deepspeed")

REPO = Path(__file__).parents[2]
LAUNCH = REPO / "train" / "launch.py"
#: the deepspeed launcher of this interpreter's environment
DEEPSPEED = [sys.executable, str(Path(sys.executable).with_name("deepspeed"))]
TIMEOUT_S = 300
STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_target) -> dict:
    """Tiny target folder, run config, unfiltered cached dataset, ZeRO-3 JSON with every parameter partitioned."""
    from datasets import Dataset, DatasetDict, Features, Value

    from hyperdas.data.build import dataset_folder
    from hyperdas.data.examples import FIELDS, pair_samplers
    from hyperdas.train.config import load_run_config

    root = tmp_path_factory.mktemp("launch")
    tiny_target.model.save_pretrained(root / "target")
    tiny_target.tokenizer.save_pretrained(root / "target")
    run = {
        "model": {
            "target": str(root / "target"),
            "intervention_layer": 1,
            "das_dimension": 8,
            "chop_editor_at_layer": 2,
            "torch_dtype": "float32",
            "use_fused_kernels": False,
        },
        "data": {"domain": "city", "attributes": ["Country"], "max_examples": 40, "sources": ["template"]},
        "max_steps": STEPS,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "eval_batch_size": 4,
        "eval_max_examples": 8,
        "eval_modes": ["soft", "column_argmax"],
        "precision": "fp32",
        "save_every": 2,
        "heatmap_examples": 0,
        # the launchers must agree exactly: the state cache batches prompts by process, which changes fp32 rounding
        "state_cache": "off",
    }
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(run))
    cache = root / "cache"
    # an empty torch extensions folder: no launch may build (or wait for) a DeepSpeed op there
    env = dict(
        os.environ,
        HYPERDAS_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        TORCH_EXTENSIONS_DIR=str(root / "torch_extensions"),
    )
    request = load_run_config(config_path).data_request()
    features = Features({name: Value("string") for name in FIELDS})
    splits = {}
    for split, size in (("train", 32), ("test", 8)):
        samplers = pair_samplers(
            request.domain,
            request.requested_attributes(),
            split,
            None,
            request.seed,
            request.isolate_attributes,
            request.sources,
        )
        rows = [row for sampler in samplers.values() for row in sampler.take(size // len(samplers))]
        splits[split] = Dataset.from_list(rows, features=features)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYPERDAS_CACHE", str(cache))
        DatasetDict(splits).save_to_disk(str(dataset_folder(request)))
    zero3 = json.loads((REPO / "train" / "configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3.json").write_text(json.dumps(zero3))
    return {"root": root, "config": config_path, "env": env}


def _assert_same_metrics(got, expected, where: str = "metrics") -> None:
    """Counts and accuracies exactly; the selection statistics (means of soft weights) to the weights' rtol 1e-5."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            _assert_same_metrics(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, float) and ".selection." in where:
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), where
    else:
        assert got == expected, where


def _run(command: list[str], setup: dict, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, env=setup["env"], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=setup["root"]
    )
    if expect_ok and result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        raise AssertionError(f"{command} failed ({result.returncode}):\n{output}")
    return result


@pytest.fixture(scope="module")
def plain_run(setup) -> Path:
    out = setup["root"] / "plain"
    _run(
        [sys.executable, "-m", "hyperdas.train.cli", "train", "--config", str(setup["config"]), f"out_dir={out}"], setup
    )
    return out


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


U = 2.0**-24  # float32 unit roundoff
ADAM_EPS, LR = 1e-8, 1e-3  # the engines' AdamW eps; the run's largest learning rate (rotation_lr)


def _assert_same_run(run: Path, reference: Path, same_arithmetic: bool = True) -> None:
    """Same steps, losses, gradient norms, weights and metrics.

    Each engine takes the gradient norm its own way (DeepSpeed per partition): N squares summed in two orders
    differ by about √N·u relative; 8·√N·u is allowed. With ``same_arithmetic`` everything else is bitwise equal.
    Without (ZeRO-3 against `hyperdas train`): the first step is (same weights, same forward), and later losses
    differ only through the weights. AdamW amplifies ZeRO-3's rounding differences only on entries whose
    gradient g_i is below its eps, |g_i| ≲ 1e-8, moving them by at most 2·lr a step; elsewhere the weights differ
    by rounding. To first order |ΔL| ≤ Σ_i |g_i Δw_i| ≤ N · 1e-8 · 2·lr · steps (+ the loss's own rounding).
    """
    log, expected = _log(run), _log(reference)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1)) == [r["step"] for r in expected]
    weights = load_file(str(run / "model" / "hyperdas.safetensors"))
    reference_weights = load_file(str(reference / "model" / "hyperdas.safetensors"))
    entries = sum(v.numel() for v in reference_weights.values())
    for record, reference_record in zip(log, expected, strict=True):
        step = record["step"]
        assert record["sparsity_weight"] == reference_record["sparsity_weight"]
        assert record["grad_norm"] == pytest.approx(reference_record["grad_norm"], rel=8 * entries**0.5 * U), step
        for key in ("loss", "ce", "sparsity_penalty"):
            if same_arithmetic or step == 1:
                assert record[key] == reference_record[key], (step, key)
            else:
                bound = entries * ADAM_EPS * 2 * LR * (step - 1) + 16 * U * abs(reference_record[key])
                assert abs(record[key] - reference_record[key]) <= bound, (step, key)
    if same_arithmetic:
        assert sorted(weights) == sorted(reference_weights)
        for name, value in reference_weights.items():
            torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)
    metrics, expected_metrics = (json.loads((folder / "metrics.json").read_text()) for folder in (run, reference))
    if same_arithmetic:
        assert metrics == expected_metrics
    else:
        _assert_same_metrics(metrics, expected_metrics)


def _torchrun(*args: str, processes: int = 2) -> list[str]:
    return torchrun_command(LAUNCH, processes, *args)


@pytest.fixture(scope="module")
def zero3_run(setup) -> Path:
    out = setup["root"] / "zero3"
    _run(
        _torchrun("--config", str(setup["config"]), "--deepspeed", str(setup["root"] / "zero3.json"), f"out_dir={out}"),
        setup,
    )
    return out


@pytest.fixture(scope="module")
def zero3_one_process(setup) -> Path:
    out = setup["root"] / "zero3_one"
    _run(
        _torchrun(
            "--config",
            str(setup["config"]),
            "--deepspeed",
            str(setup["root"] / "zero3.json"),
            f"out_dir={out}",
            processes=1,
        ),
        setup,
    )
    return out


def test_torchrun_zero3_matches_hyperdas_train_and_exports_for_hyperdas_eval(
    setup, plain_run, zero3_run, zero3_one_process
):
    out = zero3_run
    _assert_same_run(out, zero3_one_process)
    _assert_same_run(out, plain_run, same_arithmetic=False)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["step_000002", "step_000003"]
    assert {p.name for p in (out / "checkpoints" / "step_000002" / "deepspeed").iterdir()} >= {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    evaluated = setup["root"] / "eval"
    _run(
        [
            sys.executable,
            "-m",
            "hyperdas.train.cli",
            "eval",
            "--checkpoint",
            str(out),
            "--modes",
            "soft,column_argmax",
            "--max-examples",
            "8",
            "--batch-size",
            "4",
            "--out",
            str(evaluated),
        ],
        setup,
    )
    _assert_same_metrics(
        json.loads((evaluated / "metrics.json").read_text()), json.loads((out / "metrics.json").read_text())
    )
    assert not [p for p in (setup["root"] / "torch_extensions").rglob("*") if p.is_file()]  # no op was built


def test_deepspeed_launcher_runs_zero2(setup, plain_run):
    # (with --hostfile the launcher reaches every host, localhost included, over passwordless ssh: not in CI)
    out = setup["root"] / "zero2"
    _run(
        [
            *DEEPSPEED,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_local_port()),
            str(LAUNCH),
            "--config",
            str(setup["config"]),
            "--deepspeed",
            str(REPO / "train" / "configs" / "zero2.json"),
            f"out_dir={out}",
        ],
        setup,
    )
    _assert_same_run(out, plain_run)  # ZeRO-2 adds no hooks to the model: the same arithmetic as one process


def test_missing_hostfile_stops_with_a_clear_message(setup):
    missing = setup["root"] / "no_hostfile"
    result = _run(
        [
            *DEEPSPEED,
            "--hostfile",
            str(missing),
            "--num_gpus",
            "1",
            "--master_port",
            str(free_local_port()),
            str(LAUNCH),
            "--hostfile",
            str(missing),
            "--config",
            str(setup["config"]),
            "--deepspeed",
            str(setup["root"] / "zero3.json"),
            f"out_dir={setup['root'] / 'never'}",
        ],
        setup,
        expect_ok=False,
    )
    assert result.returncode != 0
    assert f"hostfile {missing} not found" in result.stdout + result.stderr
    assert not (setup["root"] / "never").exists()


def test_zero3_run_killed_after_step_2_resumes_to_the_same_losses(setup, zero3_run):
    """A run killed after its step-2 checkpoint: the folder as it was then, continued with resume=DIR."""
    killed = setup["root"] / "killed"
    shutil.copytree(
        zero3_run, killed, ignore=shutil.ignore_patterns("model", "metrics.json", "report.md", "step_000003")
    )
    (killed / "checkpoints" / "latest").write_text("step_000002\n")
    _run(_torchrun(f"resume={killed}"), setup)  # the DeepSpeed JSON comes from the run folder's config
    resumed, uninterrupted = _log(killed), _log(zero3_run)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for record, expected in zip(resumed, uninterrupted, strict=True):  # the same run, continued: bitwise
        for key in ("loss", "ce", "sparsity_penalty", "grad_norm"):
            assert record[key] == expected[key], (record["step"], key)
    weights = load_file(str(killed / "model" / "hyperdas.safetensors"))
    for name, value in load_file(str(zero3_run / "model" / "hyperdas.safetensors")).items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)


LEAVE_SCRIPT = """
import json
import torch.distributed as dist
from deepspeed.utils import groups
from hyperdas.train.distributed import init_distributed, leave_distributed

init_distributed()
groups._clone_world_group()  # what ZeRO does for its data-parallel group
before = groups._WORLD_GROUP is not None
leave_distributed()
print(json.dumps({"clone_before": before, "clone_after": groups._WORLD_GROUP is not None,
                  "initialized_after": dist.is_initialized()}))
"""


def test_leaving_drops_deepspeeds_group_references(setup):
    """torch's destroy alone keeps DeepSpeed's clone of the world group alive into interpreter teardown, where gloo
    can abort a finished process (exit -6); `leave_distributed` must destroy the groups and drop that clone."""
    env = dict(
        setup["env"],
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_local_port()),
    )
    result = subprocess.run(
        [sys.executable, "-c", LEAVE_SCRIPT], env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state == {"clone_before": True, "clone_after": False, "initialized_after": False}


JOIN_SCRIPT = """
from hyperdas.train.distributed import init_distributed, leave_distributed

init_distributed()
leave_distributed()
print("joined")
"""


def test_joining_builds_no_deepspeed_op_and_ignores_a_stale_build_lock(setup, tmp_path):
    """DeepSpeed's torch backend JIT-built its shm op into TORCH_EXTENSIONS_DIR under a file lock; a build cut off
    left the lock behind and every later launch waited on it forever. Joining now builds nothing and waits for
    nothing: a planted stale lock is ignored and the folder keeps only what was planted."""
    extensions = tmp_path / "torch_extensions"
    build_dir = extensions / f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_cpu" / SHM_COMM_OP
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    planted = sorted(extensions.rglob("*"))
    env = dict(
        setup["env"],
        TORCH_EXTENSIONS_DIR=str(extensions),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_local_port()),
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", JOIN_SCRIPT], env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"joining hung (waiting on the stale lock in {build_dir}?)") from err
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "joined"
    assert sorted(extensions.rglob("*")) == planted
