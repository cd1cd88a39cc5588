"""fedlora as a Flower app: a ServerApp that runs the round loop, a ClientApp that runs one client.

Both sides call the code the embedded runtime calls: the ServerApp builds the experiment, the
:class:`~fedlora.server.Server` (``driver.make_server``) and hands ``run_rounds`` a
:class:`~fedlora.runtime.flower_transport.FlowerTransport`; the ClientApp restores a
:class:`~fedlora.client.ClientNode` and calls ``receive`` / ``fit`` / ``evaluate``. No rule is written here.

Run config (``[tool.flwr.app.config]`` in ``flwrapp/pyproject.toml``; override with ``flwr run --run-config``):
  fedlora-config   the experiment as TOML text (empty: the default demo)
  out-dir          run directory on the SuperLink's host (empty: runs/flower-<run id>)
  overwrite        replace a non-empty out-dir (default: refuse)
  adapters-dir     where a client without node config adapter-dir writes its adapter, as <dir>/<client>
                   (Flower's simulation runtime, whose nodes have no node config of ours)
  resume           continue out-dir after its last checkpointed round (fedlora run --resume)
  federation-id    an id for the run directory, the same on resume: nodes file their state under it
  startup-timeout  seconds to wait for the SuperNodes to answer (they build their experiment first)
  poll-interval    seconds between pulls of replies

Node config (``flower-supernode --node-config``):
  partition-id     the client this node is (0 .. data.num_clients - 1); required
  num-partitions   checked against data.num_clients when given
  data-file        this node's own labelled data (csv / jsonl, columns data.text_column / data.label_column);
                   without it the node trains on partition ``partition-id`` of the configured dataset
  adapter-dir      where the node writes its final adapter (default: run config adapters-dir/<k>, else
                   fedlora-adapters/run-<id>/client-<k> under the node's working directory)
  state-dir        where the node keeps its client's state after every round, for resume and restarts
                   (default: <adapter-dir>.state; runtime/flower_state.py)
  threads          torch CPU threads on this node (default: train.threads)
  fail-at, kill-at testing aids: ``train@2,evaluate@1`` makes the ClientApp raise, or SIGKILL its own
                   process group (the SuperNode), when that message arrives; with secure aggregation also a
                   SecAgg+ stage, e.g. ``secagg.collect_masked_vectors@1`` (a client dropping out mid-protocol)

A client's full adapter state (its shared tensors and its private ones: FedSA's B side and head) is kept in
``context.state``, which Flower stores on the SuperNode between messages, and in the node's state folder after
every round (what a restarted SuperNode or a resumed federation reloads); it never enters a Message. The
ServerApp checkpoints the server after every round into ``<out-dir>/checkpoint`` as the embedded runtime does.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora import config as cfgmod
from fedlora.client import ClientData, ClientNode
from fedlora.config import Config
from fedlora.errors import DataError, FedloraError
from fedlora.experiment import Experiment, build
from fedlora.report import RunDir, save_adapter
from fedlora.runtime import flower_codec as codec
from fedlora.runtime import flower_secagg as secagg
from fedlora.runtime.flower_state import default_state_dir, load_snapshot, needed_round, save_snapshot
from fedlora.runtime.flower_transport import FlowerTransport, discover
from fedlora.runtime.loop import run_rounds, summarize
from fedlora.runtime.observers import standard
from fedlora.runtime.driver import apply_base_update, make_server

APP_DIR = Path(__file__).with_name("flwrapp")  # the Flower app config (pyproject.toml) for `flwr run`
STATE, META, BASE = "fedlora.state", "fedlora.meta", "fedlora.base"  # context.state records (node-local)



def _secure_aggregation(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A ClientApp mod: SecAgg+'s stages (privacy.secure_aggregation) go to Flower's mod around this node's held
    upload (fedlora.runtime.flower_secagg); every other message to fedlora's handlers."""
    if not secagg.is_protocol_message(message):
        return call_next(message, context)
    _fault_hooks(context, f"secagg.{secagg.stage_of(message)}", int(message.metadata.group_id))
    return secagg.serve(message, context)


server_app = ServerApp()
client_app = ClientApp(mods=[_secure_aggregation])


def config_from_text(text: str) -> Config:
    """The experiment of a run: the ``fedlora-config`` TOML text (empty: the default demo)."""
    try:
        raw = tomllib.loads(text) if text.strip() else {}
    except tomllib.TOMLDecodeError as e:
        raise FedloraError(f"run config fedlora-config is not valid TOML: {e}") from None
    return cfgmod.from_dict(raw)


# =========================================================================================== server side
@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    run_server(grid, context)


