"""The client side of the Flower app (:mod:`fedlora.runtime.flower_app`): what a ClientApp process builds once
(the experiment, :class:`_Setup`), how a node restores its client's state for a message and keeps it after
(``context.state`` and the node's state folder, :mod:`fedlora.runtime.flower_state`), and where it writes its
adapter. The node config keys are documented in flower_app's docstring; the process that runs these handlers
next to a SuperNode is :mod:`fedlora.runtime.flower_node`."""

from __future__ import annotations

import gc
import os
import signal
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message

from fedlora import config as cfgmod
from fedlora.client import ClientData, ClientNode
from fedlora.config import Config
from fedlora.errors import DataError, FedloraError
from fedlora.experiment import Experiment, build
from fedlora.runtime import flower_codec as codec
from fedlora.runtime.driver import apply_base_update
from fedlora.runtime.flower_state import default_state_dir, load_snapshot, needed_round, save_snapshot

STATE, META, BASE = "fedlora.state", "fedlora.meta", "fedlora.base"  # context.state records (node-local)


def config_from_text(text: str) -> Config:
    """The experiment of a run: the ``fedlora-config`` TOML text (empty: the default demo)."""
    try:
        raw = tomllib.loads(text) if text.strip() else {}
    except tomllib.TOMLDecodeError as e:
        raise FedloraError(f"run config fedlora-config is not valid TOML: {e}") from None
    return cfgmod.from_dict(raw)


@dataclass
class _Setup:
    """What a process builds once and keeps while it lives: the experiment (model, adapter, tokenized data).

    One process may serve several clients (Flower's simulation runtime runs many ClientApps per worker): with
    a partition of the configured dataset they all share this experiment, as clients share the one model of
    the embedded runtime. The base weights follow the client being served: ``owner`` / ``version`` say whose
    base (at which broadcast version) the model holds; any other client's is restored from its context.state.
    """

    key: tuple[Any, ...]
    exp: Experiment
    data: dict[int, ClientData]  # client id → its data (every partition, or the one file of this node)
    owner: tuple[int, int] | None = None  # (client, version) whose base weights the model holds
    originals: dict[str, Any] = field(default_factory=dict)  # W0 of base weights broadcasts changed (FedEx, FLoRA)

    def apply_base(self, update: Any) -> None:
        params = dict(self.exp.model.named_parameters())
        for name in update.params():
            self.originals.setdefault(name, params[name].detach().clone())
        self.owner = None  # until the message completes and is persisted
        apply_base_update(self.exp.model, update)

    def load_base(self, client: int, version: int, stored: dict[str, Any]) -> None:
        """Make the model's base weights those of ``client`` at ``version``: W0, then its changed weights."""
        if self.owner == (client, version):
            return
        params = dict(self.exp.model.named_parameters())
        for name, value in stored.items():
            self.originals.setdefault(name, params[name].detach().clone())
        for name, w0 in self.originals.items():
            params[name].data.copy_(stored.get(name, w0))
        self.owner = (client, version)


_CACHE: dict[str, _Setup] = {}  # one experiment per process (the latest run): models are not small


def _build_node(config: Config, cid: int, data_file: str, fmt: str) -> tuple[Experiment, dict[int, ClientData]]:
    if not data_file:
        exp = build(config)
        if not 0 <= cid < len(exp.clients):
            raise FedloraError(f"node config partition-id = {cid} is outside 0..{len(exp.clients) - 1}")
        return exp, {c.client_id: c for c in exp.clients}
    # A real client: all of its own file is its data, split into its train and test sets as a partition is.
    from fedlora.data.partition import _train_test, stage_rng

    if not fmt:  # the user-file dataset that reads this file name (fedlora.data.sources)
        from fedlora.data.sources import source_for_file

        fmt = source_for_file(data_file).name
    d = replace(config.data, dataset=fmt, path=data_file, num_clients=1, max_examples=0, min_examples_per_client=2)
    # With per-client ranks the node's one adapter has this client's rank (PEFT's "default" adapter here).
    a = replace(config.adapter, rank=config.adapter.rank_of(cid))
    exp = build(replace(config, adapter=a, data=d, train=replace(config.train, clients_per_round=0, min_clients=1)))
    exp.client_adapters = {cid: "default"}
    labels = np.asarray(exp.dataset.labels)  # type: ignore[union-attr]
    train, test = _train_test(np.arange(len(labels)), labels, config.data.client_test_fraction,
                              stage_rng(config.data.seed, 1000 + cid))
    if config.data.validation_fraction > 0:  # as a partition does: tuning sees validation data, never the test split
        if len(train) < 2:
            raise DataError(f"data.validation_fraction = {config.data.validation_fraction}: {data_file} leaves fewer "
                            "than 2 training examples to split into train and validation")
        train, test = _train_test(train, labels, config.data.validation_fraction,
                                  stage_rng(config.data.seed, 2000 + cid))
    return exp, {cid: ClientData(cid, train, test)}


