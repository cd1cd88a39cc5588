"""Conformance: every registered method × every adapter kind it fits passes the same checks, with no
method-specific code here. A new method or adapter kind gets all of them by registering.

For each combination, on the tiny experiment:

1. every upload holds exactly the keys of the round's plan (nothing private leaves), and ``bytes_up`` /
   ``bytes_down`` + ``bytes_eval_sync`` equal numel × element size of what was sent;
2. the same config and seed give the same metrics;
3. a run stopped after round 1's record (before its checkpoint) and resumed ends as the uninterrupted run,
   metrics row for row and adapters bit for bit;
4. the saved adapters (and base weights, where the method changes them) reload to the models that were
   evaluated: ``fedlora evaluate``'s recomputation equals the last recorded accuracy of every client and of the
   global model;
5. the Flower ServerApp and ClientApp, driven in this process, give the embedded runtime's results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupted_and_resumed, tiny_config
from fedlora import registry
from fedlora.protocol import Broadcast, Upload, nbytes
from fedlora.report import RunDir
from fedlora.runtime import simulation
from fedlora.runtime.driver import make_server
from fedlora.runtime.loop import run_rounds

SMALL = ("data.num_clients=2", "data.max_examples=160", "train.local_steps=1", "train.rounds=2", "adapter.dropout=0.1")


def combinations() -> list[tuple[str, str]]:
    return [(m, a) for m, cls in registry.METHODS.items() for a, kind in registry.ADAPTERS.items()
            if not registry.unmet([("method.name", cls), ("adapter.kind", kind)])]


class Spy:
    """Wraps the embedded transport and keeps every message that crosses it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.uploads: list[tuple[int, Upload]] = []
        self.sent: list[Broadcast] = []

    def fit(self, client: int, broadcasts: Sequence[Broadcast], round_: int) -> Upload:
        self.sent.extend(broadcasts)
        upload = self.inner.fit(client, broadcasts, round_)
        self.uploads.append((round_, upload))
        return upload

    def evaluate(self, client: int, broadcasts: Sequence[Broadcast]) -> dict[str, float]:
        self.sent.extend(broadcasts)
        return self.inner.evaluate(client, broadcasts)

    def evaluate_global(self, state: Any) -> dict[str, float]:
        return self.inner.evaluate_global(state)

    def on_broadcast(self, broadcast: Broadcast) -> None:
        self.inner.on_broadcast(broadcast)


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def records_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapters_of(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The saved models: every adapter, and the base weights saved beside it where the method changes them."""
    return {str(p.relative_to(run)): load_file(str(p)) for p in sorted(run.glob("**/*.safetensors"))
            if p.name in ("adapter_model.safetensors", "base_weights.safetensors") and "checkpoint" not in p.parts}


def assert_same_run(a: Path, b: Path) -> None:
    assert without_time(records_of(a)) == without_time(records_of(b))
    ta, tb = adapters_of(a), adapters_of(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert ta[name].keys() == tb[name].keys()
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), (name, key)


@pytest.mark.parametrize("method,adapter", combinations(), ids=lambda x: x)
def test_every_method_and_adapter_conforms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                           adapter: str) -> None:
    check_conformance(tiny_config(*SMALL, f"method.name={method}", f"adapter.kind={adapter}"), tmp_path, monkeypatch)


def check_conformance(cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The five checks of this module's docstring for one config (also run in bf16 by tests/test_bf16.py)."""
    from fedlora.experiment import build
    from fedlora.export import evaluate

    # 1. uploads follow the plan; bytes are what was sent
    exp = build(cfg)
    server = make_server(exp)
    spy = Spy(simulation.EmbeddedTransport(exp))
    spied: list[dict] = []
    run_rounds(server, spy, exp.config, exp.split.global_test, on_record=spied.append)
    private = set(exp.info.keys) - {k for r in range(1, cfg.train.rounds + 1) for k in exp.method.plan(r).upload}
    for round_, upload in spy.uploads:
        assert set(upload.payload) == set(exp.method.plan(round_).upload), round_
        assert not set(upload.payload) & private
        assert upload.nbytes == sum(t.numel() * t.element_size() for t in upload.payload.values())
    assert sum(r["bytes_up"] for r in spied) == sum(u.nbytes for _, u in spy.uploads)
    assert sum(r["bytes_down"] + r["bytes_eval_sync"] for r in spied) == \
        sum(nbytes(b.payload) + b.base_update.nbytes for b in spy.sent)

    # 2. same seed, same metrics (a second, independent build through the run directory)
    full = tmp_path / "full"
    simulation.run(cfg, RunDir(full), progress=False)
    assert without_time(records_of(full)) == without_time(spied)

    # 3. stopped after round 1's record, before its checkpoint; resumed: the uninterrupted run
    assert_same_run(full, interrupted_and_resumed(cfg, tmp_path / "cut", monkeypatch, "metrics:1"))

    # 4. what was saved is what was evaluated
    for client in [*range(cfg.data.num_clients), *([None] if exp.method.global_model else [])]:
        result = evaluate(full, client)
        assert result["reproduced"], (client, result["metrics"], result["recorded"])

    # 5. the Flower apps, in this process, give the embedded results
    from test_flower import loopback_run

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    loopback_run(cfg, tmp_path / "flower")
    assert_same_run(full, tmp_path / "flower")
