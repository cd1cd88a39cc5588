"""Secure aggregation on the Flower runtime (``privacy.secure_aggregation = true``): the server learns only the
weighted mean of a round's uploads, through Flower's SecAgg+ (``SecAggPlusWorkflow`` and ``secaggplus_mod``, driven
by :func:`fedlora.privacy.secagg.secaggplus`; no cryptography here).

A round has two phases, both through the same SuperLink and SuperNodes:

1. **train** (fedlora's own message, unchanged on the way down): each sampled client receives its pending
   broadcasts, trains, checks its own upload (:func:`hold`: the keys of the round's plan, finite values, every
   entry within SecAgg+'s clipping range; the server cannot check them any more) and keeps it on its node
   (``context.state``); its reply is a *receipt*: the example count and the VeRA fingerprint, no tensor;
2. **SecAgg+** over the clients whose receipt arrived: the four stages of Flower's workflow; at its third stage
   each node's ``secaggplus_mod`` masks the held upload (:func:`held_upload`), weighted by its example count
   (``method.weighting = "samples"``) or by 1 (``"uniform"``), with the client's training loss as one more entry.
   The server unmasks only the sum.

:class:`SecureAggregation` is the :class:`~fedlora.runtime.loop.Transport` that does this, wrapped around
:class:`~fedlora.runtime.flower_transport.FlowerTransport`; the round loop is unchanged. What the loop receives
for each client in the sum is a :class:`~fedlora.protocol.MeanShare`: the round's mean, which is all the server
knows of that client's upload. For a ``sum_only`` method (the only kind the config admits) aggregating the shares
gives what aggregating the uploads would give, up to SecAgg+'s quantisation. A client that dropped out after its
receipt (during the SecAgg+ stages) is a :class:`~fedlora.errors.ClientFailure` of the round, like a client that
never answered; the others' sum survives while the threshold holds.
"""

from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence, cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora.errors import ClientFailure, FedloraError
from fedlora.privacy.secagg import Parameters, secaggplus
from fedlora.protocol import Broadcast, MeanShare, Upload
from fedlora.runtime import flower_codec as codec
from fedlora.runtime.loop import WrappedTransport

if TYPE_CHECKING:
    from fedlora.adapters import State
    from fedlora.runtime.flower_transport import FlowerTransport
    from fedlora.server import Server

HELD, HELD_META = "fedlora.secagg.upload", "fedlora.secagg.meta"  # context.state records (node-local)
# The training loss travels as one more summed entry, divided by this so that losses up to 4 × the clipping range
# (32: the log of a 10^13-token vocabulary) fit; its quantisation error is then 4 × 3.8e-6.
LOSS_SCALE = 4.0


# =========================================================================================== client side
def hold(context: Context, upload: Upload, keys: Sequence[str], round_: int, weighting: str,
         params: Parameters = Parameters()) -> RecordDict:
    """Keep ``upload`` on this node for round ``round_``'s SecAgg+ exchange, after the checks the server can no
    longer make; return the train reply, a receipt without any tensor."""
    reply = codec.upload_reply(upload, keys)  # refuses a key the plan does not upload, as without SecAgg
    if set(upload.payload) != set(keys):
        raise FedloraError(f"upload keys differ from round {round_}'s plan: {sorted(set(keys) ^ set(upload.payload))[:3]}")
    for k, t in upload.payload.items():
        if not bool(torch.isfinite(t).all()):
            raise FedloraError(f"refusing to take part in secure aggregation: {k} has non-finite values")
        if float(t.abs().max()) > params.clipping_range:
            raise FedloraError(f"refusing to take part in secure aggregation: {k} has entries beyond "
                               f"±{params.clipping_range:g}, which SecAgg+ would clip")
    loss = float(upload.meta.get("train_loss") or 0.0)
    if not (math.isfinite(loss) and abs(loss) <= LOSS_SCALE * params.clipping_range):
        raise FedloraError(f"refusing to take part in secure aggregation: training loss {loss!r}")
    weight = 1 if weighting == "uniform" else int(upload.num_examples)
    context.state[HELD] = reply["upload"]
    context.state[HELD_META] = ConfigRecord({"round": round_, "weight": weight, "loss": loss})
    meta = reply["meta"]
    if "train_loss" in meta:
        del meta["train_loss"]  # it goes into the secure sum
    return RecordDict({"upload": codec.to_arrays({}), "meta": meta})


