"""The typed messages of a federated round, and the fields of its record: declared once, imported by the methods,
the server, the clients, the checkpoint and both runtimes (none of which imports another runtime's internals).

* :class:`Upload`: a client's message to the server;
* :class:`RoundPlan`: what clients train and upload in a round (the method's ``plan``);
* :class:`BaseUpdate`: deltas for frozen base weights, each **dense** or **factored** (P, Q with delta = P·Q) as a
  type, not a name suffix; :meth:`BaseUpdate.to_tensors` / :meth:`BaseUpdate.from_tensors` are the one place its
  flat layout (for Flower messages and checkpoints) is written;
* :class:`Broadcast`: the server's message after a round;
* :data:`RECORD_FIELDS`: every field of a round's record in ``metrics.jsonl``, with its meaning. The round loop
  fills them, TensorBoard logs the metric ones, the README's table is this table.

Light to import: torch is needed only for type checking here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors in a message: numel × element size of what is actually in it."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class Upload:
    """One client's message to the server."""

    client: int
    payload: Mapping[str, torch.Tensor]
    num_examples: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return nbytes(self.payload)


@dataclass(frozen=True)
class MeanShare(Upload):
    """Under secure aggregation, client ``client``'s part in a round as the server holds it: the server never sees
    the client's upload, only the weighted mean of the uploads of the clients in the secure sum, so ``payload`` is
    that mean (Flower's SecAgg+ workflow hands its Strategy the same). For a ``sum_only`` method, aggregating the
    m shares of a round gives what aggregating the m uploads gives: a weighted mean of equal tensors is that tensor,
    and central DP's m / E[m] still counts m. ``sent`` is what the client sent in the round's SecAgg+ stages (key
    exchange, shares, masked vector; serialised): the bytes counted for it (fedlora.runtime.flower_secagg)."""

    sent: int = 0

    @property
    def nbytes(self) -> int:
        return self.sent


@dataclass(frozen=True)
class RoundPlan:
    """What clients do in one round, as the method plans it: the adapter keys they do not train (``frozen``) and
    the keys they upload (``upload``; the server validates every upload against exactly these)."""

    frozen: tuple[str, ...]
    upload: tuple[str, ...]


_FLAT = {"dense": "dense/", "P": "factor-P/", "Q": "factor-Q/"}  # flat layout of a BaseUpdate (wire, checkpoint)


@dataclass(frozen=True)
class BaseUpdate:
    """Deltas to add to frozen base weights (FedEx's residual, FLoRA's merge), keyed by the base parameter's name and
    in that parameter's own orientation. Each delta is sent in the cheaper of two forms: ``dense`` (the matrix) or
    ``factored`` (``(P, Q)`` whose product P·Q is the matrix)."""

    dense: Mapping[str, torch.Tensor] = field(default_factory=dict)
    factored: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.dense or self.factored)

    def params(self) -> list[str]:
        """The base parameters this update changes."""
        return sorted({*self.dense, *self.factored})

    def materialize(self) -> dict[str, torch.Tensor]:
        """Every delta as a dense matrix."""
        out = dict(self.dense)
        out.update({name: P @ Q for name, (P, Q) in self.factored.items()})
        return out

    @property
    def nbytes(self) -> int:
        return nbytes(self.to_tensors())

    def __or__(self, other: BaseUpdate) -> BaseUpdate:
        """The union of two updates of different parameters."""
        clash = set(self.params()) & set(other.params())
        if clash:
            raise ValueError(f"base updates overlap on {sorted(clash)[:3]}")
        return BaseUpdate({**self.dense, **other.dense}, {**self.factored, **other.factored})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The flat ``name -> tensor`` form sent in messages and stored in checkpoints."""
        out = {_FLAT["dense"] + name: t for name, t in self.dense.items()}
        for name, (P, Q) in self.factored.items():
            out[_FLAT["P"] + name], out[_FLAT["Q"] + name] = P, Q
        return out

    @classmethod
    def from_tensors(cls, flat: Mapping[str, torch.Tensor]) -> BaseUpdate:
        """The inverse of :meth:`to_tensors`; a key of no known form is an error naming it."""
        dense: dict[str, torch.Tensor] = {}
        ps: dict[str, torch.Tensor] = {}
        qs: dict[str, torch.Tensor] = {}
        for key, t in flat.items():
            for form, target in (("dense", dense), ("P", ps), ("Q", qs)):
                if key.startswith(_FLAT[form]):
                    target[key[len(_FLAT[form]):]] = t
                    break
            else:
                raise ValueError(f"base update entry {key!r} is neither dense nor a factor")
        if ps.keys() != qs.keys():
            raise ValueError(f"base update factors do not pair up: {sorted(ps.keys() ^ qs.keys())[:3]}")
        return cls(dense, {name: (ps[name], qs[name]) for name in ps})


@dataclass(frozen=True)
class Broadcast:
    """The server's message to every client after a round.

    ``payload`` holds adapter tensors (saved names) that replace the client's; ``base_update`` holds deltas for
    frozen base weights; ``reset_adapter`` tells clients to start the next round from a fresh adapter.
    """

    payload: Mapping[str, torch.Tensor]
    base_update: BaseUpdate = field(default_factory=BaseUpdate)
    reset_adapter: bool = False
    stats: Mapping[str, float] = field(default_factory=dict)
    # Set by the server: 1 for the first broadcast, then 2, 3, ... A client applies each version once.
    version: int = 0

    @property
    def nbytes(self) -> int:
        return nbytes(self.payload) + self.base_update.nbytes


@dataclass(frozen=True)
class RecordField:
    """A field of a round's record: its meaning, and its TensorBoard tag when it is a metric worth plotting."""

    help: str
    tensorboard: str | None = None


