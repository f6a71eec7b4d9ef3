"""Will a HyperDAS model's states fit a device under a DeepSpeed config? Exact parameter counts (meta device)
and the bytes per device of weights, gradients and optimizer state by ZeRO stage; bench/memory_model.py adds
the activations."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from hyperdas.config import HyperDASConfig
from hyperdas.model import HyperDAS
from hyperdas.targets import FrozenTarget
from hyperdas.train.ds_config import DeepSpeedConfigError, zero_stage


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a HyperDAS model.

    Attributes:
        target: the frozen target's parameters.
        editor: the trained parameters (editor, selection head, subspace module).
        largest_module: the most parameters one module owns directly (what ZeRO-3 gathers at once).
    """

    target: int
    editor: int
    largest_module: int


def count_parameters(model_config: HyperDASConfig, target_config=None) -> ParameterCounts:
    """Exact counts from the model built on the meta device: no memory used, no weight read.

    Args:
        model_config: the HyperDAS config (its target's config is read unless ``target_config`` is given).
        target_config: a transformers config of the target, e.g. for a model that is not downloaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if target_config is None:
        from hyperdas.targets import EMBEDDED_DEFAULT, ensure_embedded_default

        name = model_config.target
        target_config = AutoConfig.from_pretrained(str(ensure_embedded_default()) if name == EMBEDDED_DEFAULT else name)
    with torch.device("meta"):
        target = FrozenTarget(AutoModelForCausalLM.from_config(target_config), None, model_config.target)
        model = HyperDAS(copy.deepcopy(model_config), target)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParameterCounts(
        target=sum(p.numel() for p in target.parameters()),
        editor=sum(p.numel() for _, p in model.trainable_named_parameters()),
        largest_module=largest,
    )


def model_state_bytes(
    counts: ParameterCounts, ds_config: dict, world_size: int, target_bytes_per_param: int | None = None
) -> dict[str, int]:
    """Bytes per device of the model states under a resolved DeepSpeed config (activations not included).

    With w = 2 (bf16) or 4 (fp32) bytes, N processes, E trained and T frozen parameters:
    weights (T + E)·w, divided by N under ZeRO-3 (0 when parameters are offloaded); gradients E·w, divided
    by N from stage 2, plus the fp32 gradient partition E·4/N' of bf16 training; optimizer E·(8 + 4)/N' for
    Adam's two moments and the fp32 master copy (no master copy in fp32 stage 0), N' = N from stage 1,
    0 when the optimizer is offloaded; ZeRO-3 also holds the largest module gathered twice (in use and
    prefetched). The frozen target's weights take ``target_bytes_per_param`` bytes each (default w: a bf16
    target under stage 0, whose trained parts stay fp32, takes 2).
    """
    stage = zero_stage(ds_config)
    zero = ds_config.get("zero_optimization", {})
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    w = 2 if bf16 else 4
    offload_param = zero.get("offload_param", {}).get("device", "none") != "none"
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    n_params = world_size if stage == 3 else 1
    n_grads = world_size if stage >= 2 else 1
    n_opt = world_size if stage >= 1 else 1
    master = 4 if (bf16 or stage >= 1) else 0
    fp32_grads = 0 if offload_optimizer or not bf16 else counts.editor * 4 // n_opt
    return {
        "target_weights": 0 if offload_param else counts.target * (target_bytes_per_param or w) // n_params,
        "editor_weights": 0 if offload_param else counts.editor * w // n_params,
        "gradients": counts.editor * w // n_grads + fp32_grads,
        "optimizer": 0 if offload_optimizer else counts.editor * (8 + master) // n_opt,
        "gathered": 2 * counts.largest_module * w if stage == 3 else 0,
    }


def check_model_fits(
    counts: ParameterCounts, ds_config: dict, world_size: int, device_bytes: int, target_bytes_per_param: int
) -> None:
    """Refuse, before loading anything, a model whose states alone exceed a device under this ZeRO stage.

    Raises:
        DeepSpeedConfigError: naming the stage, the predicted and available memory, and what would fit.
    """
    states = model_state_bytes(counts, ds_config, world_size, target_bytes_per_param)
    needed = sum(states.values())
    if needed <= device_bytes:
        return
    gib = 2**30
    parts = ", ".join(f"{name} {value / gib:.1f}" for name, value in states.items())
    raise DeepSpeedConfigError(
        f"the model does not fit: ZeRO stage {zero_stage(ds_config)} on {world_size} process(es) needs "
        f"{needed / gib:.1f} GiB per device for the model states alone ({parts} GiB; target "
        f"{counts.target / 1e9:.2f}B and trained {counts.editor / 1e9:.2f}B parameters) but a device has "
        f"{device_bytes / gib:.1f} GiB. Use train/configs/zero3.json (shards target and editor), more devices, "
        "or train/configs/zero3_offload.json (parameters and optimizer state in CPU memory); "
        "bench/memory_model.py predicts each choice, activations included."
    )
