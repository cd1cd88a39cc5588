"""The server side of the Flower runtime: a :class:`~fedlora.runtime.loop.Transport` over Flower's Grid.

``run_rounds`` drives this transport exactly as it drives the embedded one; nothing here decides who trains,
what is aggregated or what is recorded. What it adds is concurrency: when the loop asks for the first client
of a round, the train messages of every sampled client are pushed at once (each with ``server.pending(c)``,
the same broadcasts the loop passes when it asks for that client), so SuperNodes train in parallel while the
loop collects replies in its own order. Evaluation is pushed to every client the same way. A message whose
broadcasts turn out to differ from what the loop passes is re-sent, so prefetching never changes a result.

A client that does not answer within ``train.round_timeout`` (when > 0), whose SuperNode Flower reports as
unavailable, or whose ClientApp raised, becomes a :class:`~fedlora.errors.ClientFailure`: the loop records it
as missing and the round goes on. Replies are pulled with Grid.pull_messages every ``poll`` seconds (Grid's
send_and_receive sleeps 3 s between pulls, which would dominate short rounds).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from flwr.app import Message
from flwr.serverapp import Grid

from fedlora.adapters import State
from fedlora.errors import ClientFailure, FedloraError
from fedlora.methods import Broadcast, Upload
from fedlora.runtime import flower_codec as codec
from fedlora.server import Server

MessageLog = Callable[[dict[str, Any]], None]


@dataclass
class _Sent:
    message_id: str | None
    key: tuple[int, ...]  # which Broadcast objects were sent (identity, in order)
    deadline: float | None
    sent_at: float


def _key(broadcasts: Sequence[Broadcast]) -> tuple[int, ...]:
    return tuple(id(b) for b in broadcasts)


class FlowerTransport:
    """Reaches clients through a Flower Grid; ``nodes`` maps client id → SuperNode id."""

    def __init__(self, grid: Grid, server: Server, nodes: Mapping[int, int], evaluate_global: Callable[[State], dict],
                 on_broadcast: Callable[[Broadcast], None], *, round_timeout: float = 0.0, poll: float = 0.1,
                 log: MessageLog | None = None) -> None:
        self.grid = grid
        self.server = server
        self.nodes = dict(nodes)
        self._evaluate_global = evaluate_global
        self._on_broadcast = on_broadcast
        self.round_timeout = round_timeout
        self.poll = poll
        self.log = log or (lambda entry: None)
        self.round = 0
        self.wire_down = 0  # serialised bytes pushed to SuperNodes / pulled from them (see codec.message_nbytes)
        self.wire_up = 0
        self._sent: dict[tuple[str, int], _Sent] = {}
        self._replies: dict[str, Message] = {}

    # ---- Transport ------------------------------------------------------------------------------------
    def fit(self, client: int, broadcasts: Sequence[Broadcast], round_: int) -> Upload:
        if round_ != self.round:  # the first request of a round: push every sampled client's train message
            self.round = round_
            self._forget("train")
            self._forget("evaluate")
            self._push("train", [(c, self.server.pending(c)) for c in self.server.sample(round_) if c in self.nodes])
        reply = self._collect("train", client, broadcasts)
        try:
            return codec.read_upload(reply.content, client)
        except (KeyError, ValueError, TypeError, FedloraError) as e:
            raise ClientFailure(f"malformed train reply: {e}") from None

    def evaluate(self, client: int, broadcasts: Sequence[Broadcast]) -> dict[str, float]:
        if client == 0 or ("evaluate", client) not in self._sent:  # a new evaluation pass: push it whole
            self._forget("evaluate")
            rest = [c for c in range(client, self.server.num_clients) if c in self.nodes]
            self._push("evaluate", [(c, self.server.pending(c)) for c in rest])
        reply = self._collect("evaluate", client, broadcasts)
        try:
            out: dict[str, Any] = {k: float(v) for k, v in reply.content["metrics"].items()}
            if "samples" in reply.content:
                out["samples"] = json.loads(reply.content["samples"]["json"])
            return out
        except (KeyError, TypeError, ValueError) as e:
            raise ClientFailure(f"malformed evaluate reply: {e}") from None

    def evaluate_global(self, state: State) -> dict[str, float]:
        return self._evaluate_global(state)

    def on_broadcast(self, broadcast: Broadcast) -> None:
        self._on_broadcast(broadcast)

    # ---- messages -------------------------------------------------------------------------------------
    def _forget(self, kind: str) -> None:
        for key in [k for k in self._sent if k[0] == kind]:
            del self._sent[key]

    def _push(self, kind: str, batch: Iterable[tuple[int, Sequence[Broadcast]]]) -> None:
        batch = list(batch)
        if not batch:
            return
        ttl = self.round_timeout + 60.0 if self.round_timeout > 0 else None
        messages = [Message(codec.request(kind, c, self.round, b), dst_node_id=self.nodes[c], message_type=kind,
                            group_id=str(self.round), ttl=ttl) for c, b in batch]
        sizes = [codec.message_nbytes(m) for m in messages]  # before pushing: push may release the content
        arrays = [codec.array_keys(m.content) for m in messages]
        ids = list(self.grid.push_messages(messages))
        now = time.monotonic()
        deadline = now + self.round_timeout if self.round_timeout > 0 else None
        for (c, b), mid, size, keys in zip(batch, ids, sizes, arrays):
            self._sent[(kind, c)] = _Sent(mid, _key(b), deadline, now)
            self.wire_down += size
            self.log({"dir": "down", "kind": kind, "round": self.round, "client": c, "bytes": size,
                      "broadcasts": len(b), "arrays": keys})

    def _pull(self) -> None:
        wanted = [s.message_id for s in self._sent.values() if s.message_id and s.message_id not in self._replies]
        if wanted:
            for m in self.grid.pull_messages(wanted):
                self._replies[m.metadata.reply_to_message_id] = m

    def _collect(self, kind: str, client: int, broadcasts: Sequence[Broadcast]) -> Message:
        """The reply of ``client`` to its ``kind`` message (pushed now if it was not, or with other broadcasts)."""
        if client not in self.nodes:
            raise ClientFailure(f"no SuperNode serves client {client}")
        sent = self._sent.get((kind, client))
        if sent is None or sent.key != _key(broadcasts):
            self._push(kind, [(client, broadcasts)])
            sent = self._sent[(kind, client)]
        try:
            if sent.message_id is None:
                raise ClientFailure("the SuperLink did not accept the message")
            while sent.message_id not in self._replies:
                if sent.deadline is not None and time.monotonic() > sent.deadline:
                    raise ClientFailure(f"no reply within train.round_timeout = {self.round_timeout:g} s")
                self._pull()
                if sent.message_id not in self._replies:
                    time.sleep(self.poll)
        finally:
            self._sent.pop((kind, client), None)
        reply = self._replies.pop(sent.message_id)
        size = codec.message_nbytes(reply)
        self.wire_up += size
        entry: dict[str, Any] = {"dir": "up", "kind": kind, "round": self.round, "client": client, "bytes": size,
                                 "arrays": codec.array_keys(reply.content) if reply.has_content() else {},
                                 "rtt_s": round(time.monotonic() - sent.sent_at, 4)}
        if reply.has_content() and "timing" in reply.content:  # the ClientApp's own time on this message
            entry["compute_s"] = round(float(reply.content["timing"]["compute_s"]), 4)
        if reply.has_error():
            entry["error"] = reply.error.reason
        self.log(entry)
        if reply.has_error():
            raise ClientFailure(f"{reply.error.reason} (Flower error code {reply.error.code})")
        return reply

    # ---- outside the rounds ---------------------------------------------------------------------------
    def query(self, action: str, node_ids: Iterable[int], clients: Mapping[int, int], timeout: float,
              extra: Mapping[str, Any] | None = None) -> dict[int, Message]:
        """A ``query`` message to each node; the replies (by node id) that arrive within ``timeout`` s."""
        replies, down, up = query(self.grid, action, node_ids, clients, timeout, self.poll, self.round, extra,
                                  self.log)
        self.wire_down += down
        self.wire_up += up
        return replies


def query(grid: Grid, action: str, node_ids: Iterable[int], clients: Mapping[int, int], timeout: float,
          poll: float, round_: int = 0, extra: Mapping[str, Any] | None = None,
          log: MessageLog | None = None) -> tuple[dict[int, Message], int, int]:
    """Send a ``query`` message (``action``: hello, save) to each node and pull replies until all arrived or
    ``timeout`` s passed. Returns (replies by node id, bytes sent, bytes received)."""
    log = log or (lambda entry: None)
    node_ids = list(node_ids)
    messages = [Message(codec.request(action, clients.get(n, -1), round_, (), extra), dst_node_id=n,
                        message_type="query", group_id=action) for n in node_ids]
    down = up = 0
    for n, m in zip(node_ids, messages):
        size = codec.message_nbytes(m)
        down += size
        log({"dir": "down", "kind": f"query.{action}", "round": round_, "client": clients.get(n), "bytes": size,
             "arrays": {}})
    ids = {mid: n for mid, n in zip(grid.push_messages(messages), node_ids) if mid is not None}
    out: dict[int, Message] = {}
    end = time.monotonic() + timeout
    while len(out) < len(ids) and time.monotonic() < end:
        for m in grid.pull_messages([i for i, n in ids.items() if n not in out]):
            node = ids[m.metadata.reply_to_message_id]
            out[node] = m
            size = codec.message_nbytes(m)
            up += size
            log({"dir": "up", "kind": f"query.{action}", "round": round_, "client": clients.get(node),
                 "bytes": size, "arrays": {}, **({"error": m.error.reason} if m.has_error() else {})})
        if len(out) < len(ids):
            time.sleep(poll)
    return out, down, up


def discover(grid: Grid, num_clients: int, timeout: float, poll: float, hello: Mapping[str, Any],
             log: MessageLog | None = None) -> tuple[dict[int, int], dict[int, str], int, int]:
    """Find the SuperNode of each client: every node answers a ``hello`` query with the client it serves
    (its node config ``partition-id``) once it has built its experiment. Waits until all ``num_clients``
    clients have a node or ``timeout`` s passed. Returns ({client: node id}, {node id: why it cannot serve},
    bytes sent, bytes received)."""
    clients: dict[int, int] = {}
    errors: dict[int, str] = {}
    asked: set[int] = set()
    down = up = 0
    end = time.monotonic() + timeout
    while len(clients) < num_clients and time.monotonic() < end:
        new = [n for n in grid.get_node_ids() if n not in asked]
        asked.update(new)
        if not new:
            time.sleep(poll)
            continue
        replies, d, u = query(grid, "hello", new, {}, max(1.0, end - time.monotonic()), poll, 0, hello, log)
        down, up = down + d, up + u
        for node, m in replies.items():
            if m.has_error():
                errors[node] = m.error.reason
                continue
            c = int(m.content[codec.HEADER]["client"])
            if not 0 <= c < num_clients:
                errors[node] = f"partition-id {c} is outside 0..{num_clients - 1} (data.num_clients = {num_clients})"
            elif c in clients:
                raise FedloraError(f"SuperNodes {clients[c]} and {node} both say they serve client {c} (partition-id)")
            else:
                clients[c] = node
        for node in set(new) - set(replies):
            errors[node] = "no answer to hello before the start-up timeout"
    return clients, errors, down, up
