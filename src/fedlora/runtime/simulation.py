"""The embedded runtime: every client in one process, on one model.

One base model is loaded; each client is a :class:`~fedlora.client.ClientNode` holding only its adapter
tensors, swapped into the model's adapter parameters when it trains or is evaluated. 100 clients therefore
cost 100 small adapters, not 100 models. Base-weight updates (FedEx, FLoRA) are applied once, to the one
shared base, when the server produces them: every client is synced before it is used, so the shared base is
the base each of them would hold.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch

from fedlora.adapters import State
from fedlora.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from fedlora.faults import FaultyTransport
from fedlora.config import Config
from fedlora.experiment import Experiment, build
from fedlora.methods import Broadcast, Upload
from fedlora.runtime.driver import apply_base_update, injected_from, make_server
from fedlora.report import RunDir
from fedlora.runtime.loop import run_rounds, summarize
from fedlora.runtime.observers import standard


class EmbeddedTransport:
    """Reaches clients by direct calls."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.nodes = [exp.client_node(d) for d in exp.clients]
        self.touched: set[str] = set()

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
            self.touched.update(broadcast.base_update.params())

    def changed_base(self) -> dict[str, torch.Tensor]:
        """Current values of the base weights that broadcasts changed (for checkpoints)."""
        params = dict(self.exp.model.named_parameters())
        return {name: params[name].detach() for name in sorted(self.touched)}

    def restore(self, clients: Mapping[int, Mapping[str, torch.Tensor]], versions: Mapping[int, int],
                base: Mapping[str, torch.Tensor]) -> None:
        """Put back client states and changed base weights from a checkpoint."""
        for cid, state in clients.items():
            self.nodes[cid].state = dict(state)
            self.nodes[cid].version = versions[cid]
        params = dict(self.exp.model.named_parameters())
        with torch.no_grad():
            for name, value in base.items():
                params[name].copy_(value)
        self.touched.update(base)


def run(config: Config, out: RunDir | None = None, progress: bool = True, exp: Experiment | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Run an experiment in this process; returns the summary.

    With ``out``, the run directory is written as the run goes: metrics after every round, then a checkpoint
    (atomically). With ``resume``, the run continues after the last checkpointed round of ``out``.
    """
    start = time.perf_counter()
    exp = exp or build(config)
    server = make_server(exp)
    embedded = EmbeddedTransport(exp)
    t = exp.config.train
    transport: Any = embedded
    if exp.config.faults.active or t.round_timeout > 0:
        transport = FaultyTransport(embedded, exp.config.faults, t.round_timeout)
    records: list[dict[str, Any]] = []
    first_round, elapsed_before = 1, 0.0
    try:
        if out is not None:
            out.start(exp)
            if resume:
                ckpt_dir = out.path / "checkpoint"
                if has_checkpoint(ckpt_dir):
                    ckpt = load_checkpoint(ckpt_dir, server)
                    embedded.restore(ckpt.clients, ckpt.client_versions, ckpt.base)
                    records, first_round, elapsed_before = list(ckpt.records), ckpt.round + 1, ckpt.elapsed
                # No checkpoint yet (stopped before its first record was saved): the run starts again from
                # round 0; either way metrics.jsonl holds exactly the checkpointed records from here on.
                out.rewrite_metrics(records)
        config_dict = exp.config.to_dict()
        observers = standard(progress, t.rounds, first_round - 1, f"{exp.config.method.name}/{exp.config.adapter.kind}")
        if out is not None:
            out.on_event = observers.event

        def on_record(record: dict[str, Any]) -> None:
            records.append(record)
            observers.record(record)
            if out is None:
                return
            out.append_metrics(record)
            observers.event("metrics", record["round"])
            save_checkpoint(out.path / "checkpoint", record["round"], server,
                            {i: n.state for i, n in enumerate(embedded.nodes)},
                            {i: n.version for i, n in enumerate(embedded.nodes)}, embedded.changed_base(), records,
                            elapsed_before + time.perf_counter() - start, config=config_dict,
                            on_event=observers.event)

        try:
            run_rounds(server, transport, exp.config, exp.split.global_test, on_record=on_record,
                       start_round=first_round, evaluate_initial=not records, on_event=observers.event)
        finally:
            observers.close()
        summary = summarize(records, elapsed_before + time.perf_counter() - start)
        if isinstance(transport, FaultyTransport):
            summary["faults_injected"] = injected_from(records, transport)
        if out is not None:
            out.save_adapters(exp, {i: (n.state, n.adapter) for i, n in enumerate(embedded.nodes)},
                              server.global_state if exp.method.global_model else None)
            out.finish(exp, summary)
    finally:
        if out is not None:
            out.close()
    return summary
