"""What a method is: which keys a client uploads, how the server turns uploads into a broadcast, and how a
client applies a broadcast to its own state. Nothing else (no transport, no training loop): both runtimes call
the same method objects, so no rule is written twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

from fedlora import functional as F
from fedlora.adapters import AdapterInfo, State, nbytes
from fedlora.config import Config


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
class Broadcast:
    """The server's message to every client after a round.

    ``payload`` holds adapter tensors (saved names) that replace the client's; ``base_update`` holds deltas
    to add to frozen base weights, keyed by the base parameter's name and in its own orientation (FedEx's
    residual, FLoRA's merge); ``reset_adapter`` tells clients to start the next round from a fresh adapter.
    """

    payload: Mapping[str, torch.Tensor]
    base_update: Mapping[str, torch.Tensor] = field(default_factory=dict)
    reset_adapter: bool = False
    stats: Mapping[str, float] = field(default_factory=dict)
    # Bytes of base_update as sent; a method may send a smaller factored form (FedEx), so it says how much.
    base_update_nbytes: int | None = None
    # Set by the server: 1 for the first broadcast, then 2, 3, ... A client applies each version once.
    version: int = 0

    @property
    def nbytes(self) -> int:
        base = nbytes(self.base_update) if self.base_update_nbytes is None else self.base_update_nbytes
        return nbytes(self.payload) + base


class Method(ABC):
    """Base class of an aggregation method. Subclasses set the class attributes and ``aggregate``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    default_share_head: ClassVar[bool] = True
    has_global_model: ClassVar[bool] = True
    adapters: ClassVar[tuple[str, ...]] = ("lora", "rslora", "vera")
    # True when every broadcast must reach every client (base-weight updates accumulate); False when the
    # latest broadcast alone brings a lagging client up to date.
    cumulative: ClassVar[bool] = False

    def __init__(self, config: Config, info: AdapterInfo) -> None:
        self.config = config
        self.info = info
        share = config.method.share_head
        self.share_head = self.default_share_head if share is None else share

    # ---- what is shared -------------------------------------------------------------------------------
    def adapter_keys(self) -> tuple[str, ...]:
        """A-side and B-side keys the method uploads (the head is added by :meth:`shared_keys`)."""
        return self.info.with_role("A", "B")

    def shared_keys(self) -> tuple[str, ...]:
        head = self.info.with_role("head") if self.share_head else ()
        return tuple(sorted(self.adapter_keys() + head))

    def frozen_keys(self) -> tuple[str, ...]:
        """Keys a client does not train (FFA-LoRA's A)."""
        return ()

    @property
    def global_model(self) -> bool:
        """Whether one global model exists to evaluate (needs a shared head when there is one)."""
        return self.has_global_model and (self.share_head or not self.info.with_role("head"))

    # ---- client side ----------------------------------------------------------------------------------
    def upload(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a client sends: exactly :meth:`shared_keys`, nothing private."""
        return {k: state[k] for k in self.shared_keys()}

    def apply(self, state: Mapping[str, torch.Tensor], broadcast: Broadcast) -> State:
        """A client's state after receiving ``broadcast``: shared tensors replaced, private ones kept."""
        new = dict(state)
        for k, v in broadcast.payload.items():
            new[k] = v.clone()
        return new

    # ---- server side ----------------------------------------------------------------------------------
    def weights(self, uploads: Sequence[Upload]) -> list[float]:
        """p_u before normalisation: training examples, or 1 each with ``weighting = "uniform"``."""
        if self.config.method.weighting == "uniform":
            return [1.0] * len(uploads)
        return [float(u.num_examples) for u in uploads]

    def average(self, uploads: Sequence[Upload], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Weighted mean of each key over the uploads."""
        w = self.weights(uploads)
        return {k: F.weighted_mean([u.payload[k] for u in uploads], w) for k in keys}

    @abstractmethod
    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        """Turn validated uploads into the broadcast. ``global_state`` is the server's current adapter."""
