"""The training schedule (train/schedule.py) against values worked out by hand from METHOD.md's rules."""

from __future__ import annotations

import pytest

from hyperdas.train.config import LossConfig, OptimConfig
from hyperdas.train.schedule import TrainingSchedule


def test_lr_warms_up_linearly_over_its_fraction_of_the_steps():
    schedule = TrainingSchedule(10, OptimConfig(warmup_fraction=0.4), LossConfig())
    assert [schedule.at(i).lr_scale for i in range(10)] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)


def test_no_warm_up_when_it_rounds_below_one_step():
    schedule = TrainingSchedule(3, OptimConfig(warmup_fraction=0.2), LossConfig())  # 0.6 steps
    assert [schedule.at(i).lr_scale for i in range(3)] == [1.0, 1.0, 1.0]


def test_progress_runs_from_zero_on_the_first_step_to_one_on_the_last():
    schedule = TrainingSchedule(5, OptimConfig(), LossConfig())
    assert [schedule.at(i).progress for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert TrainingSchedule(1, OptimConfig(), LossConfig()).at(0).progress == 0.0


def test_loss_weights_carry_the_kind_weights_and_the_sparsity_ramp():
    loss = LossConfig(causal_loss_weight=2.0, iso_loss_weight=0.25, sparsity_warmup_fraction=0.25)
    schedule = TrainingSchedule(8, OptimConfig(), loss)
    weights = [schedule.at(i).loss_weights for i in range(8)]
    assert all((w.causal, w.isolate) == (2.0, 0.25) for w in weights)
    # i/n = 0, .125 off; then 0.15 + 1.35·(i/8 − 1/4)/(3/4)
    expected = [0.0, 0.0] + [0.15 + 1.35 * (i / 8 - 0.25) / 0.75 for i in range(2, 8)]
    assert [w.sparsity for w in weights] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step", [-1, 5])
def test_a_step_outside_the_schedule_is_refused(step):
    with pytest.raises(ValueError, match=f"step {step} is outside the schedule's 0..4"):
        TrainingSchedule(5, OptimConfig(), LossConfig()).at(step)


def test_an_empty_schedule_is_refused():
    with pytest.raises(ValueError, match="total_steps=0"):
        TrainingSchedule(0, OptimConfig(), LossConfig())
