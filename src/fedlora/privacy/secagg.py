"""Flower's SecAgg+ (Bell et al. 2020; ``flwr.server.workflow.SecAggPlusWorkflow`` on the server,
``flwr.client.mod.secaggplus_mod`` on each client) applied to fedlora uploads: the server learns only the weighted
mean of the uploads, never one of them. No cryptography is written here: key agreement, Shamir sharing, masking
and quantisation are Flower's.

:func:`secaggplus` runs one SecAgg+ round of Flower's workflow over any object with Flower's ``send_and_receive``
and returns the weighted mean with the nodes in it; the Flower runtime drives it each round when
``privacy.secure_aggregation = true`` (:mod:`fedlora.runtime.flower_secagg`, which also holds the client side).
:func:`client_app`, :class:`InProcessGrid` and :func:`secure_mean` run one round in this process with every message
kept (tests, ``benchmarks/privacy.py --secagg``).

Only methods whose server needs the weighted mean of the uploads (``sum_only``) can use it; the config refuses the
others (fedlora.privacy.checks).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Parameters:
    """SecAgg+'s parameters (Flower's ``SecAggPlusWorkflow``). ``num_shares`` and ``threshold`` as floats are
    fractions: of the sampled nodes (each node's key is shared with that many neighbours, itself included) and of
    the shares (how many are needed to reconstruct a key). The defaults share with every sampled node (1.0, the
    SecAgg of Bonawitz et al. 2017 as a special case) and need half of the shares, at least 2: a round survives
    up to m − max(2, round(m/2)) of its m sampled nodes dropping out after the key exchange, and fewer than that
    many colluding nodes cannot unmask anyone. Every entry a client sends (its weighted upload) is clipped to
    ±``clipping_range`` and stochastically rounded to one of ``quantization_range`` levels, so the mean is exact
    to m · 2·clipping_range / quantization_range / (Σ weights / max_weight) per entry (3.8e-6 with the defaults
    and equal weights)."""

    num_shares: int | float = 1.0
    threshold: int | float = 0.5
    clipping_range: float = 8.0
    quantization_range: int = 1 << 22
    timeout: float | None = None  # seconds to wait for each stage's replies (None: until every node answered)

    def step(self) -> float:
        """One quantisation level: the largest rounding error of one entry of one client's weighted upload."""
        return 2 * self.clipping_range / self.quantization_range


@dataclass(frozen=True)
class SecureSum:
    """What the server learns from one SecAgg+ round: the weighted mean of the vectors of ``nodes`` (the nodes
    whose masked vector is in the sum; a node that dropped out after sending it is still in it, unmasked from its
    neighbours' shares)."""

    arrays: list[np.ndarray]
    nodes: tuple[int, ...]


def secaggplus(grid: Any, nodes: Sequence[int], round_: int, params: Parameters = Parameters(), *,
               max_weight: float = 1.0) -> SecureSum | None:
    """One SecAgg+ round of Flower's workflow over ``nodes`` of ``grid`` (anything with Flower's
    ``send_and_receive``): each node's ClientApp, wrapped by ``secaggplus_mod``, answers the round's train
    handler with a FitRes (its vectors and its weight ``num_examples`` ≤ ``max_weight``). Returns their weighted
    mean and the nodes in it, or None when the protocol halted (fewer than 2 nodes, or too few left for the
    threshold)."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, Parameters as FlwrParameters, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    captured: list[SecureSum] = []

    class _Capture(FedAvg):
        """Every sampled node gets an empty FitIns (the node trained already; what it sends is its held upload);
        ``aggregate_fit`` receives the unmasked mean in each result (the workflow's compatibility with Strategy)."""

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            ins = FitIns(FlwrParameters(tensors=[], tensor_type="numpy.ndarray"), {})
            return [(proxy, ins) for proxy in client_manager.all().values()]

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> tuple[Any, dict[str, Any]]:
            if results:
                captured.append(SecureSum(parameters_to_ndarrays(results[0][1].parameters),
                                          tuple(sorted(int(proxy.node_id) for proxy, _ in results))))
            return (results[0][1].parameters if results else None), {}

    manager = SimpleClientManager()
    for n in nodes:
        manager.register(GridClientProxy(n, grid, run_id=0))
    state = RecordDict({MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(ndarrays_to_parameters([]), True),
                        MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: round_})})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            config=ServerConfig(num_rounds=round_), strategy=_Capture(), client_manager=manager)
    SecAggPlusWorkflow(params.num_shares, params.threshold, max_weight=max_weight,
                       clipping_range=params.clipping_range, quantization_range=params.quantization_range,
                       timeout=params.timeout)(grid, context)
    return captured[0] if captured else None


def secure_mean(grid: Any, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]], *, num_shares: int | float,
                threshold: int | float, clipping_range: float = 8.0, max_weight: float = 1000.0,
                quantization_range: int = 1 << 22) -> dict[str, np.ndarray] | None:
    """One SecAgg+ round over every node of ``grid``: the weighted mean of their uploads (weights: their
    ``num_examples``), or None when fewer than ``threshold`` nodes completed the protocol. Entries are clipped to
    ±``clipping_range`` and quantised to ``quantization_range`` levels (Flower's parameters)."""
    result = secaggplus(grid, grid.get_node_ids(), 1, Parameters(num_shares, threshold, clipping_range,
                                                                 quantization_range), max_weight=max_weight)
    if result is None:
        return None
    return {k: a.reshape(shapes[k]) for k, a in zip(keys, result.arrays, strict=True)}
