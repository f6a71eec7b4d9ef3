"""DeepSpeed behind the trainer's engine interface: ZeRO-0/2/3 (optionally offloaded), one process per device.

`DeepSpeedEngine` implements `hyperdas.train.engine.TrainingEngine` over ``deepspeed.initialize``, so
`hyperdas train` and `train/launch.py` drive the same training loop. Under ZeRO-3 the frozen target is
created already partitioned (transformers' ``HfDeepSpeedConfig`` is alive while ``from_pretrained`` runs, so
it builds the model inside ``deepspeed.zero.Init``): no process ever holds all of the target's weights at once
(one module is gathered at a time while loading). The editor is built from a gathered, plain copy of the
target's first L layers and partitioned by ``deepspeed.initialize``.

The DeepSpeed JSON owns how the work is split (ZeRO stage, offload, communication); the run config owns what
is trained (global batch, micro batch, precision, clipping, optimizer, learning rates). `resolve_ds_config`
fills the JSON's ``"auto"`` values from the run config and refuses any value that contradicts it.
"""

from __future__ import annotations

import copy
import gc
import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hyperdas.config import HyperDASConfig
from hyperdas.model import WEIGHTS_FILE, BatchEvaluation, HyperDAS, HyperDASOutput, LossWeights
from hyperdas.targets import FrozenTarget, load_target
from hyperdas.train.config import RunConfig
from hyperdas.train.engine import micro_batch_plan, to_device

#: the tag (sub-folder) DeepSpeed writes its sharded checkpoint under, inside the trainer's step folder.
CHECKPOINT_TAG = "deepspeed"
#: the key the trainer's client state is stored under in DeepSpeed's checkpoint (which adds keys of its own).
CLIENT_STATE_KEY = "hyperdas_client_state"
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


def use_bf16(precision: str, device_type: str) -> bool:
    """Whether the run config's precision means bf16 weights (with fp32 masters) on this device type."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def _fill(ds: dict, key: str, wanted, what: str) -> None:
    """Set ``ds[key]`` to ``wanted`` when absent or "auto"; refuse a different explicit value."""
    given = ds.get(key, "auto")
    if given == "auto":
        ds[key] = wanted
    elif given != wanted:
        raise DeepSpeedConfigError(f"DeepSpeed config sets {key}={given!r} but {what} gives {wanted!r}; "
                                   f'set it to "auto" (or to {wanted!r}) in the JSON, or change the run config')


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
    _fill(ds, "gradient_accumulation_steps", accumulation,
          f"global_batch_size {run.global_batch_size} / ({micro} per micro batch x {world_size} processes)")
    _fill(ds, "gradient_clipping", run.optim.grad_clip, "the run config's optim.grad_clip")

    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"zero_optimization.stage {stage!r}; allowed: 0, 1, 2, 3")
    # bf16 runs keep fp32 masters. From stage 1 on, DeepSpeed's bf16 mode does that (bf16 working weights, fp32
    # masters in its optimizer). At stage 0 it would wrap AdamW in its fp16 optimizer instead, so plain data
    # parallelism keeps fp32 trained weights and runs the forward under bf16 autocast, as hyperdas train does.
    bf16 = use_bf16(run.precision, device_type)
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


# --- building the model -----------------------------------------------------------------------------


def enable_zero3_construction(ds_config: dict) -> object:
    """From now on, transformers builds every model ZeRO-3 partitioned, for as long as the returned handle lives.

    ``from_pretrained`` (``load_target``) and ``from_config`` (``build_random_target``) then create the model
    inside ``deepspeed.zero.Init`` and initialise or load each module gathered, so no process holds the whole
    model. transformers only keeps a weak reference to the handle (an ``HfDeepSpeedConfig``): the caller must
    keep it, and should count parameters on the meta device before calling this.
    """
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _plain_copy(module: nn.Module) -> nn.Module:
    """A copy of a (gathered) ZeRO-3 module whose parameters are ordinary tensors with no DeepSpeed state.

    ``copy.deepcopy`` would copy each partitioned parameter's DeepSpeed attributes (its id, its shard) too;
    pre-seeding the memo with fresh parameters makes deepcopy use those instead.
    """
    memo = {id(p): nn.Parameter(p.data.clone(), requires_grad=False) for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _set_dotted(root: nn.Module, dotted: str, module: nn.Module) -> None:
    *parents, leaf = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def editor_source(target: FrozenTarget, num_layers: int, with_embeddings: bool) -> FrozenTarget:
    """A stand-in target holding plain copies of what the editor is built from (gathered from ZeRO-3).

    It has the target's config and the target's first ``num_layers`` decoder layers, final norm and rotary
    embedding (and embedding table when the editor trains its own copy), nothing else: ~L/n_layers of the
    target, gathered on every process once while the model is built.
    """
    import deepspeed

    parts = [target.final_norm] + list(target.layers[:num_layers])
    if with_embeddings:
        parts.append(target.embed_tokens)
    params = [p for part in parts for p in part.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        shell = nn.Module()
        layers = nn.ModuleList(_plain_copy(layer) for layer in target.layers[:num_layers])
        _set_dotted(shell, target.arch.layers, layers)
        _set_dotted(shell, target.arch.final_norm, _plain_copy(target.final_norm))
        _set_dotted(shell, target.arch.rotary_emb, copy.deepcopy(target.rotary_emb))
        if with_embeddings:
            _set_dotted(shell, target.arch.embed_tokens, _plain_copy(target.embed_tokens))
    shell.config = target.config
    return FrozenTarget(shell, target.tokenizer, target.name, target.arch)


def build_model(
    run: RunConfig, ds_config: dict, device_type: str, make_target: Callable[..., FrozenTarget] = load_target
) -> tuple[HyperDAS, object | None]:
    """The HyperDAS model for a resolved DeepSpeed config; under ZeRO-3 the target is loaded partitioned.

    Args:
        make_target: ``make_target(name, dtype=...)`` gives the frozen target (default `load_target`; a builder
            of random weights from a config serves speed and memory work at sizes not downloaded).

    Returns:
        (model, keep-alive handle): under ZeRO-3 the handle is transformers' ``HfDeepSpeedConfig``, which
        must outlive the model; None otherwise.
    """
    model_config: HyperDASConfig = run.model
    dtype = torch.bfloat16 if use_bf16(run.precision, device_type) else getattr(torch, model_config.torch_dtype)
    handle = None
    if zero_stage(ds_config) < 3:
        torch.manual_seed(run.seed)
        target = make_target(model_config.target, dtype=dtype)
        model = HyperDAS(model_config, target)
    else:
        handle = enable_zero3_construction(ds_config)
        target = make_target(model_config.target, dtype=dtype)
        source = editor_source(target, model_config.chop_editor_at_layer, not model_config.freeze_editor_embeddings)
        torch.manual_seed(run.seed)
        model = HyperDAS(model_config, source)
        model.target = target  # the partitioned target replaces the stand-in, whose copies are now the editor's
    if ds_config.get("bf16", {}).get("enabled", False):
        # bf16 working weights; DeepSpeed's optimizer keeps the fp32 masters (ZeRO-3 would otherwise partition
        # the fp32 parts as they are and keep a second fp32 copy)
        for name, part in model.named_children():
            if name != "target":
                part.to(torch.bfloat16)
    return model, handle


# --- will the model fit? ----------------------------------------------------------------------------


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


# --- the engine ------------------------------------------------------------------------------------


def _make_optimizer(groups: list[dict], ds_config: dict) -> torch.optim.Optimizer:
    """AdamW over the trainable groups; DeepSpeed's CPU Adam when the optimizer state is offloaded to CPU."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


