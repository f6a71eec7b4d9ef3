"""The one optimizer of every engine: AdamW over the model's parameter groups, and its learning-rate scale.

Both engines (train/engine.py, train/deepspeed_engine.py) build it here, so the groups, betas, epsilon and the
warm-up's scaling are the same whatever runs the step. The trainer owns the schedule and calls
``set_lr_scale`` with its value each step.
"""

from __future__ import annotations

import torch

from hyperdas.model import HyperDAS
from hyperdas.train.config import OptimConfig

BETAS = (0.9, 0.999)
EPS = 1e-8


def make_optimizer(model: HyperDAS, optim: OptimConfig, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``model.param_groups`` at the run's learning rates; each group remembers its ``base_lr``.

    cpu_adam: DeepSpeed's CPU Adam (AdamW mode), for an optimizer state offloaded to CPU memory.
    """
    groups = model.param_groups(optim.editor_lr, optim.rotation_lr, optim.mask_lr, optim.weight_decay)
    for group in groups:
        group["base_lr"] = group["lr"]
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=BETAS, eps=EPS, adamw_mode=True)
    return torch.optim.AdamW(groups, betas=BETAS, eps=EPS)


def set_lr_scale(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """lr = base_lr · scale in every group (the warm-up's factor; 1 after it)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale
