"""Training engines: what the trainer drives, one call per micro-batch, whatever runs underneath.

`PlainEngine` is single-process PyTorch (AdamW on fp32 masters, bf16 autocast on CUDA). The DeepSpeed
engine (train/deepspeed_engine.py) implements the same interface over ``deepspeed.initialize``, so
`hyperdas train` and `train/launch.py` share one training loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from hyperdas.data.batch import PairBatch
from hyperdas.model import BatchEvaluation, HyperDAS, HyperDASOutput, LossWeights
from hyperdas.targets import run_device
from hyperdas.train.config import RunConfig
from hyperdas.train.optimizer import make_optimizer, set_lr_scale

ENGINE_STATE_FILE = "engine_state.pt"


class TrainingEngine(Protocol):
    """The interface the trainer drives."""

    rank: int
    world_size: int
    is_main: bool
    device: torch.device
    grad_accum_steps: int
    micro_batch_size: int
    model: HyperDAS

    def forward(
        self, batch: PairBatch, mode: str = "soft", loss_weights: LossWeights | None = None, states=None
    ) -> HyperDASOutput:
        """Run the (possibly wrapped) model on one micro-batch (``states``: its cached target states, or None)."""

    def evaluate_batch(self, batch: PairBatch, modes: list[str], ceiling: bool = True) -> BatchEvaluation:
        """``HyperDAS.evaluate_batch`` on one batch: every mode plus the floor and the ceiling, no gradients."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of one micro-batch's loss (scaled for accumulation by the engine)."""

    def step(self) -> float | None:
        """At an accumulation boundary: clip, optimizer step, lr schedule, zero grad; the grad norm there."""

    def set_lr_scale(self, scale: float) -> None:
        """Multiply every group's base learning rate by ``scale`` (warm-up)."""

    def save(self, folder: Path, client_state: dict) -> None:
        """A resumable checkpoint (model, optimizer, client state)."""

    def load(self, folder: Path) -> dict:
        """Restore a checkpoint written by ``save``; returns its client state."""

    def export_trained(self, folder: Path) -> None:
        """The trained parts in the ``HyperDAS.from_pretrained`` format (main process writes)."""

    def barrier(self) -> None:
        """Wait for every process."""


def micro_batch_plan(global_batch: int, world_size: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro batch, accumulation steps) so that micro x accumulation x processes == the global batch.

    Raises:
        ValueError: the global batch does not divide into the processes and micro batches.
    """
    if global_batch % world_size:
        raise ValueError(
            f"global_batch_size {global_batch} does not divide among {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    per_process = global_batch // world_size
    micro = micro_batch or per_process
    if micro < 1 or per_process % micro:
        raise ValueError(
            f"micro_batch_size {micro} does not divide the {per_process} pairs each of {world_size} process(es) "
            f"gets per step (global_batch_size {global_batch}); allowed: a divisor of {per_process}"
        )
    return micro, per_process // micro


class PlainEngine:
    """Single-process PyTorch: fp32 master weights, AdamW, grad-norm clipping, gradient accumulation."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, model: HyperDAS, config: RunConfig, device: torch.device | None = None):
        self.device = device or run_device()
        self.model = model.to(self.device)
        self.config = config
        self.micro_batch_size, self.grad_accum_steps = micro_batch_plan(
            config.global_batch_size, 1, config.micro_batch_size
        )
        self.optimizer = make_optimizer(model, config.optim)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # the model enters the one autocast (HyperDAS.precision_context); the run's precision picks its dtype
        model.compute_dtype = torch.bfloat16 if config.uses_bf16(self.device.type) else None
        self._micro_steps = 0

    def forward(
        self, batch: PairBatch, mode: str = "soft", loss_weights: LossWeights | None = None, states=None
    ) -> HyperDASOutput:
        return self.model(to_device(batch, self.device), mode=mode, loss_weights=loss_weights, states=states)

    def evaluate_batch(self, batch: PairBatch, modes: list[str], ceiling: bool = True) -> BatchEvaluation:
        return self.model.evaluate_batch(to_device(batch, self.device), modes, ceiling=ceiling)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps).backward()
        self._micro_steps += 1

    def step(self) -> float | None:
        if self._micro_steps % self.grad_accum_steps:
            return None
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def set_lr_scale(self, scale: float) -> None:
        set_lr_scale(self.optimizer, scale)

    def save(self, folder: Path, client_state: dict) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": self.model.trained_state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "client_state": client_state,
            },
            folder / ENGINE_STATE_FILE,
        )

    def load(self, folder: Path) -> dict:
        state = torch.load(Path(folder) / ENGINE_STATE_FILE, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client_state"]

    def export_trained(self, folder: Path) -> None:
        self.model.save_pretrained(folder)

    def barrier(self) -> None:
        return None


def to_device(batch: PairBatch | Mapping[str, object], device: torch.device) -> PairBatch:
    """Move the tensors of a collated batch (or a dict of its fields) to ``device``; the string lists pass through."""
    return PairBatch.from_mapping(batch).to(device, non_blocking=True)
