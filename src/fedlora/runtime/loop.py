"""The federated round loop, written once for every runtime.

A runtime supplies a :class:`Transport` that reaches the clients (direct calls in the embedded simulation,
messages through Flower in a deployment); the loop decides who trains, what each client must receive, what
is counted, and what is recorded. Bytes are the sizes of the tensors in each message actually sent, in two
fields: ``bytes_down`` counts the protocol's messages (the broadcasts a sampled client receives before it
trains, and the round's broadcast to the clients that took part in it), ``bytes_eval_sync`` the broadcasts
sent to clients that did not take part, only so that their own models can be evaluated. Their sum is what was
sent; with partial participation an evaluation sync can deliver early a broadcast that the client would
otherwise have received when next sampled (it is then not sent again).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

import numpy as np

from fedlora.adapters import State
from fedlora.config import Config
from fedlora.errors import ClientFailure, RoundFailed, UpdateRejected
from fedlora.protocol import CODE_FIELDS, EVAL_FIELDS, GEN_FIELDS, Broadcast, Upload
from fedlora.registry import DATASETS
from fedlora.runtime.observers import Event
from fedlora.server import Server, weighted_mean_metric


class Transport(Protocol):
    def fit(self, client: int, broadcasts: Sequence[Broadcast], round_: int) -> Upload: ...

    def evaluate(self, client: int, broadcasts: Sequence[Broadcast]) -> dict[str, float]: ...

    def evaluate_global(self, state: State) -> dict[str, float]: ...

    def on_broadcast(self, broadcast: Broadcast) -> None: ...


class WrappedTransport:
    """A :class:`Transport` that changes how clients train and passes everything else to ``inner`` (fault
    injection, secure aggregation): subclasses define ``fit``."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    def fit(self, client: int, broadcasts: Sequence[Broadcast], round_: int) -> Upload:
        raise NotImplementedError

    def evaluate(self, client: int, broadcasts: Sequence[Broadcast]) -> dict[str, float]:
        return self.inner.evaluate(client, broadcasts)

    def evaluate_global(self, state: State) -> dict[str, float]:
        return self.inner.evaluate_global(state)

    def on_broadcast(self, broadcast: Broadcast) -> None:
        self.inner.on_broadcast(broadcast)


# Privacy (fedlora.privacy, privacy.dp / privacy.dp_sgd only): cumulative epsilon at delta after the round.
PRIVACY_FIELDS = ("epsilon", "delta", "epsilon_sgd", "epsilon_sgd_clients")


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _no_event(point: str, round_: int) -> None:
    pass


def run_round(server: Server, transport: Transport, config: Config, round_: int, global_test: np.ndarray,
              evaluate: bool, on_event: Event = _no_event) -> dict[str, Any]:
    """One round: train the sampled clients, validate, aggregate, broadcast, evaluate. Returns its record.
    ``on_event`` hears the points ``fit`` (an upload arrived) and ``aggregate`` (the broadcast exists)."""
    t0 = time.perf_counter()
    chosen = server.sample(round_)
    uploads: list[Upload] = []
    rejected: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    bytes_up = bytes_down = 0
    for c in chosen:
        pending = server.pending(c)
        bytes_down += sum(b.nbytes for b in pending)
        try:
            upload = transport.fit(c, pending, round_)
        except ClientFailure as e:
            missing.append({"client": c, "reason": str(e)})
            continue
        server.mark_synced(c)
        on_event("fit", round_)
        bytes_up += upload.nbytes
        try:
            server.validate(upload, round_)
        except UpdateRejected as e:
            rejected.append({"client": c, "reason": e.reason})
            continue
        uploads.append(upload)

    uploads, outliers = server.screen(uploads, round_)
    rejected += [{"client": e.client, "reason": e.reason} for e in outliers]

    failed: str | None = None
    stats: Mapping[str, float] = {}
    try:
        broadcast = server.aggregate(uploads)
        transport.on_broadcast(broadcast)
        on_event("aggregate", round_)
        stats = broadcast.stats
    except RoundFailed as e:
        failed = str(e)

    n = sum(u.num_examples for u in uploads)
    losses = [float(u.meta.get("train_loss", math.nan)) for u in uploads]
    record: dict[str, Any] = {
        "round": round_,
        "train_loss": _num(sum(loss * u.num_examples for loss, u in zip(losses, uploads)) / n) if n else None,
        "participants": [u.client for u in uploads],
        "rejected": rejected,
        "missing": missing,
        "failed": failed,
        **{k: float(v) for k, v in stats.items()},
        **server.method.round_fields(round_, server.sample),
    }
    bytes_eval_sync = 0
    if evaluate:
        took_part = {u.client for u in uploads} | {r["client"] for r in rejected}
        protocol, bytes_eval_sync = evaluate_all(server, transport, record, missing, took_part,
                                                 eval_sample(config, round_, record))
        bytes_down += protocol
    else:  # every record has the same keys; a round without evaluation has null accuracies
        extra = DATASETS.lookup(config.data.dataset).record_fields  # e.g. HumanEval's pass@1 for code generation
        record.update(dict.fromkeys(EVAL_FIELDS + (GEN_FIELDS if config.data.task == "generation" else ()) + extra))
        if config.train.eval_clients:
            record["evaluated"] = None
    record["bytes_up"] = bytes_up
    record["bytes_down"] = bytes_down
    record["bytes_eval_sync"] = bytes_eval_sync
    record["seconds"] = time.perf_counter() - t0
    return record


