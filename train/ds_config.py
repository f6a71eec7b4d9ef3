"""The DeepSpeed JSON of a run: read it, and fill its "auto" values from the run config, refusing contradictions.

The DeepSpeed JSON owns how the work is split (ZeRO stage, offload, communication); the run config owns what
is trained (global batch, micro batch, precision, clipping, optimizer, learning rates).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from hyperdas.train.config import RunConfig
from hyperdas.train.engine import micro_batch_plan

#: keys of a DeepSpeed JSON that the run config owns; the JSON may leave them out or set them to "auto".
_RUN_OWNED_SECTIONS = ("optimizer", "scheduler", "fp16")


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed JSON contradicts the run config or lacks what its ZeRO stage needs."""


def read_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON config, with a clear message for a missing file or broken JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"DeepSpeed config {path} not found; the shipped ones are train/configs/zero3.json, zero2.json, "
            "ddp.json and zero3_offload.json"
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config {path} must be a JSON object, got {type(values).__name__}")
    return values


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no zero_optimization section)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _fill(ds: dict, key: str, wanted, what: str) -> None:
    """Set ``ds[key]`` to ``wanted`` when absent or "auto"; refuse a different explicit value."""
    given = ds.get(key, "auto")
    if given == "auto":
        ds[key] = wanted
    elif given != wanted:
        raise DeepSpeedConfigError(
            f"DeepSpeed config sets {key}={given!r} but {what} gives {wanted!r}; "
            f'set it to "auto" (or to {wanted!r}) in the JSON, or change the run config'
        )


def resolve_ds_config(ds_config: dict, run: RunConfig, world_size: int, device_type: str) -> dict:
    """A complete DeepSpeed config for this run: "auto" values filled, contradictions refused.

    Batch: ``train_batch_size`` = global_batch_size = micro x accumulation x processes, whatever the number
    of processes. A micro batch may come from the run config or, when the run config leaves it out, from the
    JSON's ``train_micro_batch_size_per_gpu``.

    Args:
        ds_config: the DeepSpeed JSON as read (not modified).
        run: the run config.
        world_size: number of processes.
        device_type: "cuda" or "cpu" (``precision: auto`` means bf16 on CUDA only).

    Raises:
        DeepSpeedConfigError: batch sizes that do not divide or contradict the run config; optimizer,
            scheduler or fp16 sections (the run config owns them); an unknown ZeRO stage; offload asked for a
            stage that cannot offload it; bf16 that contradicts the run's precision.
    """
    ds = copy.deepcopy(ds_config)
    owned = [key for key in _RUN_OWNED_SECTIONS if key in ds]
    if owned:
        raise DeepSpeedConfigError(
            f"DeepSpeed config has section(s) {owned}: the optimizer, learning rates and schedule come from the "
            "run config's optim section, and precision from its precision field (bf16 or fp32; fp16 is not "
            "supported). Remove them from the JSON."
        )
    json_micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    micro_wanted = run.micro_batch_size or (None if json_micro == "auto" else int(json_micro))
    try:
        micro, accumulation = micro_batch_plan(run.global_batch_size, world_size, micro_wanted)
    except ValueError as err:
        raise DeepSpeedConfigError(str(err)) from err
    _fill(ds, "train_batch_size", run.global_batch_size, "the run config's global_batch_size")
    _fill(ds, "train_micro_batch_size_per_gpu", micro, f"the run config (micro_batch_size, {world_size} processes)")
    _fill(
        ds,
        "gradient_accumulation_steps",
        accumulation,
        f"global_batch_size {run.global_batch_size} / ({micro} per micro batch x {world_size} processes)",
    )
    _fill(ds, "gradient_clipping", run.optim.grad_clip, "the run config's optim.grad_clip")

    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"zero_optimization.stage {stage!r}; allowed: 0, 1, 2, 3")
    # bf16 runs keep fp32 masters. From stage 1 on, DeepSpeed's bf16 mode does that (bf16 working weights, fp32
    # masters in its optimizer). At stage 0 it would wrap AdamW in its fp16 optimizer instead, so plain data
    # parallelism keeps fp32 trained weights and runs the forward under bf16 autocast, as hyperdas train does.
    bf16 = run.uses_bf16(device_type)
    ds_bf16 = bf16 and stage > 0
    section = ds.setdefault("bf16", {})
    enabled = section.get("enabled", "auto")
    if enabled == "auto":
        section["enabled"] = ds_bf16
    elif bool(enabled) != ds_bf16:
        raise DeepSpeedConfigError(
            f"DeepSpeed config sets bf16.enabled={enabled} but the run config's precision {run.precision!r} at ZeRO "
            f"stage {stage} on {device_type} needs bf16.enabled={ds_bf16} (stage 0 trains bf16 with fp32 weights "
            'under autocast); set it to "auto"'
        )
    if "offload_param" in zero and stage != 3:
        raise DeepSpeedConfigError(
            f"zero_optimization.offload_param needs stage 3 (parameters are only partitioned there), got stage {stage}"
        )
    if "offload_optimizer" in zero and stage == 0:
        raise DeepSpeedConfigError("zero_optimization.offload_optimizer needs stage 1, 2 or 3, got stage 0")
    for name in ("offload_param", "offload_optimizer"):
        device = zero.get(name, {}).get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise DeepSpeedConfigError(f"zero_optimization.{name}.device {device!r}; allowed: none, cpu, nvme")
        if device == "nvme" and not zero[name].get("nvme_path"):
            raise DeepSpeedConfigError(f"zero_optimization.{name} offloads to nvme but sets no nvme_path")
    ds.setdefault("steps_per_print", 10**9)
    return ds
