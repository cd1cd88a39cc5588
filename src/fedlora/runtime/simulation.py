"""The embedded runtime: every client in one process, on one model.

One base model is loaded; each client is a :class:`~fedlora.client.ClientNode` holding only its adapter
tensors, swapped into the model's adapter parameters when it trains or is evaluated. 100 clients therefore
cost 100 small adapters, not 100 models. Base-weight updates (FedEx, FLoRA) are applied once, to the one
shared base, when the server produces them: every client is synced before it is used, so the shared base is
the base each of them would hold.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from fedlora.adapters import State
from fedlora.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from fedlora.client import ClientNode
from fedlora.faults import FaultyTransport
from fedlora.config import Config
from fedlora.experiment import Experiment, build
from fedlora.methods import Broadcast, Upload
from fedlora.runtime.client_store import ClientStore
from fedlora.runtime.driver import apply_base_update, injected_from, make_server
from fedlora.report import RunDir
from fedlora.runtime.loop import run_rounds, summarize
from fedlora.runtime.observers import standard


class EmbeddedTransport:
    """Reaches clients by direct calls.

    Without a ``store`` every client's :class:`~fedlora.client.ClientNode` (its state) stays in memory. With one
    (``train.client_states``), a node exists only while its client trains or is evaluated: it is built at its
    initial state or read from the store, and written back (when it changed) before the next client is touched,
    stamped with ``epoch`` (the last checkpointed round + 1; fedlora.runtime.client_store)."""

    def __init__(self, exp: Experiment, store: ClientStore | None = None) -> None:
        self.exp = exp
        self.store = store
        self.nodes = [exp.client_node(d) for d in exp.clients] if store is None else []
        self.epoch = 0
        self.touched: set[str] = set()

    def node(self, client: int) -> ClientNode:
        """Client ``client``'s node: the one in memory, or (with a store) one rebuilt from its stored state."""
        if self.store is None:
            return self.nodes[client]
        node = self.exp.client_node(self.exp.clients[client])
        if client in self.store:
            node.state, node.version = self.store.read(client)
        return node

    def _release(self, client: int, node: ClientNode, changed: bool) -> None:
        if self.store is not None and changed:
            self.store.write(client, node.state, node.version, self.epoch)

    def fit(self, client: int, broadcasts: Sequence[Broadcast], round_: int) -> Upload:
        node = self.node(client)
        try:
            node.receive(broadcasts)
            upload, _ = node.fit(round_)
        finally:  # a failed client keeps what it received, as in memory
            self._release(client, node, True)
        return upload

    def evaluate(self, client: int, broadcasts: Sequence[Broadcast]) -> dict[str, float]:
        node = self.node(client)
        version = node.version
        try:
            node.receive(broadcasts)
            return node.evaluate()
        finally:
            self._release(client, node, node.version != version)

    def states(self) -> Mapping[int, tuple[State, str]]:
        """Every client's (state, PEFT adapter name), read one at a time when the store holds them."""
        return _States(self)

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
                base: Mapping[str, torch.Tensor], stamps: Mapping[int, int]) -> None:
        """Put back client states and changed base weights from a checkpoint (with a store, the states are its
        files, at the epochs the checkpoint names: ``stamps``)."""
        if self.store is not None:
            self.store.restore(stamps)
            for cid, state in clients.items():  # a checkpoint that holds the states itself (memory, older runs):
                self.store.write(cid, state, versions[cid], 0)  # epoch 0 is at or before any checkpoint
            clients = {}
        for cid, state in clients.items():
            self.nodes[cid].state = dict(state)
            self.nodes[cid].version = versions[cid]
        params = dict(self.exp.model.named_parameters())
        with torch.no_grad():
            for name, value in base.items():
                params[name].copy_(value)
        self.touched.update(base)


class _States(Mapping[int, tuple[State, str]]):
    """The clients' final states for saving, each read from the store only when asked for."""

    def __init__(self, transport: EmbeddedTransport) -> None:
        self.transport = transport

    def __getitem__(self, client: int) -> tuple[State, str]:
        node = self.transport.node(client)
        return node.state, node.adapter

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.transport.exp.clients)))

    def __len__(self) -> int:
        return len(self.transport.exp.clients)


def run(config: Config, out: RunDir | None = None, progress: bool = True, exp: Experiment | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Run an experiment in this process; returns the summary.

    With ``out``, the run directory is written as the run goes: metrics after every round, then a checkpoint
    (atomically). With ``resume``, the run continues after the last checkpointed round of ``out``.
    """
    start = time.perf_counter()
    exp = exp or build(config)
    server = make_server(exp)
    t = exp.config.train
    scratch = None  # client states on disk without a run directory: a temporary folder, removed at the end
    store = None
    if exp.config.states_on_disk:
        if out is None:
            scratch = tempfile.TemporaryDirectory(prefix="fedlora-clients-")
        store = ClientStore(Path(scratch.name) if scratch else out.path / "checkpoint" / "clients",  # type: ignore[union-attr]
                            durable=scratch is None)
    embedded = EmbeddedTransport(exp, store)
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
                    embedded.restore(ckpt.clients, ckpt.client_versions, ckpt.base, ckpt.client_stamps)
                    records, first_round, elapsed_before = list(ckpt.records), ckpt.round + 1, ckpt.elapsed
                    embedded.epoch = ckpt.round + 1
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
                            on_event=observers.event, client_stamps=store.stamps if store is not None else None)
            embedded.epoch = record["round"] + 1  # what is written from now on is newer than this checkpoint

        try:
            run_rounds(server, transport, exp.config, exp.split.global_test, on_record=on_record,
                       start_round=first_round, evaluate_initial=not records, on_event=observers.event)
        finally:
            observers.close()
        summary = summarize(records, elapsed_before + time.perf_counter() - start)
        if isinstance(transport, FaultyTransport):
            summary["faults_injected"] = injected_from(records, transport)
        if out is not None:
            out.save_adapters(exp, embedded.states(),
                              server.global_state if exp.method.global_model else None)
            out.finish(exp, summary)
    finally:
        if out is not None:
            out.close()
        if scratch is not None:
            scratch.cleanup()
    return summary
