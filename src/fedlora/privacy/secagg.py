"""Flower's SecAgg+ (Bell et al. 2020; ``flwr.server.workflow.SecAggPlusWorkflow`` on the server,
``flwr.client.mod.secaggplus_mod`` on each client) applied to fedlora uploads: the server learns only the weighted
mean of the uploads, never one of them. No cryptography is written here: key agreement, Shamir sharing, masking
and quantisation are Flower's.

This module runs one secure-aggregation round of fedlora uploads through Flower's workflow and mod, over any
Flower ``Grid`` (``InProcessGrid`` hands each message to the ClientApp in this process and keeps every message, so
that what travels can be inspected). It is **not yet wired into fedlora's Flower runtime**
(``runtime.kind = "flower"`` sends each upload in its own message through ``runtime/loop.py``), which is why
``privacy.secure_aggregation = true`` is still refused; docs/privacy.md says what is missing.

Only methods whose server needs the weighted mean of the uploads (``sum_only``: FedIT, FFA-LoRA, FedSA-LoRA) can
use it; the mean it returns feeds ``method.aggregate`` as a single upload.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# An upload in the form SecAgg+ sums: (tensors by saved name, weight). Weights are integers (num_examples).
Train = Callable[[int], tuple[Mapping[str, np.ndarray], int]]


def client_app(train: Train, keys: Sequence[str]) -> Any:
    """A Flower ClientApp, wrapped by ``secaggplus_mod``, whose train handler returns node ``node_id``'s upload
    (``train(node_id)``) as a FitRes of the arrays of ``keys`` in that order; the mod masks it before it leaves."""
    from flwr.app import Context, Message
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        payload, weight = train(context.node_id)
        fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.asarray(payload[k]) for k in keys]),
                        int(weight), {})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    return app


class InProcessGrid:
    """A Flower Grid that delivers each message to ``app`` with the Context of its node, in this process, and
    records every message both ways (``log``). A node in ``fail_at`` raises when that stage's message arrives
    (as a client dropping out mid-protocol)."""

    def __init__(self, app: Any, node_ids: Sequence[int], fail_at: Mapping[int, str] | None = None) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        if TaskIdentity._run_id is None:  # in this process the grid plays the ServerApp's task: Message() needs it
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.app = app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in node_ids}
        self.fail_at = dict(fail_at or {})
        self.log: list[tuple[str, int, Any]] = []  # (direction, node, message)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Sequence[Any], *, timeout: float | None = None) -> list[Any]:
        from flwr.app import Error, Message
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        replies = []
        for m in messages:
            # Flower serialises every message; in process each node must get its own copy (the workflow sends one
            # content object to all nodes, and the mod consumes what it reads).
            m = copy.deepcopy(m)
            m.metadata.__dict__["_message_id"] = m.object_id
            node = m.metadata.dst_node_id
            self.log.append(("down", node, m))
            stage = m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            try:
                if self.fail_at.get(node) == stage:
                    raise RuntimeError(f"node {node} dropped out at stage {stage}")
                reply = self.app(m, self.contexts[node])
            except Exception as e:  # noqa: BLE001 - Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=2, reason=str(e)), reply_to=m)
            self.log.append(("up", node, reply))
            replies.append(reply)
        return replies


def secure_mean(grid: Any, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]], *, num_shares: int | float,
                threshold: int | float, clipping_range: float = 8.0, max_weight: float = 1000.0,
                quantization_range: int = 1 << 22) -> dict[str, np.ndarray] | None:
    """One SecAgg+ round over every node of ``grid``: the weighted mean of their uploads (weights: their
    ``num_examples``), or None when fewer than ``threshold`` nodes completed the protocol. Entries are clipped to
    ±``clipping_range`` and quantised to ``quantization_range`` levels (Flower's parameters)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    nodes = grid.get_node_ids()
    manager = SimpleClientManager()
    for n in nodes:
        manager.register(GridClientProxy(n, grid, run_id=1))
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=len(nodes), min_available_clients=len(nodes))
    init = ndarrays_to_parameters([np.zeros(shapes[k], dtype=np.float32) for k in keys])
    state = RecordDict({MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(init, True),
                        MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: 1})})
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=state, run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    before = state.array_records[MAIN_PARAMS_RECORD]
    SecAggPlusWorkflow(num_shares, threshold, max_weight=max_weight, clipping_range=clipping_range,
                       quantization_range=quantization_range)(grid, context)
    after = context.state.array_records[MAIN_PARAMS_RECORD]
    if after is before or not isinstance(after, ArrayRecord):
        return None  # the protocol halted (too few nodes)
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after, keep_input=True))
    return {k: a for k, a in zip(keys, arrays, strict=True)}
