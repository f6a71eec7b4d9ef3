"""DeepSpeed behind the trainer's engine interface: ZeRO-0/2/3 (optionally offloaded), one process per device.

`DeepSpeedEngine` implements `hyperdas.train.engine.TrainingEngine` over ``deepspeed.initialize``, so
`hyperdas train` and `train/launch.py` drive the same training loop; `DeepSpeedSetup` joins the process group
(hyperdas.train.distributed), resolves the DeepSpeed JSON (hyperdas.train.ds_config), checks that the model
fits (hyperdas.train.memory_fit) and builds it (hyperdas.train.zero3_build).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from hyperdas.data.batch import PairBatch
from hyperdas.model import WEIGHTS_FILE, BatchEvaluation, HyperDAS, HyperDASOutput, LossWeights
from hyperdas.targets import run_device
from hyperdas.train.config import RunConfig
from hyperdas.train.distributed import init_distributed
from hyperdas.train.ds_config import read_ds_config, resolve_ds_config, zero_stage
from hyperdas.train.engine import to_device
from hyperdas.train.memory_fit import check_model_fits, count_parameters
from hyperdas.train.optimizer import make_optimizer, set_lr_scale
from hyperdas.train.zero3_build import build_model

#: the tag (sub-folder) DeepSpeed writes its sharded checkpoint under, inside the trainer's step folder.
CHECKPOINT_TAG = "deepspeed"
#: the key the trainer's client state is stored under in DeepSpeed's checkpoint (which adds keys of its own).
CLIENT_STATE_KEY = "hyperdas_client_state"


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
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        optimizer = make_optimizer(model, run.optim, cpu_adam=offload == "cpu")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model: HyperDAS = self.engine.module
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device(self.engine.device)
        self.micro_batch_size = int(ds_config["train_micro_batch_size_per_gpu"])
        self.grad_accum_steps = int(ds_config["gradient_accumulation_steps"])

    def forward(
        self, batch: PairBatch, mode: str = "soft", loss_weights: LossWeights | None = None, states=None
    ) -> HyperDASOutput:
        return self.engine(to_device(batch, self.device), mode=mode, loss_weights=loss_weights, states=states)

    def evaluate_batch(self, batch: PairBatch, modes: list[str], ceiling: bool = True) -> BatchEvaluation:
        # no backward follows, so the module is called directly; ZeRO-3's hooks gather each submodule's weights
        return self.model.evaluate_batch(to_device(batch, self.device), modes, ceiling=ceiling)

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
        set_lr_scale(self.optimizer, scale)

    def save(self, folder: Path, client_state: dict) -> None:
        """DeepSpeed's sharded checkpoint (each process writes its shard) without the frozen target."""
        self.engine.save_checkpoint(
            str(folder),
            tag=CHECKPOINT_TAG,
            client_state={CLIENT_STATE_KEY: client_state},
            save_latest=False,
            exclude_frozen_parameters=True,
        )

    def load(self, folder: Path) -> dict:
        path, client_state = self.engine.load_checkpoint(
            str(folder),
            tag=CHECKPOINT_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
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
        self.device_type = run_device().type

    def build(self, config: RunConfig) -> DeepSpeedEngine:
        ds = resolve_ds_config(self.raw_ds_config, config, self.world_size, self.device_type)
        if self.device_type == "cuda":
            device_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            target_bytes = 2 if config.uses_bf16(self.device_type) else 4
            check_model_fits(count_parameters(config.model), ds, self.world_size, device_bytes, target_bytes)
        model, keep_alive = build_model(config, ds, self.device_type)
        return DeepSpeedEngine(model, config, ds, keep_alive)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()
