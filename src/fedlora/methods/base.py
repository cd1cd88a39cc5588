"""What a method is: which keys a client uploads, how the server turns uploads into a broadcast, and how a
client applies a broadcast to its own state. Nothing else (no transport, no training loop): both runtimes call
the same method objects, so no rule is written twice.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

from fedlora.config import Config
from fedlora.protocol import BaseUpdate, Broadcast, RoundPlan, Upload
from fedlora.registry import Option

if TYPE_CHECKING:  # torch, peft and the maths load when a method first computes, not when it is listed
    import torch

    from fedlora.adapters.core import AdapterInfo, LayerMeta, State
    from fedlora.client import PrivateAdapter


class Method(ABC):
    """Base class of an aggregation method. Subclasses set the class attributes and ``aggregate``."""

    name: ClassVar[str]
    description: ClassVar[str]
    # Capabilities (fedlora.registry.CAPABILITIES) the method needs from the adapter kind / provides to the run;
    # fedlora.registry.check_compatible is the one rule that decides what fits.
    needs: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    # The method's own config keys in [method] (fedlora.registry.Option), e.g. flora-na's na_estimator.
    options: ClassVar[tuple[Option, ...]] = ()
    default_share_head: ClassVar[bool] = True
    has_global_model: ClassVar[bool] = True
    # True when every broadcast must reach every client (base-weight updates accumulate); False when the
    # latest broadcast alone brings a lagging client up to date.
    cumulative: ClassVar[bool] = False
    # True when broadcasts change frozen base weights (a BaseUpdate: FedEx's residual, FLoRA's merge): the weights
    # are then part of the model a client serves (saved with its adapter, kept in float32 under bf16).
    changes_base: ClassVar[bool] = False
    # True when the broadcast is the weighted mean of the uploads, key by key (the server needs only their sum):
    # then central DP (noise on the sum) and secure aggregation (the server learns only the sum) fit the method.
    sum_only: ClassVar[bool] = False
    # How the server samples a round's clients: "fixed" (k of N without replacement) or "poisson" (each client
    # with probability k/N), which the privacy wrapper declares for central DP (what its accountant assumes).
    sampling: ClassVar[str] = "fixed"

    def __init__(self, config: Config, info: AdapterInfo) -> None:
        self.config = config
        self.info = info
        share = config.method.share_head
        self.share_head = self.default_share_head if share is None else share

    # ---- what is shared -------------------------------------------------------------------------------
    def adapter_keys(self) -> tuple[str, ...]:
        """Adapter keys the method uploads: A side, B side and other trainables such as DoRA's magnitude (the head
        is added by :meth:`shared_keys`)."""
        return self.info.with_role("A", "B", "M")

    def head_keys(self) -> tuple[str, ...]:
        """The classification head's keys, when the method shares the head (else none)."""
        return self.info.with_role("head") if self.share_head else ()

    def layer_factors(self, uploads: Sequence[Upload]) -> Iterator[tuple[str, str, str, list[torch.Tensor],
                                                                          list[torch.Tensor]]]:
        """``(layer, A key, B key, Bs, As)`` of every adapted layer over the uploads."""
        from fedlora.adapters import layer_pairs

        for layer, (a_key, b_key) in layer_pairs(self.adapter_keys()).items():
            Bs, As = factors(uploads, a_key, b_key)
            yield layer, a_key, b_key, Bs, As

    def shared_keys(self) -> tuple[str, ...]:
        return tuple(sorted(self.adapter_keys() + self.head_keys()))

    def frozen_keys(self) -> tuple[str, ...]:
        """Keys a client does not train (FFA-LoRA's A)."""
        return ()

    def private_adapter(self) -> PrivateAdapter | None:
        """A second adapter every client holds beside the shared one and never sends, with how it trains and how the
        two combine into the client's own model (:class:`fedlora.client.PrivateAdapter`: FedDPA's local adapter);
        None here. Asked once, when the experiment is built."""
        return None

    def plan(self, round_: int) -> RoundPlan:
        """Round ``round_``'s plan. The default is the same every round: train all but :meth:`frozen_keys`, upload
        :meth:`shared_keys`. A method whose clients do something else each round (RoLoRA alternates the side it
        trains and uploads) overrides this; the server, the clients and both runtimes follow the plan."""
        return RoundPlan(frozen=self.frozen_keys(), upload=self.shared_keys())

    @property
    def global_model(self) -> bool:
        """Whether one global model exists to evaluate (needs a shared head when there is one)."""
        return self.has_global_model and (self.share_head or not self.info.with_role("head"))

    @classmethod
    def check_config(cls, config: Config) -> str | None:
        """The method's own rule about a configuration its capabilities do not express (e.g. an option that works
        only with equal ranks): a reason to refuse it, or None. Called by fedlora.registry.check_compatible."""
        return None

    # ---- client side ----------------------------------------------------------------------------------
    def upload(self, state: Mapping[str, torch.Tensor], round_: int) -> dict[str, torch.Tensor]:
        """The tensors a client sends in round ``round_``: exactly the plan's upload keys, nothing private."""
        return {k: state[k] for k in self.plan(round_).upload}

    def privatize(self, payload: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], round_: int,
                  client: int) -> dict[str, torch.Tensor]:
        """What leaves the client: ``payload`` (the upload after training), given ``start`` (the same keys at the
        start of the round). The identity here; fedlora.privacy clips and noises the update."""
        return dict(payload)

    def round_fields(self, round_: int, sample: Callable[[int], Sequence[int]]) -> dict[str, Any]:
        """Fields a wrapper adds to round ``round_``'s record (fedlora.privacy: epsilon so far); ``sample(r)`` is
        the server's client sample of round r. None here."""
        return {}

    def apply(self, state: Mapping[str, torch.Tensor], broadcast: Broadcast) -> State:
        """A client's state after receiving ``broadcast``: shared tensors replaced, private ones kept; with
        ``reset_adapter``, A and B start afresh (FLoRA: the adapter was merged into the base weights)."""
        new = dict(state)
        if broadcast.reset_adapter:
            new.update(fresh_lora(state, self.info.with_role("A", "B"), self.config.adapter.seed, broadcast.version))
        for k, v in broadcast.payload.items():
            new[k] = v.clone()
        return new

    def agg_error(self, uploads: Sequence[Upload], delivered: Mapping[str, torch.Tensor],
                  fallback: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``agg_error``: Σ over layers of ‖ideal − delivered‖_F / ‖ideal‖_F, without forming d×k matrices
        (LoRA only: VeRA has no factors). ``delivered`` holds each layer's delivered B and A."""
        from fedlora import functional as F
        from fedlora.adapters import layer_pairs

        if not self.info.layers:
            return {}
        w = self.weights(uploads)
        total = 0.0
        for layer, (a_key, b_key) in layer_pairs(self.info.with_role("A", "B")).items():
            Bs, As = factors(uploads, a_key, b_key, fallback)
            total += F.relative_error(Bs, As, w, delivered[b_key], delivered[a_key])
        return {"agg_error": total}

    # ---- server side ----------------------------------------------------------------------------------
    def deliver(self, broadcast: Broadcast, state: Mapping[str, torch.Tensor]) -> Broadcast:
        """The message actually sent to a client whose adapter is ``state`` (its shapes say its rank): the
        broadcast itself here. Methods for clients of different ranks (FlexLoRA) send each its own truncation, with
        :meth:`truncated`. The server applies what it delivers, and counts its bytes."""
        return broadcast

    def truncated(self, broadcast: Broadcast, state: Mapping[str, torch.Tensor]) -> Broadcast:
        """``broadcast`` with every layer's factors, sent at the global (largest) rank R with scaling s and ordered
        by decreasing singular value, cut to the rank r of ``state``'s layer: B[:, :r]·(s / s_r) and A[:r], so that
        s_r·B'A' is the first r components of s·BA (its rank-r optimum)."""
        from fedlora.adapters import layer_pairs, scaling
        payload = dict(broadcast.payload)
        for a_key, b_key in layer_pairs(self.info.with_role("A", "B")).values():
            r = int(state[a_key].shape[0])
            if a_key not in payload or r == payload[a_key].shape[0]:
                continue
            factor = scaling(self.config.adapter) / scaling(self.config.adapter, r)
            payload[b_key] = (payload[b_key][:, :r] * factor).contiguous()
            payload[a_key] = payload[a_key][:r].contiguous()
        return replace(broadcast, payload=payload)

    def rescaled(self, uploads: Sequence[Upload]) -> list[Upload]:
        """The uploads with each B_u multiplied by s_u / s, where s_u is the scaling of client u's rank and s the
        global (largest-rank) adapter's, so that s·B_u·A_u is client u's update (the identity for equal ranks)."""
        from fedlora.adapters import layer_pairs, scaling
        pairs = layer_pairs(self.info.with_role("A", "B"))
        if not pairs:
            return list(uploads)
        first_a = next(iter(pairs.values()))[0]
        s = scaling(self.config.adapter)
        out = []
        for u in uploads:
            factor = scaling(self.config.adapter, int(u.payload[first_a].shape[0])) / s if first_a in u.payload else 1.0
            if factor == 1.0:
                out.append(u)
                continue
            payload = dict(u.payload)
            for _, b_key in pairs.values():
                payload[b_key] = payload[b_key] * factor
            out.append(replace(u, payload=payload))
        return out

    def weights(self, uploads: Sequence[Upload]) -> list[float]:
        """p_u before normalisation: training examples, or 1 each with ``weighting = "uniform"``."""
        if self.config.method.weighting == "uniform":
            return [1.0] * len(uploads)
        return [float(u.num_examples) for u in uploads]

    def average(self, uploads: Sequence[Upload], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Weighted mean of each key over the uploads."""
        from fedlora import functional as F

        w = self.weights(uploads)
        return {k: F.weighted_mean([u.payload[k] for u in uploads], w) for k in keys}

    @abstractmethod
    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        """Turn validated uploads into the broadcast. ``global_state`` is the server's current adapter."""

    def from_mean(self, mean: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        """For a ``sum_only`` method: the broadcast, given only the weighted mean of the round's uploads (key by key)
        and the global state. The mean itself here (FedIT, FFA, FedSA, RoLoRA); FedSVD re-factorises it. Central DP
        (noise added to the mean) and secure aggregation (the server learns only the sum) call this after their own
        step, so that a sum_only method's whole server rule is :meth:`average` then this."""
        return Broadcast(payload=dict(mean))


# ---- helpers shared by the methods that combine B and A ----------------------------------------------------

def factors(uploads: Sequence[Upload], a_key: str, b_key: str,
            fallback: Mapping[str, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(Bs, As) of one layer over the uploads; a side a method does not upload comes from ``fallback``."""
    def side(key: str) -> list[torch.Tensor]:
        return [u.payload[key] if key in u.payload else fallback[key] for u in uploads]  # type: ignore[index]

    return side(b_key), side(a_key)


def base_delta(meta: LayerMeta, P: torch.Tensor, Q: torch.Tensor) -> BaseUpdate:
    """The update s·P·Q of a base weight, in that weight's own orientation, in the cheaper of two forms: the dense
    matrix, or the factors (sP, Q) whose product is the dense matrix."""
    d, k, c = P.shape[0], Q.shape[1], P.shape[1]
    if c * (d + k) < d * k:
        if meta.transposed:  # Conv1D stores in×out: (sPQ)ᵀ = Qᵀ·(sPᵀ)
            return BaseUpdate(factored={meta.base_param: (Q.T.contiguous(), (meta.scaling * P.T).contiguous())})
        return BaseUpdate(factored={meta.base_param: ((meta.scaling * P).contiguous(), Q.contiguous())})
    dense = meta.scaling * (P @ Q)
    return BaseUpdate(dense={meta.base_param: (dense.T if meta.transposed else dense).contiguous()})


def fresh_lora(state: Mapping[str, torch.Tensor], keys: Sequence[str], seed: int, version: int) -> dict[str, torch.Tensor]:
    """A new LoRA initialisation for ``keys``: A ~ U(±1/√k) as PEFT's kaiming init, B = 0, from a generator seeded
    by (seed, version) so the server and every client draw the same one."""
    import torch

    from fedlora.adapters import role

    gen = torch.Generator().manual_seed(seed * 1_000_003 + version)
    out = {}
    for key in sorted(keys):
        t = state[key]
        if role(key) == "A":
            bound = 1.0 / math.sqrt(t.shape[1])
            out[key] = ((torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(t.dtype)
        else:
            out[key] = torch.zeros_like(t)
    return out
