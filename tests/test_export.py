"""What a run leaves behind is the model it evaluated (issue 14): honest bytes, saved = evaluated, export and
re-evaluation. Tiny-bert, 2 rounds; expected byte counts are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedlora.experiment import build
from fedlora.runtime.loop import run_round
from fedlora.runtime.simulation import make_server
from test_methods import Recorder

# tiny-bert: hidden 32, 2 layers, LoRA rank 4 on query and value (4 modules), float32, 2 labels.
A_SIDE = B_SIDE = 4 * (4 * 32) * 4  # 4 modules × 128 floats × 4 bytes
HEAD = (2 * 32 + 2) * 4


def rounds(*overrides: str, n: int = 2):  # type: ignore[no-untyped-def]
    exp = build(tiny_config(*overrides))
    server = make_server(exp)
    transport = Recorder(exp)
    records = [run_round(server, transport, exp.config, r, exp.split.global_test, evaluate=True)
               for r in range(1, n + 1)]
    return exp, server, transport, records


# ------------------------------------------------------------------------------------------- honest bytes
def test_fedex_residual_is_sent_at_its_true_rank() -> None:
    exp, server, _, records = rounds("method.name=fedex")
    # 3 clients, r = 4: the residual has (N−1)·r = 8 columns, 8 × (32 + 32) = 512 floats per module, cheaper
    # than the dense 32 × 32 = 1024 (the stacked (N+1)·r = 16 columns would have cost 1024, i.e. dense).
    residual = 4 * 512 * 4
    per_client = A_SIDE + B_SIDE + HEAD + residual
    for record in records:
        assert record["bytes_down"] == 3 * per_client
        assert record["bytes_eval_sync"] == 0  # every client took part
    latest = server.history[-1]
    assert latest.base_update and all(v.shape in ((32, 8), (8, 32)) for v in latest.base_update.values())


def test_evaluation_only_syncs_are_counted_apart() -> None:
    exp, _, _, records = rounds("method.name=fedit", "train.clients_per_round=1")
    broadcast = A_SIDE + B_SIDE + HEAD
    for record in records:
        assert len(record["participants"]) == 1
        # the round's broadcast reaches its participant (protocol) and the 2 others only to be evaluated;
        # each participant was brought up to date by the previous evaluation, so nothing is pending at fit
        assert record["bytes_down"] == broadcast
        assert record["bytes_eval_sync"] == 2 * broadcast
