"""Learning-rate schedules over a federated run (``train.lr_schedule``, ``train.warmup_steps``,
``train.min_lr_ratio``).

Every client restarts its optimizer each round, so the schedule cannot live in an optimizer or a scheduler object:
it is a pure function of where the step is in the run. Local step k (0-based) of round r (1-based) is run step

    s = (r - 1) · local_steps + k,        of T = rounds · local_steps steps in all,

the same count for every client (a client that sat out earlier rounds joins at the run's position, as a schedule of
the federation, not of its own participation). The learning rate of step s is ``train.lr × lr_factor(train, s)``:

    s < W (warm-up):   (s + 1) / W                      (lr / W at the first step, lr at step W - 1)
    then, with p = (s - W) / (T - W) in [0, 1) and m = min_lr_ratio:
        constant       1
        linear         m + (1 - m) · (1 - p)
        cosine         m + (1 - m) · (1 + cos(π p)) / 2

so decay starts at lr right after the warm-up and ends just above m · lr at the last step (m · lr would be reached
at step T, after the run). Because the factor depends only on (round, k) and the config, a resumed run, which
restarts at a round, gets the same learning rates as an uninterrupted one; nothing of the schedule is checkpointed.
"""

from __future__ import annotations

import math

from fedlora.config_train import TrainConfig


def run_step(train: TrainConfig, round_: int, k: int) -> int:
    """The 0-based run step of local step ``k`` (0-based) in round ``round_`` (1-based)."""
    return (round_ - 1) * train.local_steps + k


def lr_factor(train: TrainConfig, step: int) -> float:
    """The multiplier of ``train.lr`` at run step ``step`` (0-based; see the module docstring)."""
    warmup, total = train.warmup_steps, train.rounds * train.local_steps
    if step < warmup:
        return (step + 1) / warmup
    if train.lr_schedule == "constant":
        return 1.0
    p = min((step - warmup) / max(total - warmup, 1), 1.0)
    m = train.min_lr_ratio
    if train.lr_schedule == "linear":
        return m + (1.0 - m) * (1.0 - p)
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))


def is_constant(train: TrainConfig) -> bool:
    """Whether every step runs at ``train.lr`` (no warm-up, constant schedule): then nothing touches the optimizer."""
    return train.warmup_steps == 0 and train.lr_schedule == "constant"