def _jsonl(path: Path) -> Callable[[dict[str, Any]], None]:
    def write(entry: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    return write


def run_server(grid: Grid, context: Context) -> dict[str, Any]:
    """The ServerApp: build, find the nodes, run the rounds, collect the adapters, write the run directory."""
    start = time.perf_counter()
    rc = context.run_config
    config = config_from_text(str(rc.get("fedlora-config", "")))
    poll = float(rc.get("poll-interval", 0.1))
    startup = float(rc.get("startup-timeout", 300))
    out_dir = str(rc.get("out-dir", "")) or f"runs/flower-{context.run_id}"
    resume = bool(rc.get("resume"))
    # Refuses a non-empty folder unless overwrite or resume; the launcher holds the folder's lock (lock=False).
    out = RunDir(out_dir, overwrite=bool(rc.get("overwrite")) and not resume, resume=resume, lock=False)
    exp = build(config)
    cfg = exp.config
    server = make_server(exp)
    out.start(exp)
    changed: set[str] = set()  # base weights the broadcasts changed (FedEx, FLoRA): checkpointed with the server
    records: list[dict[str, Any]] = []
    first_round, elapsed_before = 1, 0.0
    if resume:  # continue after the last checkpointed round; the nodes reload their clients' state from disk
        from fedlora.checkpoint import has_checkpoint, load_checkpoint

        if has_checkpoint(out.path / "checkpoint"):
            ckpt = load_checkpoint(out.path / "checkpoint", server)
            params = dict(exp.model.named_parameters())
            with torch.no_grad():
                for name, value in ckpt.base.items():
                    params[name].copy_(value)
            changed.update(ckpt.base)
            records, first_round, elapsed_before = list(ckpt.records), ckpt.round + 1, ckpt.elapsed
        out.rewrite_metrics(records)
        print(f"fedlora: resuming after round {first_round - 1}", flush=True)
    fdir = out.path / "flower"
    fdir.mkdir(exist_ok=True)
    if not resume:  # the id under which the nodes file their state; a resume passes the same one back
        (fdir / "federation.json").write_text(json.dumps({"federation_id": _federation_of(rc)}) + "\n",
                                              encoding="utf-8")
    log = _jsonl(fdir / "messages.jsonl")

    labels = list(exp.dataset.label_names) if cfg.data.task == "classification" else []
    nodes, errors, down, up = discover(grid, len(exp.clients), startup, poll,
                                       {"label_names": labels} if labels else {}, log)
    print(f"fedlora: SuperNodes by client: {nodes}" + (f"; failed: {errors}" if errors else ""), flush=True)
    if len(nodes) < cfg.train.min_clients:
        raise FedloraError(f"only {len(nodes)} of {len(exp.clients)} clients have a SuperNode (train.min_clients = "
                           f"{cfg.train.min_clients}); node errors: {errors or 'none connected'}")

    def on_broadcast(b: Any) -> None:
        if b.base_update:
            apply_base_update(exp.model, b.base_update)
            changed.update(b.base_update.params())

    transport = FlowerTransport(grid, server, nodes, lambda s: exp.trainer.evaluate(s, exp.split.global_test),
                                on_broadcast, round_timeout=cfg.train.round_timeout, poll=poll, log=log)
    loop_transport: Any = transport
    if cfg.privacy.secure_aggregation:  # the server learns only each round's weighted mean (Flower's SecAgg+)
        loop_transport = secagg.SecureAggregation(transport, server, cfg.method.weighting,
                                                  replace(secagg.Parameters(), timeout=cfg.train.round_timeout or None))
    if cfg.faults.active:  # the same seeded fault injection as the embedded runtime, wrapped around Flower
        from fedlora.faults import FaultyTransport

        loop_transport = FaultyTransport(transport, cfg.faults, cfg.train.round_timeout)
    wire_log = _jsonl(fdir / "rounds.jsonl")
    seen = {"down": transport.wire_down, "up": transport.wire_up}

    config_dict = cfg.to_dict()
    observers = standard(False, cfg.train.rounds, first_round - 1, "flower")  # the launcher shows progress
    out.on_event = observers.event

    def on_record(record: dict[str, Any]) -> None:
        from fedlora.checkpoint import save_checkpoint

        if cfg.privacy.secure_aggregation and record.get("agg_error") is not None:
            record["agg_error"] = None  # it needs each client's factors; the server held only their mean
        records.append(record)
        out.append_metrics(record)
        observers.event("metrics", record["round"])
        params = dict(exp.model.named_parameters())
        # The server's state after the round, atomically, as the embedded runtime writes it; the clients' states
        # are on their nodes (flower_state), so none is stored here.
        save_checkpoint(out.path / "checkpoint", record["round"], server, {}, {},
                        {n: params[n].detach() for n in sorted(changed)}, records,
                        elapsed_before + time.perf_counter() - start, config=config_dict,
                        on_event=observers.event)
        wire_log({"round": record["round"], "seconds": record["seconds"], "bytes_up": record["bytes_up"],
                  "bytes_down": record["bytes_down"], "wire_bytes_up": transport.wire_up - seen["up"],
                  "wire_bytes_down": transport.wire_down - seen["down"]})
        seen.update(down=transport.wire_down, up=transport.wire_up)
        print(f"fedlora: round {record['round']} done in {record['seconds']:.1f} s; missing "
              f"{[m['client'] for m in record['missing']]}; failed: {record['failed']}", flush=True)

    run_rounds(server, loop_transport, cfg, exp.split.global_test, on_record=on_record, start_round=first_round,
               evaluate_initial=not records, on_event=observers.event)
    summary = summarize(records, elapsed_before + time.perf_counter() - start)
    if cfg.faults.active:
        from fedlora.runtime.driver import injected_from

        summary["faults_injected"] = injected_from(records, loop_transport)
    transport.round = records[-1]["round"] if records else 0  # the round the nodes' final state is after
    saved = transport.query("save", nodes.values(), {n: c for c, n in nodes.items()},
                            cfg.train.round_timeout or startup)
    adapters = {}
    for c, n in sorted(nodes.items()):
        m = saved.get(n)
        adapters[str(c)] = ({"error": m.error.reason} if m.has_error() else dict(m.content["saved"])) if m else \
            {"error": "no reply to save"}
    out.save_adapters(exp, {}, server.global_state if exp.method.global_model else None)
    out.finish(exp, summary)
    (fdir / "run.json").write_text(json.dumps({
        "run_id": context.run_id, "nodes": {str(c): n for c, n in nodes.items()},
        "node_errors": {str(n): e for n, e in errors.items()}, "adapters": adapters,
        "wire_bytes_down": transport.wire_down + down, "wire_bytes_up": transport.wire_up + up,
        "setup_wire_bytes": down + up}, indent=2) + "\n", encoding="utf-8")
    return summary


# =========================================================================================== client side
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


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    start = time.perf_counter()
    setup, node = _restore(context, message)
    node.receive(codec.get_broadcasts(message.content))
    round_ = int(message.content[codec.HEADER]["round"])
    upload, _ = node.fit(round_)
    keys = setup.exp.method.plan(round_).upload
    config = setup.exp.config
    # With secure aggregation the upload stays here until the round's SecAgg+ stages mask it; the reply is a receipt.
    reply = secagg.hold(context, upload, keys, round_, config.method.weighting) if config.privacy.secure_aggregation \
        else codec.upload_reply(upload, keys)
    _persist(context, setup, node, round_)
    reply["timing"] = ConfigRecord({"compute_s": time.perf_counter() - start})
    return Message(reply, reply_to=message)


@client_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    start = time.perf_counter()
    setup, node = _restore(context, message)
    node.receive(codec.get_broadcasts(message.content))
    metrics = node.evaluate()
    _persist(context, setup, node, int(message.content[codec.HEADER]["round"]))
    # Generation tasks also return sample generations (a list): they travel as JSON text, not as metrics.
    samples = metrics.pop("samples", None)
    content = {"metrics": MetricRecord({k: float(v) for k, v in metrics.items()}),
               "timing": ConfigRecord({"compute_s": time.perf_counter() - start})}
    if samples is not None:
        content["samples"] = ConfigRecord({"json": json.dumps(samples)})
    return Message(RecordDict(content), reply_to=message)


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    header = message.content[codec.HEADER]
    setup, data = _setup(context)  # hello: build now, before the first round, so no round pays for it
    cid = data.client_id
    if header["kind"] == "hello":
        want = list(header.get("label_names", []))
        have = list(getattr(setup.exp.dataset, "label_names", []))
        if want and have != want:
            raise FedloraError(f"client {cid}'s data has labels {have}; the federation's labels are {want} "
                               "(every node's file must use the same label set)")
        info = {"client": cid, "train_examples": len(data.train), "test_examples": len(data.test)}
        return Message(RecordDict({codec.HEADER: ConfigRecord(info)}), reply_to=message)
    if header["kind"] == "save":
        _, node = _restore(context, message)
        path = _adapter_dir(context, cid)
        save_adapter(setup.exp, node.state, path, node.adapter)
        digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
        return Message(RecordDict({"saved": ConfigRecord({"client": cid, "path": str(path), "sha256": digest})}),
                       reply_to=message)
    raise FedloraError(f"unknown query {header['kind']!r}")
