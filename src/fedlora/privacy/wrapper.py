"""Differential privacy as a wrapper around any method, in the spirit of Flower's DP strategy wrappers
(``DifferentialPrivacyClientSideFixedClipping`` and friends): the wrapped method keeps its own rule; the wrapper
adds clipping and noise where the data leaves a client (:meth:`PrivateMethod.privatize`) or where the server
releases the aggregate (:meth:`PrivateMethod.aggregate`), and the accounting (:meth:`PrivateMethod.round_fields`).

Which methods compose with which mode, and why (declared by each method's ``sum_only``):

- ``dp = "local"`` composes with every method. A client clips and noises the update of exactly the keys it
  uploads; whatever the server then computes is post-processing of noised uploads, so the guarantee holds for
  any server rule: FedIT/FFA/FedSA average them; FedSA noises only A (its B never leaves the client, so it
  needs no noise); FLoRA-NA's server-side SVD and FedEx's residual ΔW̄ − B̄Ā are computed from the noised
  factors; FLoRA stacks the noised factors (the stack then carries every client's noise, unaveraged).
- ``dp = "central"`` (DP-FedAvg) needs the server to use only the sum of the uploads: FedIT, FFA-LoRA,
  FedSA-LoRA. FLoRA-NA, FedEx and FLoRA combine individual clients' factors non-linearly (a product, an SVD,
  a stack), so noise on their sum protects nothing they compute; they are refused with that reason.
- ``dp_sgd`` composes with every method: it changes only local training (fedlora.privacy.dpsgd).
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from fedlora.methods.base import Broadcast, Method, RoundPlan, Upload
from fedlora.privacy import accounting
from fedlora.privacy.mechanism import digest, gaussian, generator, privatize_update

if TYPE_CHECKING:
    import torch

    from fedlora.adapters import State
    from fedlora.config import Config


class PrivateMethod(Method):
    """``inner`` with client-level DP (``privacy.dp``) and the accounting of ``privacy.dp_sgd``."""

    name = "private"
    description = "differential privacy around another method"

    def __init__(self, inner: Method, config: Config, train_sizes: Sequence[int]) -> None:
        self.inner = inner
        self.config = config
        self.info = inner.info
        self.share_head = inner.share_head
        self.privacy = config.privacy
        self.name = inner.name  # type: ignore[misc]  # the run is still the inner method's
        self.cumulative = inner.cumulative  # type: ignore[misc]
        self.changes_base = inner.changes_base  # type: ignore[misc]
        self.sum_only = inner.sum_only  # type: ignore[misc]
        # DP-FedAvg's accountant assumes Poisson sampling of clients; local DP needs no amplification.
        self.sampling = "poisson" if self.privacy.dp == "central" else inner.sampling  # type: ignore[misc]
        self.train_sizes = list(train_sizes)
        self.rate = config.clients_per_round / config.data.num_clients
        # Expected participants per round: the fixed denominator of DP-FedAvg's estimator (McMahan et al. 2018).
        self.expected = float(config.clients_per_round)
        seed = self.privacy.noise_seed
        self.seed = secrets.randbits(63) if seed < 0 else seed  # -1: unknown to anyone, new every run
        self._aggregations = 0

    # ---- everything the wrapper does not change is the inner method's ---------------------------------
    def adapter_keys(self) -> tuple[str, ...]:
        return self.inner.adapter_keys()

    def head_keys(self) -> tuple[str, ...]:
        return self.inner.head_keys()

    def shared_keys(self) -> tuple[str, ...]:
        return self.inner.shared_keys()

    def frozen_keys(self) -> tuple[str, ...]:
        return self.inner.frozen_keys()

    def layer_factors(self, uploads: Sequence[Upload]) -> Iterator[tuple[str, str, str, list[torch.Tensor],
                                                                          list[torch.Tensor]]]:
        return self.inner.layer_factors(uploads)

    @property
    def global_model(self) -> bool:
        return self.inner.global_model

    def plan(self, round_: int) -> RoundPlan:
        return self.inner.plan(round_)

    def upload(self, state: Mapping[str, torch.Tensor], round_: int) -> dict[str, torch.Tensor]:
        return self.inner.upload(state, round_)

    def apply(self, state: Mapping[str, torch.Tensor], broadcast: Broadcast) -> State:
        return self.inner.apply(state, broadcast)

    def deliver(self, broadcast: Broadcast, state: Mapping[str, torch.Tensor]) -> Broadcast:
        return self.inner.deliver(broadcast, state)

    def from_mean(self, mean: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        return self.inner.from_mean(mean, global_state)

    def weights(self, uploads: Sequence[Upload]) -> list[float]:
        return self.inner.weights(uploads)

    def agg_error(self, uploads: Sequence[Upload], delivered: Mapping[str, torch.Tensor],
                  fallback: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return self.inner.agg_error(uploads, delivered, fallback)

    # ---- client side: clip (and, locally, noise) the update before it leaves --------------------------
    def privatize(self, payload: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], round_: int,
                  client: int) -> dict[str, torch.Tensor]:
        p = self.privacy
        if p.dp == "off":
            return self.inner.privatize(payload, start, round_, client)
        std = p.noise_multiplier * p.clip_norm if p.dp == "local" else 0.0
        out, _ = privatize_update(payload, start, p.clip_norm, std, generator(self.seed, round_, client, 0x10CA1))
        return out

    # ---- server side: DP-FedAvg's noised mean ----------------------------------------------------------
    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        """``local``/``off``: the inner rule on the (already noised) uploads. ``central``: every update is clipped
        again (honest clients already did), rescaled so that the inner mean over the m uploads becomes
        Σ clip(Δ_u) / E[m], then N(0, (z·C / E[m])²) is added to each averaged tensor."""
        if self.privacy.dp != "central":
            return self.inner.aggregate(uploads, global_state)

        p = self.privacy
        # the keys of this round's plan (the server checked that every upload has exactly them)
        keys = tuple(sorted(uploads[0].payload)) if uploads else self.shared_keys()
        ref = {k: global_state[k] for k in keys}
        scale = len(uploads) / self.expected
        scaled = []
        for u in uploads:
            clipped, _ = privatize_update(u.payload, ref, p.clip_norm, 0.0, None)
            if scale != 1.0:
                clipped = {k: (ref[k].double() + (clipped[k].double() - ref[k].double()) * scale).to(ref[k].dtype)
                           for k in keys}
            scaled.append(replace(u, payload=clipped))
        broadcast = self.inner.aggregate(scaled, global_state)
        std = p.noise_multiplier * p.clip_norm / self.expected
        self._aggregations += 1
        if std == 0:
            return broadcast
        mean = self.inner.average(scaled, keys)  # the noise goes on the mean, before the method's post-processing
        noise = gaussian(mean, std, generator(self.seed, digest(ref), self._aggregations, 0xCE17))
        payload = {k: (v.double() + noise[k].to(v.device)).to(v.dtype) for k, v in mean.items()}
        return replace(self.inner.from_mean(payload, global_state), stats=broadcast.stats, version=broadcast.version)

    # ---- accounting ------------------------------------------------------------------------------------
    def round_fields(self, round_: int, sample: Callable[[int], Sequence[int]]) -> dict[str, Any]:
        """Cumulative ε after ``round_`` rounds at ``privacy.delta`` (null: no finite guarantee, noise 0):
        ``epsilon`` for client-level DP, ``epsilon_sgd_clients`` (and their maximum ``epsilon_sgd``) for DP-SGD.
        A sampled client counts as having taken part even when its reply was lost (it may have been sent)."""
        p = self.privacy
        out: dict[str, Any] = {}
        if p.dp == "off" and not p.dp_sgd:
            return out
        counts = [0] * len(self.train_sizes)
        for r in range(1, round_ + 1):
            for c in sample(r):
                counts[c] += 1
        if p.dp == "central":
            out["epsilon"] = _finite(accounting.central_epsilon(p.noise_multiplier, self.rate, round_, p.delta))
        elif p.dp == "local":
            out["epsilon"] = _finite(accounting.local_epsilon(p.noise_multiplier, max(counts, default=0), p.delta))
        if p.dp_sgd:
            t = self.config.train
            eps = {str(c): _finite(accounting.sgd_epsilon(p.dp_sgd_noise_multiplier, t.batch_size / n,
                                                          t.local_steps * k, p.delta))
                   for c, (n, k) in enumerate(zip(self.train_sizes, counts))}
            out["epsilon_sgd_clients"] = eps
            out["epsilon_sgd"] = None if None in eps.values() else max(eps.values(), default=0.0)
        out["delta"] = p.delta
        return out


def _finite(x: float) -> float | None:
    """JSON has no infinity: an unbounded ε (noise 0) is recorded as null."""
    return None if x == float("inf") else x


def wrap(method: Method, config: Config, train_sizes: Sequence[int]) -> Method:
    """``method`` wrapped by :class:`PrivateMethod` when ``config.privacy`` asks for DP, else ``method`` itself."""
    p = config.privacy
    if p.dp == "off" and not p.dp_sgd:
        return method
    return PrivateMethod(method, config, train_sizes)