def held_upload(message: Message, context: Context) -> Message:
    """The train handler under ``secaggplus_mod``: this node's held upload of the message's round as a FitRes
    (arrays by sorted key, then the scaled loss; ``num_examples`` = the weight)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    if HELD not in context.state.array_records:
        raise FedloraError(f"this node holds no upload of round {message.metadata.group_id} (restarted since?)")
    meta = {k: float(cast(float, v)) for k, v in context.state.config_records[HELD_META].items()}
    if int(meta["round"]) != int(message.metadata.group_id):
        raise FedloraError(f"this node holds the upload of round {int(meta['round'])}, not of round "
                           f"{message.metadata.group_id}")
    arrays = codec.from_arrays(context.state.array_records[HELD])
    vectors = [arrays[k].numpy() for k in sorted(arrays)] + [np.array([meta["loss"] / LOSS_SCALE])]
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(vectors), int(meta["weight"]), {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


def is_protocol_message(message: Message) -> bool:
    """Whether ``message`` is one of SecAgg+'s stages (the workflow's train messages carry its config record)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return message.metadata.message_type == "train" and RECORD_KEY_CONFIGS in message.content.config_records


def stage_of(message: Message) -> str:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    return str(message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])


def serve(message: Message, context: Context) -> Message:
    """A SecAgg+ stage on the client: Flower's mod around :func:`held_upload`. The held upload is forgotten once
    this node has sent its key shares (the unmask stage): it is never masked again after the server could unmask
    it, so no second sum over other nodes can be formed with it. Until then a new attempt of the round may mask it
    again with fresh keys (:class:`SecureAggregation` retries only when no key share reached the server)."""
    from flwr.client.mod import secaggplus_mod

    stage = stage_of(message)
    reply = secaggplus_mod(message, context, held_upload)
    if stage == "unmask" and HELD in context.state:
        del context.state[HELD], context.state[HELD_META]
    return reply


# =========================================================================================== server side
class Relay:
    """The Grid the SecAgg+ workflow talks to: Flower's ``send_and_receive`` over the round's Grid, pulling every
    ``poll`` s (Grid's own waits 3 s between pulls, four times a round), giving each message its own copy of the
    content (the workflow sends one object to many nodes, and in-process grids would share it), and logging every
    message with its serialised size."""

    def __init__(self, transport: FlowerTransport, clients: Mapping[int, int], round_: int,
                 timeout: float | None) -> None:
        self.t = transport
        self.clients = dict(clients)  # node id -> client
        self.round = round_
        self.timeout = timeout
        self.sent: dict[int, int] = {}  # node -> bytes it sent
        self.errors: dict[int, str] = {}  # node -> why it dropped out (stage: reason)
        self.masked: set[int] = set()  # nodes whose masked vector arrived in the current attempt
        self.shares = False  # whether any node answered the current attempt's unmask stage (sent key shares)

    def send_and_receive(self, messages: Sequence[Message], *, timeout: float | None = None) -> list[Message]:
        batch = [Message(copy.deepcopy(m.content), dst_node_id=m.metadata.dst_node_id,
                         message_type=m.metadata.message_type, group_id=m.metadata.group_id) for m in messages]
        stages = [stage_of(m) for m in batch]
        for m, stage in zip(batch, stages):
            size = codec.message_nbytes(m)
            self.t.wire_down += size
            self.t.log({"dir": "down", "kind": f"secagg.{stage}", "round": self.round,
                        "client": self.clients.get(m.metadata.dst_node_id), "bytes": size,
                        "arrays": codec.array_keys(m.content)})
        ids = list(self.t.grid.push_messages(batch))
        pending = {mid: (m.metadata.dst_node_id, stage) for mid, m, stage in zip(ids, batch, stages) if mid}
        for mid, m, stage in zip(ids, batch, stages):
            if not mid:
                self.errors[m.metadata.dst_node_id] = f"{stage}: the SuperLink did not accept the message"
        limit = timeout if timeout is not None else self.timeout
        end = time.monotonic() + limit if limit else None
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            for reply in self.t.grid.pull_messages(list(pending)):
                node, stage = pending.pop(reply.metadata.reply_to_message_id)
                size = codec.message_nbytes(reply)
                self.t.wire_up += size
                self.sent[node] = self.sent.get(node, 0) + size
                entry: dict[str, Any] = {"dir": "up", "kind": f"secagg.{stage}", "round": self.round,
                                         "client": self.clients.get(node), "bytes": size,
                                         "arrays": codec.array_keys(reply.content) if reply.has_content() else {}}
                if reply.has_error():
                    entry["error"] = self.errors[node] = f"{stage}: {reply.error.reason}"
                elif stage == "collect_masked_vectors":
                    self.masked.add(node)
                elif stage == "unmask":
                    self.shares = True
                self.t.log(entry)
                replies.append(reply)
            if pending:
                time.sleep(self.t.poll)
        for node, stage in pending.values():
            self.errors[node] = f"{stage}: no reply within {limit:g} s"
        return replies