def eval_sample(config: Config, round_: int, record: dict[str, Any]) -> Sequence[int] | None:
    """The clients evaluated in round ``round_``: with ``train.eval_clients`` = k > 0, k of them drawn without
    replacement from (train.seed, round), sorted and listed in ``record["evaluated"]``; else None (all)."""
    k, n = config.train.eval_clients, config.data.num_clients
    if k == 0:
        return None
    rng = np.random.default_rng([config.train.seed, round_, 0xE7A])  # 0xE7A: this draw's own stream
    chosen = sorted(int(c) for c in rng.choice(n, k, replace=False)) if k < n else list(range(n))
    record["evaluated"] = chosen
    return chosen


def evaluate_all(server: Server, transport: Transport, record: dict[str, Any], missing: list[dict[str, Any]],
                 took_part: Collection[int] = (), clients: Sequence[int] | None = None) -> tuple[int, int]:
    """Evaluate each client's own model on its test split (every client, or those in ``clients``) and the global
    model where there is one; fill ``record``'s accuracy fields. Returns the bytes sent to bring clients up to date
    first: (to the clients in ``took_part``, the round's broadcast to its participants; to the others,
    evaluation-only syncs)."""
    record.update(dict.fromkeys(EVAL_FIELDS))
    protocol = eval_sync = 0
    per_client: dict[str, dict[str, float]] = {}
    for c in range(server.num_clients) if clients is None else clients:
        pending = server.pending(c)
        sent = sum(b.nbytes for b in pending)
        if c in took_part:
            protocol += sent
        else:
            eval_sync += sent
        try:
            per_client[str(c)] = transport.evaluate(c, pending)
        except ClientFailure as e:
            missing.append({"client": c, "reason": f"evaluation: {e}"})
            continue
        server.mark_synced(c)
    accs = [m["acc"] for m in per_client.values()]
    sizes = [m["n"] for m in per_client.values()]
    if server.method.global_model:
        g = transport.evaluate_global(server.global_state)
        record.update(acc_global=_num(g["acc"]), f1_global=_num(g["f1"]), loss_global=_num(g["loss"]))
    if accs:
        record["acc_personal_mean"] = _num(float(np.nanmean(accs)))
        record["acc_personal_weighted"] = _num(weighted_mean_metric(accs, sizes))
        record["f1_personal_mean"] = _num(float(np.nanmean([m["f1"] for m in per_client.values()])))
        record["clients"] = {c: _num(m["acc"]) for c, m in per_client.items()}
    results = {**({"global": g} if server.method.global_model else {}), **per_client}
    if any("ppl" in m for m in results.values()):  # a generation task: perplexity and sample generations
        record["ppl_global"] = _num(results["global"]["ppl"]) if "global" in results else None
        record["ppl_personal_mean"] = _num(float(np.nanmean([m["ppl"] for m in per_client.values()]))) \
            if per_client else None
        if any("pass_at_1" in m for m in results.values()):
            record["pass_at_1_global"] = _num(results["global"]["pass_at_1"]) if "global" in results else None
            record["pass_at_1_personal_mean"] = _num(float(np.nanmean([m["pass_at_1"] for m in per_client.values()]))) \
                if per_client else None
            record["pass_at_1_clients"] = {c: _num(m["pass_at_1"]) for c, m in per_client.items()}
        # Not a metric: RunDir writes these to samples/round_<t>.jsonl, not to metrics.jsonl.
        record["samples"] = [{"model": name if name == "global" else f"client {name}", **sample}
                             for name, m in results.items() for sample in m.get("samples", ())]
    return protocol, eval_sync


