"""Learning-rate schedules over the federated run (issue 26, part 3): the factor at each run step worked out by
hand, the learning rate the optimizer steps with, and a killed-and-resumed run equal to the uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora import config
from fedlora.errors import ConfigError
from fedlora.experiment import build
from fedlora.report import RunDir
from fedlora.runtime import simulation
from fedlora.schedule import lr_factor, run_step

from conftest import RESUMABLE, assert_same_run, interrupted_and_resumed, tiny_config


def train_of(*overrides: str) -> config.TrainConfig:
    return tiny_config("train.rounds=2", "train.local_steps=5", *overrides).train  # T = 10 run steps


@pytest.mark.parametrize("schedule, steps, expected", [
    # warm-up over 2 steps: lr/2, lr; then the schedule with p = (s - 2) / 8 and m = 0.2
    ("constant", [0, 1, 2, 9], [0.5, 1.0, 1.0, 1.0]),
    ("linear", [0, 1, 2, 6, 9], [0.5, 1.0, 1.0, 0.2 + 0.8 * 0.5, 0.2 + 0.8 * (1 / 8)]),
    ("cosine", [1, 2, 4, 6, 9], [1.0, 1.0, 0.2 + 0.4 * (1 + math.cos(math.pi / 4)), 0.6,
                                 0.2 + 0.4 * (1 + math.cos(math.pi * 7 / 8))]),
])
def test_factor_at_each_run_step(schedule: str, steps: list[int], expected: list[float]) -> None:
    train = train_of(f"train.lr_schedule={schedule}", "train.warmup_steps=2", "train.min_lr_ratio=0.2")
    assert [lr_factor(train, s) for s in steps] == pytest.approx(expected, abs=1e-15)


def test_run_step_counts_rounds_times_local_steps() -> None:
    train = train_of()
    assert [run_step(train, 1, 0), run_step(train, 1, 4), run_step(train, 2, 0), run_step(train, 2, 4)] == [0, 4, 5, 9]


def test_optimizer_steps_with_the_scheduled_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    exp = build(tiny_config("train.optimizer=sgd", "train.lr=0.1", "train.rounds=2", "train.local_steps=2",
                            "train.lr_schedule=linear"))
    seen: list[float] = []
    step = torch.optim.SGD.step

    def record(self: torch.optim.SGD, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    for round_ in (1, 2):
        exp.trainer.train(exp.init_state, exp.clients[0], round_)
    # T = 4, no warm-up: factors 1, 3/4, 1/2, 1/4 over rounds 1 and 2 (the same for any client in the round)
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025], abs=1e-15)


def test_constant_schedule_leaves_the_optimizer_rate_alone() -> None:
    exp = build(tiny_config("train.optimizer=sgd", "train.lr=0.1"))
    assert exp.trainer._lr(2, 1) is None  # nothing is written: results stay bit-identical to before schedules


def test_killed_and_resumed_scheduled_run_is_the_uninterrupted_one(tmp_path, monkeypatch) -> None:
    cfg = config.load(None, [*RESUMABLE, "train.lr_schedule=cosine", "train.warmup_steps=3", "train.min_lr_ratio=0.1"])
    straight = tmp_path / "straight"
    simulation.run(cfg, RunDir(straight), progress=False)
    assert_same_run(straight, interrupted_and_resumed(cfg, tmp_path / "resumed", monkeypatch, "metrics:2"))


@pytest.mark.parametrize("overrides, match", [
    (("train.warmup_steps=11",), r"train.warmup_steps = 11 exceeds the run's steps per client \(train.rounds × "
                                 r"train.local_steps = 10\); use 0 to 10"),
    (("train.lr_schedule=exponential",), r"train.lr_schedule = 'exponential' is not allowed; choose one of: "
                                         r"constant, linear, cosine"),
    (("train.min_lr_ratio=1.5",), r"train.min_lr_ratio = 1.5 is out of range; it must be <= 1.0"),
])
def test_bad_schedule_settings_are_refused_by_name(overrides: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        train_of(*overrides)