def _setup(context: Context) -> tuple[_Setup, ClientData]:
    nc = context.node_config
    if "partition-id" not in nc:
        raise FedloraError("this SuperNode has no node config partition-id (the client it is); start it with "
                           "--node-config 'partition-id=0 num-partitions=N'")
    cid = int(nc["partition-id"])
    text = str(context.run_config.get("fedlora-config", ""))
    data_file = str(nc.get("data-file", "") or "")
    key = (context.run_id, text, str(nc.get("threads", "")), data_file, cid if data_file else None)
    cached = _CACHE.get("node")
    if cached is None or cached.key != key:
        _CACHE.clear()
        gc.collect()
        config = config_from_text(text)
        if "num-partitions" in nc and int(nc["num-partitions"]) != config.data.num_clients:
            raise FedloraError(f"node config num-partitions = {nc['num-partitions']} but data.num_clients = "
                               f"{config.data.num_clients}")
        if "threads" in nc:
            config = replace(config, train=replace(config.train, threads=int(nc["threads"])))
        exp, data = _build_node(config, cid, data_file, str(nc.get("data-format", "") or ""))
        _CACHE["node"] = cached = _Setup(key, exp, data)
    if cid not in cached.data:
        raise FedloraError(f"node config partition-id = {cid} is outside 0..{len(cached.data) - 1}")
    return cached, cached.data[cid]


def _adapter_dir(context: Context, cid: int) -> Path:
    """Where this node writes its final adapter (node config adapter-dir, else run config adapters-dir/<k>)."""
    base = str(context.run_config.get("adapters-dir", "") or "")
    default = Path(base) / str(cid) if base else Path("fedlora-adapters") / f"run-{context.run_id}" / f"client-{cid}"
    return Path(str(context.node_config.get("adapter-dir", "") or default)).resolve()


def _state_dir(context: Context, cid: int) -> Path:
    """Where this node keeps its client's state after every round (node config state-dir, else next to the
    adapter folder: :func:`fedlora.runtime.flower_state.default_state_dir`)."""
    given = str(context.node_config.get("state-dir", "") or "")
    return Path(given).resolve() if given else default_state_dir(_adapter_dir(context, cid))


def _restore(context: Context, message: Message) -> tuple[_Setup, ClientNode]:
    """This node's ClientNode in the state the message must be served from: ``context.state`` when it is not
    later than that, else the latest state file on disk that is not (module docstring of flower_state)."""
    setup, data = _setup(context)
    header = message.content[codec.HEADER]
    if int(header["client"]) != data.client_id:
        raise FedloraError(f"message for client {header['client']} reached the node of client {data.client_id}")
    kind, round_ = message.metadata.message_type, int(header["round"])
    _fault_hooks(context, kind, round_)
    exp = setup.exp
    node = exp.client_node(data, apply_base=setup.apply_base)
    limit = needed_round(kind, round_) if kind in ("train", "evaluate") else 1 << 62  # save: the latest
    have = int(context.state[META].get("round", -1)) if META in context.state else None  # type: ignore[union-attr]
    stored: dict[str, Any] = {}
    if STATE in context.state and have is not None and have <= limit:
        node.state = codec.from_arrays(context.state[STATE])  # type: ignore[arg-type]
        node.version = int(context.state[META]["version"])  # type: ignore[index]
        stored = codec.from_arrays(context.state[BASE]) if BASE in context.state else {}  # type: ignore[arg-type]
    else:  # a restarted SuperNode, a resumed federation, or a message of a round this node has gone past
        snap = load_snapshot(_state_dir(context, data.client_id), _federation(context), data.client_id, limit)
        if snap is not None:
            node.state, node.version, stored = snap.state, snap.version, snap.base
        setup.owner = None  # whatever the model holds, put this state's base weights in
    setup.load_base(data.client_id, node.version, stored)
    return setup, node


def _federation(context: Context) -> str:
    return _federation_of(context.run_config)


def _federation_of(run_config: Any) -> str:
    """The run config's federation-id: the launcher's random id of the run directory (kept across resumes)."""
    return str(run_config.get("federation-id", "") or "")


def _persist(context: Context, setup: _Setup, node: ClientNode, round_: int) -> None:
    """Keep the node's state for the next message (only after the message succeeded): in ``context.state`` and,
    atomically, in the node's state folder (what a restarted SuperNode or a resumed federation reloads)."""
    context.state[STATE] = codec.to_arrays(node.state)
    context.state[META] = ConfigRecord({"version": node.version, "client": node.data.client_id, "round": round_})
    base = {}
    if setup.originals:
        params = dict(setup.exp.model.named_parameters())
        base = {n: params[n] for n in sorted(setup.originals)}
        context.state[BASE] = codec.to_arrays(base)
    save_snapshot(_state_dir(context, node.data.client_id), _federation(context), node.data.client_id, round_,
                  node.version, node.state, base)
    setup.owner = (node.data.client_id, node.version)


def _fault_hooks(context: Context, kind: str, round_: int) -> None:
    here = f"{kind}@{round_}"
    if here in str(context.node_config.get("kill-at", "")).split(","):
        os.killpg(os.getpgid(0), signal.SIGKILL)  # the SuperNode dies mid-round, with this process
    if here in str(context.node_config.get("fail-at", "")).split(","):
        raise RuntimeError(f"injected failure at {here} (node config fail-at)")
