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
  launcher-pid, launcher-start
                   the ``fedlora`` launcher that started this run (0: none): the ServerApp ends when it is gone

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

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora.errors import FedloraError
from fedlora.experiment import build
from fedlora.report import RunDir, save_adapter
from fedlora.runtime import flower_codec as codec
from fedlora.runtime import flower_secagg as secagg
from fedlora.runtime.flower_client import (  # noqa: F401  (STATE, config_from_text: part of this module's interface)
    STATE, _adapter_dir, _fault_hooks, _federation_of, _persist, _restore, _setup, config_from_text)
from fedlora.runtime.flower_owner import watch_owner
from fedlora.runtime.flower_transport import FlowerTransport, discover
from fedlora.runtime.loop import run_rounds, summarize
from fedlora.runtime.observers import standard
from fedlora.runtime.driver import apply_base_update, make_server

APP_DIR = Path(__file__).with_name("flwrapp")  # the Flower app config (pyproject.toml) for `flwr run`


def _secure_aggregation(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A ClientApp mod: SecAgg+'s stages (privacy.secure_aggregation) go to Flower's mod around this node's held
    upload (fedlora.runtime.flower_secagg); every other message to fedlora's handlers."""
    if not secagg.is_protocol_message(message):
        return call_next(message, context)
    _fault_hooks(context, f"secagg.{secagg.stage_of(message)}", int(message.metadata.group_id))
    return secagg.serve(message, context)


server_app = ServerApp()
client_app = ClientApp(mods=[_secure_aggregation])


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
    watch_owner(rc)  # started by `fedlora run --runtime flower`: end with that launcher (flower_owner.py)
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