# Every field of a round's record (metrics.jsonl), in the order written. Evaluation fields are null in a round
# that is not evaluated; generation fields exist only for generation tasks; methods add their ``stats``
# (e.g. agg_error) and privacy adds its epsilon fields.
RECORD_FIELDS: dict[str, RecordField] = {
    "round": RecordField("round number; 0 is the evaluation before any training"),
    "train_loss": RecordField("example-weighted mean training loss of the valid uploads", "loss/train"),
    "participants": RecordField("clients whose update was aggregated"),
    "rejected": RecordField("clients whose update failed validation, with the reason"),
    "missing": RecordField("clients that did not reply (crash, timeout, divergence), with the reason"),
    "failed": RecordField("why the round failed (too few valid updates), else null"),
    "acc_global": RecordField("accuracy of the global model on the global test set", "accuracy/global"),
    "f1_global": RecordField("macro-F1 of the global model", "f1/global"),
    "loss_global": RecordField("loss of the global model on the global test set", "loss/global"),
    "acc_personal_mean": RecordField("mean accuracy of each client's own model on its own test split",
                                     "accuracy/personal_mean"),
    "acc_personal_weighted": RecordField("the same, weighted by test-split size", "accuracy/personal_weighted"),
    "f1_personal_mean": RecordField("mean macro-F1 of the clients' own models", "f1/personal_mean"),
    "clients": RecordField("each client's accuracy on its own test split"),
    "evaluated": RecordField("with train.eval_clients = k: the k clients evaluated this round (drawn from the seed "
                             "and round; the personal accuracies are over them), null in a round not evaluated; "
                             "absent when every client is evaluated"),
    "agg_error": RecordField("Σ over layers of ‖ideal − delivered‖_F / ‖ideal‖_F (methods with factors)",
                             "aggregation/error"),
    "bytes_up": RecordField("bytes of the uploads (numel × element size of what was sent)"),
    "bytes_down": RecordField("bytes of the protocol's broadcasts to the clients that trained"),
    "bytes_eval_sync": RecordField("bytes sent to clients that did not train, only to evaluate them"),
    "seconds": RecordField("wall-clock seconds of the round", "time/round_seconds"),
}
EVAL_FIELDS = ("acc_global", "f1_global", "loss_global", "acc_personal_mean", "acc_personal_weighted",
               "f1_personal_mean", "clients")
GEN_FIELDS = ("ppl_global", "ppl_personal_mean")  # generation tasks
# Code generation evaluated by HumanEval (a dataset declares them: DatasetSource.record_fields).
CODE_FIELDS = ("pass_at_1_global", "pass_at_1_personal_mean", "pass_at_1_clients")
for _name, _help in (("ppl_global", "response perplexity of the global model (generation)"),
                     ("ppl_personal_mean", "mean response perplexity of the clients' own models (generation)"),
                     ("pass_at_1_global", "HumanEval pass@1 of the global model (code generation)"),
                     ("pass_at_1_personal_mean", "mean HumanEval pass@1 of the clients' own models"),
                     ("pass_at_1_clients", "each client's HumanEval pass@1")):
    RECORD_FIELDS[_name] = RecordField(_help)
