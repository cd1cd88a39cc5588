"""The embedded runtime: every client in one process, on one model.

One base model is loaded; each client is a :class:`~fedlora.client.ClientNode` holding only its adapter
tensors, swapped into the model's adapter parameters when it trains or is evaluated. 100 clients therefore
cost 100 small adapters, not 100 models. Base-weight updates (FedEx, FLoRA) are applied once, to the one
shared base, when the server produces them: every client is synced before it is used, so the shared base is
the base each of them would hold.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fedlora.adapters import State
from fedlora.client import ClientNode
from fedlora.config import Config
from fedlora.experiment import Experiment, build
from fedlora.methods import Broadcast, Upload
from fedlora.report import RunDir
from fedlora.runtime.loop import run_rounds, summarize
from fedlora.server import Server


def apply_base_update(model: torch.nn.Module, update: Mapping[str, torch.Tensor]) -> None:
    """Add each delta to the base parameter of the same name (in that parameter's own orientation)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in update.items():
            params[name].add_(delta.to(params[name].device, params[name].dtype))


class EmbeddedTransport:
    """Reaches clients by direct calls."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.nodes = [ClientNode(d, exp.method, exp.trainer, exp.init_state, exp.fingerprint) for d in exp.clients]

    def fit(self, client: int, broadcasts: Sequence[Broadcast], round_: int) -> Upload:
        node = self.nodes[client]
        node.receive(broadcasts)
        upload, _ = node.fit(round_)
        return upload

    def evaluate(self, client: int, broadcasts: Sequence[Broadcast]) -> dict[str, float]:
        node = self.nodes[client]
        node.receive(broadcasts)
        return node.evaluate()

    def evaluate_global(self, state: State) -> dict[str, float]:
        return self.exp.trainer.evaluate(state, self.exp.split.global_test)

    def on_broadcast(self, broadcast: Broadcast) -> None:
        if broadcast.base_update:
            apply_base_update(self.exp.model, broadcast.base_update)


def make_server(exp: Experiment) -> Server:
    t = exp.config.train
    return Server(exp.method, exp.init_state, len(exp.clients), exp.config.clients_per_round, t.min_clients,
                  t.seed, exp.fingerprint)


def run(config: Config, out: RunDir | None = None, progress: bool = True,
        exp: Experiment | None = None) -> dict[str, Any]:
    """Run an experiment in this process; write the run directory if ``out`` is given. Returns the summary."""
    start = time.perf_counter()
    exp = exp or build(config)
    server = make_server(exp)
    transport = EmbeddedTransport(exp)
    if out is not None:
        out.start(exp)
    records = run_rounds(server, transport, exp.config, exp.split.global_test,
                         on_record=out.append_metrics if out is not None else (lambda r: None), progress=progress)
    summary = summarize(records, time.perf_counter() - start)
    if out is not None:
        out.save_adapters(exp, {i: n.state for i, n in enumerate(transport.nodes)},
                          server.global_state if exp.method.global_model else None)
        out.finish(exp, summary)
    return summary