def initial_record(server: Server, transport: Transport, config: Config | None = None) -> dict[str, Any]:
    """Round 0: every model (or ``train.eval_clients`` of them) evaluated before any training, so that learning is
    visible from its start."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"round": 0, "train_loss": None, "participants": [], "rejected": [], "missing": [],
                              "failed": None, **server.method.round_fields(0, server.sample)}
    clients = eval_sample(config, 0, record) if config is not None else None
    record["bytes_down"], record["bytes_eval_sync"] = evaluate_all(server, transport, record, record["missing"],
                                                                   clients=clients)
    record["bytes_up"] = 0
    record["seconds"] = time.perf_counter() - t0
    return record


def run_rounds(server: Server, transport: Transport, config: Config, global_test: np.ndarray,
               on_record: Callable[[dict[str, Any]], None], start_round: int = 1,
               evaluate_initial: bool = True, on_event: Event = _no_event) -> list[dict[str, Any]]:
    """Rounds ``start_round..train.rounds``; ``on_record`` receives each round's record as soon as it exists,
    ``on_event`` the points inside a round (observers: progress bars, kill switches; fedlora.runtime.observers).

    Round 0 (the evaluation before training, with ``train.eval_initial``) is run when ``start_round`` is 1 and
    ``evaluate_initial`` is true; a resumed run whose round 0 is already recorded passes False."""
    t = config.train
    records = []
    if start_round == 1 and evaluate_initial and t.eval_initial:
        records.append(initial_record(server, transport, config))
        on_record(records[-1])
    for r in range(start_round, t.rounds + 1):
        record = run_round(server, transport, config, r, global_test,
                           evaluate=(r % t.eval_every == 0 or r == t.rounds), on_event=on_event)
        records.append(record)
        on_record(record)
    return records


def summarize(records: Sequence[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """Final values (last evaluated round) and totals."""
    evaluated = [r for r in records if r.get("clients") is not None]
    last = evaluated[-1] if evaluated else {}
    keys = ("acc_global", "f1_global", "acc_personal_mean", "acc_personal_weighted", "f1_personal_mean", "clients")
    out: dict[str, Any] = {k: last.get(k) for k in keys}
    out.update({k: last[k] for k in GEN_FIELDS + CODE_FIELDS if k in last})
    out.update(
        rounds=sum(1 for r in records if r["round"] > 0),
        final_round=records[-1]["round"] if records else 0,
        train_loss=records[-1]["train_loss"] if records else None,
        initial_acc_personal_mean=records[0].get("acc_personal_mean") if records and records[0]["round"] == 0 else None,
        bytes_up_total=int(sum(r["bytes_up"] for r in records)),
        bytes_down_total=int(sum(r["bytes_down"] for r in records)),
        # records written before this field existed (a resumed older run) count as no evaluation-only syncs
        bytes_eval_sync_total=int(sum(r.get("bytes_eval_sync", 0) for r in records)),
        failed_rounds=[r["round"] for r in records if r["failed"]],
        wall_seconds=wall_seconds,
    )
    if records:
        out.update({k: records[-1][k] for k in PRIVACY_FIELDS if k in records[-1]})
    if any("agg_error" in r for r in records):
        out["agg_error"] = [r.get("agg_error") for r in records]
    return out