class DeepSpeedEngine:
    """`TrainingEngine` over ``deepspeed.initialize``: every process runs every forward on its own shard.

    Args:
        model: the HyperDAS model (from `build_model`).
        run: the run config (optimizer, learning rates, batch sizes, precision).
        ds_config: the resolved DeepSpeed config (from `resolve_ds_config`).
        keep_alive: what `build_model` returned beside the model (kept for the engine's lifetime).
    """

    def __init__(self, model: HyperDAS, run: RunConfig, ds_config: dict, keep_alive: object | None = None):
        import deepspeed
        import torch.distributed as dist

        self._keep_alive = keep_alive
        self.config = run
        self.ds_config = ds_config
        self.stage = zero_stage(ds_config)
        opt = run.optim
        groups = model.param_groups(opt.editor_lr, opt.rotation_lr, opt.mask_lr, opt.weight_decay)
        for group in groups:
            group["base_lr"] = group["lr"]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=_make_optimizer(groups, ds_config), config=ds_config
        )
        self.model: HyperDAS = self.engine.module
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device(self.engine.device)
        self.micro_batch_size = int(ds_config["train_micro_batch_size_per_gpu"])
        self.grad_accum_steps = int(ds_config["gradient_accumulation_steps"])

    def forward(
        self, batch: dict, mode: str = "soft", loss_weights: LossWeights | None = None, states=None
    ) -> HyperDASOutput:
        return self.engine(to_device(batch, self.device), mode=mode, loss_weights=loss_weights, states=states)

    def evaluate_batch(self, batch: dict, modes: list[str]) -> BatchEvaluation:
        # no backward follows, so the module is called directly; ZeRO-3's hooks gather each submodule's weights
        return self.model.evaluate_batch(to_device(batch, self.device), modes)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself

    def step(self) -> float | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self.engine.optimizer is self.engine.basic_optimizer:
            # stage 0 without a DeepSpeed optimizer wrapper: DeepSpeed clips but does not report the norm;
            # the gradients are all-reduced by now, so this is the global norm before clipping
            grads = [p.grad for _, p in self.model.trainable_named_parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads))
        self.engine.step()
        if not boundary:
            return None
        return norm if norm is not None else float(self.engine.get_global_grad_norm())

    def set_lr_scale(self, scale: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def save(self, folder: Path, client_state: dict) -> None:
        """DeepSpeed's sharded checkpoint (each process writes its shard) without the frozen target."""
        self.engine.save_checkpoint(
            str(folder), tag=CHECKPOINT_TAG, client_state={CLIENT_STATE_KEY: client_state}, save_latest=False,
            exclude_frozen_parameters=True,
        )

    def load(self, folder: Path) -> dict:
        path, client_state = self.engine.load_checkpoint(
            str(folder), tag=CHECKPOINT_TAG, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None or CLIENT_STATE_KEY not in client_state:
            raise FileNotFoundError(f"no hyperdas DeepSpeed checkpoint under {Path(folder) / CHECKPOINT_TAG}")
        return client_state[CLIENT_STATE_KEY]

    def _fp32_masters(self) -> dict[str, torch.Tensor]:
        """name -> the optimizer's full fp32 master of every trained parameter (every process must call this:
        under ZeRO the masters are gathered from the shards)."""
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.utils import safe_get_full_fp32_param

        unfused = {}  # DeepSpeed's DDP-bf16 optimizer keeps its fp32 copies in groups parallel to the params'
        if isinstance(self.optimizer, FP16_UnfusedOptimizer):
            for low, high in zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups, strict=True):
                unfused.update({id(p): master for p, master in zip(low, high, strict=True)})
        masters = {}
        for name, param in self.model.trainable_named_parameters():
            master = safe_get_full_fp32_param(param)
            if master is None:
                master = unfused.get(id(param), param)
            masters[name] = master.detach().float().cpu().clone()
        return masters

    def export_trained(self, folder: Path) -> None:
        """The trained parts in the ``from_pretrained`` format, with the fp32 master values (main process writes).

        Under ZeRO-3 the trained parts are gathered from every shard first, so every process must call this.
        """
        import deepspeed
        from safetensors import safe_open
        from safetensors.torch import save_file

        masters = self._fp32_masters()
        params = [p for name, p in self.model.named_parameters() if not name.startswith("target.")]
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.stage == 3 else nullcontext()
        with gather:
            if self.is_main:
                self.model.save_pretrained(folder)
        if self.is_main:
            # the working weights may be bf16: write the fp32 masters in their place, same names and metadata
            path = Path(folder) / WEIGHTS_FILE
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata()
                state = {name: handle.get_tensor(name) for name in handle.keys()}
            state.update(masters)
            save_file(state, str(path), metadata=metadata)
        self.barrier()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


#: DeepSpeed's shared-memory all-reduce op, which its torch backend JIT-compiles on the first join.
SHM_COMM_OP = "deepspeed_shm_comm"


def init_distributed() -> None:
    """Join the process group set up by the launcher (nccl on CUDA, gloo on CPU), once per process.

    DeepSpeed's torch backend would first JIT-compile its ``deepspeed_shm_comm`` op into the torch extensions
    folder (about 60 s on a fresh machine, every rank at once, under a file lock that an interrupted build
    leaves behind, after which every later launch waits on it forever, silently). The op only serves
    ``inference_all_reduce`` (DeepSpeed-Inference's tensor parallelism), which training never calls, so it is
    marked incompatible before joining and DeepSpeed skips it: no launch builds or waits for anything.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # DeepSpeed keeps this dict: the edit persists
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)


def leave_distributed() -> None:
    """Leave the process group cleanly, once per process, after the last collective (no-op if never joined).

    Every process first meets the others at a barrier, then DeepSpeed's own destroy both destroys every
    torch process group and drops DeepSpeed's module-level references to them (its clone of the world group
    above all). ``torch.distributed.destroy_process_group`` alone leaves that clone alive until interpreter
    teardown, where gloo can abort the finished process ("terminate called without an active exception",
    exit -6) and the launcher then kills its peers. Drop your own references to the engine before calling, and
    do not call it after an error on this process: its peers may be inside a collective it will never join.
    """
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()  # engine objects in reference cycles may still hold process groups
    ds_comm.destroy_process_group()


class DeepSpeedSetup:
    """The trainer's `EngineSetup` for DeepSpeed: joins the process group, then builds a `DeepSpeedEngine`.

    Args:
        ds_config_path: the DeepSpeed JSON (its "auto" values are filled from the run config).
    """

    def __init__(self, ds_config_path: str | Path):
        import torch.distributed as dist

        self.ds_config_path = Path(ds_config_path)
        self.raw_ds_config = read_ds_config(self.ds_config_path)
        init_distributed()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"

    def build(self, config: RunConfig) -> DeepSpeedEngine:
        ds = resolve_ds_config(self.raw_ds_config, config, self.world_size, self.device_type)
        if self.device_type == "cuda":
            device_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            target_bytes = 2 if use_bf16(config.precision, self.device_type) else 4
            check_model_fits(count_parameters(config.model), ds, self.world_size, device_bytes, target_bytes)
        model, keep_alive = build_model(config, ds, self.device_type)
        return DeepSpeedEngine(model, config, ds, keep_alive)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()