class SecureAggregation(WrappedTransport):
    """A :class:`~fedlora.runtime.loop.Transport`: ``inner``'s train messages return receipts, then one SecAgg+
    round over the clients that sent one; each client in the secure sum is answered with a
    :class:`~fedlora.protocol.MeanShare`. Evaluation is ``inner``'s."""

    def __init__(self, inner: FlowerTransport, server: Server, weighting: str, params: Parameters = Parameters()) -> None:
        super().__init__(inner)
        self.inner: FlowerTransport = inner
        self.server = server
        self.weighting = weighting
        self.params = params
        self.round = 0
        self._results: dict[int, Upload | ClientFailure] = {}

    def fit(self, client: int, broadcasts: Sequence[Broadcast], round_: int) -> Upload:
        if round_ != self.round:  # the round's first request: both phases for every sampled client
            self.round = round_
            self._results = self._secure_round(round_)
        result = self._results.pop(client, None)
        if result is None:
            raise ClientFailure(f"client {client} was not sampled in round {round_}")
        if isinstance(result, ClientFailure):
            raise result
        return result

    def _secure_round(self, round_: int) -> dict[int, Upload | ClientFailure]:
        t0 = time.perf_counter()
        out: dict[int, Upload | ClientFailure] = {}
        receipts: dict[int, Upload] = {}
        for c in self.server.sample(round_):
            try:
                receipt = self.inner.fit(c, self.server.pending(c), round_)
            except ClientFailure as e:
                out[c] = e
                continue
            if receipt.payload:  # a node that does not run with secure aggregation: its upload is not used
                out[c] = ClientFailure("sent its upload in the clear (is privacy.secure_aggregation set on its node?)")
                continue
            receipts[c] = receipt
        nodes = {self.inner.nodes[c]: c for c in receipts}
        max_weight = 1.0 if self.weighting == "uniform" else float(max((u.num_examples for u in receipts.values()),
                                                                        default=1))
        relay = Relay(self.inner, nodes, round_, self.params.timeout)
        taking_part = list(nodes)
        result = None
        t1, attempts = time.perf_counter(), 0
        while len(taking_part) >= 2:
            attempts += 1
            relay.masked, relay.shares = set(), False
            result = secaggplus(relay, taking_part, round_, self.params, max_weight=max_weight)
            # Flower 1.41's workflow halts when a node drops out before sending its key shares (at setup or
            # share_keys): at unmasking the others hold no share of its key. If no key share reached the server, it
            # cannot have unmasked anything, so SecAgg+ starts again (fresh keys and masks) over the nodes whose
            # masked vector arrived, or that did not drop out if none did: a strictly smaller set, so this ends.
            again = [n for n in taking_part if n in relay.masked] if relay.masked else \
                [n for n in taking_part if n not in relay.errors]
            if result is not None or relay.shares or len(again) == len(taking_part):
                break
            for n in again:
                relay.errors.pop(n, None)
            taking_part = again
        # the two phases' wall-clock seconds, for the cost of secure aggregation (benchmarks/privacy.py --secagg-cost)
        self.inner.log({"dir": "-", "kind": "secagg.round", "round": round_, "train_seconds": round(t1 - t0, 4),
                        "secagg_seconds": round(time.perf_counter() - t1, 4), "attempts": attempts,
                        "nodes": len(nodes), "summed": len(result.nodes) if result is not None else 0})
        if result is None:
            why = "it needs at least 2 clients" if len(taking_part) < 2 else "too few clients were left"
            for node, c in nodes.items():
                out[c] = ClientFailure(f"secure aggregation halted: {why}" + (
                    f" (this client dropped out at {relay.errors[node]})" if node in relay.errors else ""))
            return out
        reference = self.server.reference(next(iter(receipts)), round_)
        mean, loss = self._unpack(result.arrays, reference)
        for node, c in nodes.items():
            if node in result.nodes:
                u = receipts[c]
                out[c] = MeanShare(c, mean, u.num_examples, {**u.meta, "train_loss": loss}, sent=relay.sent.get(node, 0))
            else:
                out[c] = ClientFailure(f"dropped out of secure aggregation at {relay.errors.get(node, 'an unknown stage')}")
        return out

    @staticmethod
    def _unpack(arrays: Sequence[np.ndarray], reference: State) -> tuple[dict[str, torch.Tensor], float]:
        keys = sorted(reference)
        if len(arrays) != len(keys) + 1:
            raise ClientFailure(f"the secure sum has {len(arrays)} arrays, expected {len(keys) + 1}")
        mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(reference[k].shape).to(reference[k].dtype)
                for k, a in zip(keys, arrays)}
        return mean, float(np.asarray(arrays[-1]).reshape(-1)[0]) * LOSS_SCALE
