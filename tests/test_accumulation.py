"""Memory in local training (issue 26, part 2): gradient accumulation (train.micro_batch_size) gives the full batch's
update, for classification and for a generation loss averaged over response tokens; activation checkpointing
(train.gradient_checkpointing) recomputes each layer and gives the same update; the combinations DP-SGD refuses."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from fedlora.client import batch_indices, enable_checkpointing, round_seed
from fedlora.errors import ConfigError
from fedlora.experiment import build

from conftest import tiny_config

# One plain SGD step at lr 1 without clipping: the state's change is minus the batch's gradient.
ONE_SGD_STEP = ("train.optimizer=sgd", "train.max_grad_norm=0", "train.local_steps=1", "train.lr=1.0")
GEN = ("model.name=tiny-llama", "data.dataset=math-word", "data.max_examples=60", "train.max_length=128")


def no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def delta(exp, micro: int, *extra: str) -> dict[str, torch.Tensor]:
    """The change of client 0's state after one step with train.micro_batch_size = ``micro``."""
    exp.trainer.cfg = replace(exp.trainer.cfg, micro_batch_size=micro)
    new = exp.trainer.train(exp.init_state, exp.clients[0], 1).state
    return {k: new[k] - exp.init_state[k] for k in new}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    moved = [k for k in a if float(a[k].abs().max()) > 0]
    assert moved  # something trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("micro", [1, 3])  # 8 examples in 8 passes, and in uneven passes of 3, 3, 2
def test_accumulated_classification_step_equals_the_full_batch(micro: int) -> None:
    exp = build(tiny_config(*ONE_SGD_STEP, "train.batch_size=8"))
    no_dropout(exp.model)
    assert_close(delta(exp, micro), delta(exp, 0))


def test_accumulated_generation_step_weighs_passes_by_response_tokens() -> None:
    exp = build(tiny_config(*GEN, *ONE_SGD_STEP, "train.batch_size=6"))
    no_dropout(exp.model)
    full, accumulated = delta(exp, 0), delta(exp, 3)  # two passes of 3 examples
    assert_close(accumulated, full)
    # The rule a per-example mean would suggest (each pass weighted by its examples, 1/2 : 1/2 here) is not the
    # full batch's gradient when the passes hold different numbers of response tokens: show the test tells them apart.
    cfg, client = exp.trainer.cfg, exp.clients[0]
    (idx,) = batch_indices(client.train, 1, 6, round_seed(cfg.seed, 1, client.client_id))
    passes = [exp.task.batch(idx[i:i + 3], exp.device) for i in (0, 3)]
    assert exp.task.loss_terms(passes[0]) != exp.task.loss_terms(passes[1])
    trainer = exp.trainer
    trainer.load(exp.init_state)
    params = list(trainer.slots.values())
    for p in params:
        p.requires_grad_(True)
    trainer.model.train()
    for batch in passes:
        (trainer.task.loss(trainer.model, batch) / 2).backward()
    naive = {k: -p.grad for k, p in trainer.slots.items() if p.grad is not None}
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    trainer.model.eval()
    assert naive and any(not torch.allclose(naive[k], full[k], rtol=1e-3, atol=1e-6) for k in naive)


def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_update() -> None:
    cfg = tiny_config("train.optimizer=sgd", "train.local_steps=2", "adapter.dropout=0.1")  # dropout on: replayed
    exp = build(cfg)
    # transformers checkpoints a layer's forward, so a hook on a module inside the layer sees the recomputation
    inside = exp.model.get_base_model().bert.encoder.layer[0].intermediate
    calls: list[int] = []
    inside.register_forward_hook(lambda *_: calls.append(1))
    plain = delta(exp, 0)
    plain_calls, calls[:] = len(calls), []
    enable_checkpointing(exp.model)
    checkpointed = delta(exp, 0)
    assert plain_calls == 2 and len(calls) == 4  # two steps; each layer's forward runs again in the backward pass
    assert_close(checkpointed, plain)


def test_gradient_checkpointing_key_enables_it_on_the_model() -> None:
    def checkpointed(model: nn.Module) -> list[bool]:
        return [m.gradient_checkpointing for m in model.get_base_model().bert.encoder.layer]

    assert checkpointed(build(tiny_config("train.gradient_checkpointing=true")).model) == [True, True]
    assert checkpointed(build(tiny_config()).model) == [False, False]


@pytest.mark.parametrize("overrides, match", [
    (("train.micro_batch_size=9", "train.batch_size=8"),
     r"train.micro_batch_size = 9 exceeds train.batch_size = 8; use a value from 1 to 8, or 0"),
    (("privacy.dp_sgd=true", "train.micro_batch_size=4"),
     r"privacy.dp_sgd = true with train.micro_batch_size = 4 is not supported"),
    (("privacy.dp_sgd=true", "train.gradient_checkpointing=true"),
     r"privacy.dp_sgd = true with train.gradient_checkpointing = true is not supported"),
])
def test_refused_combinations_name_the_keys(overrides: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_config(*overrides)


def test_micro_batch_loss_is_the_full_batch_loss() -> None:
    exp = build(tiny_config(*ONE_SGD_STEP, "train.batch_size=8"))
    no_dropout(exp.model)
    losses = []
    for micro in (0, 3):
        exp.trainer.cfg = replace(exp.trainer.cfg, micro_batch_size=micro)
        losses.append(exp.trainer.train(exp.init_state, exp.clients[0], 1).loss)
    assert np.isclose(losses[0], losses[1], rtol=1e-6, atol=0)
