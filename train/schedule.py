"""The one training schedule: at optimizer step i of n, the learning-rate scale, the loss weights and the
model's annealing progress, so the three conventions live in one place.

    lr scale        min(1, (i + 1) / (w·n))          for w·n >= 1 warm-up steps, else 1
    sparsity weight 0 while i/n < f, else λ₀ + (λ₁ − λ₀)·min((i/n − f)/(1 − f), 1)
    progress        i / (n − 1)                      so the last step trains at the end of the anneal

The progress drives what the model anneals by its own config (the selection temperature, MaskSelect's τ;
``HyperDAS.set_progress``); it reaches 1 on the last step, so the exported model is the one trained last.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperdas.model import LossWeights
from hyperdas.train.config import LossConfig, OptimConfig


@dataclass(frozen=True)
class StepSchedule:
    """What step i trains with."""

    lr_scale: float
    loss_weights: LossWeights
    progress: float


@dataclass(frozen=True)
class TrainingSchedule:
    """The schedule of a run of ``total_steps`` optimizer steps (``at(step)``, step counted from 0)."""

    total_steps: int
    optim: OptimConfig
    loss: LossConfig

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least one step, got total_steps={self.total_steps}")

    def at(self, step: int) -> StepSchedule:
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the schedule's 0..{self.total_steps - 1}")
        loss = self.loss
        weights = LossWeights(loss.causal_loss_weight, loss.iso_loss_weight, self.sparsity_weight(step))
        return StepSchedule(self.lr_scale(step), weights, step / max(self.total_steps - 1, 1))

    def lr_scale(self, step: int) -> float:
        """Linear warm-up from 1/(w·n) to 1 over the first w·n steps."""
        warmup = self.optim.warmup_fraction * self.total_steps
        return min(1.0, (step + 1) / warmup) if warmup >= 1 else 1.0

    def sparsity_weight(self, step: int) -> float:
        return sparsity_weight_at(self.loss, step / self.total_steps)


def sparsity_weight_at(loss: LossConfig, fraction: float) -> float:
    """The sparsity weight at training progress ``fraction`` in [0, 1]: off for the warm-up, then a ramp."""
    if fraction < loss.sparsity_warmup_fraction:
        return 0.0
    span = max(1.0 - loss.sparsity_warmup_fraction, 1e-12)
    t = min((fraction - loss.sparsity_warmup_fraction) / span, 1.0)
    return loss.sparsity_weight_start + t * (loss.sparsity_weight_end - loss.sparsity_weight_start)
