"""FedSVD (Lee et al., NeurIPS 2025, "Adaptive orthogonalization for private federated learning with LoRA"): clients
train only B, with A frozen at the global A as in FFA-LoRA, and upload B. The server averages B̄ = Σ p_u B_u (exact:
every client used the same A, so Σ p_u B_u A = B̄A), then re-factorises B̄A = UΣVᵀ by SVD and broadcasts A' = Vᵀ (r×k,
orthonormal rows) and B' = UΣ (:func:`fedlora.functional.fedsvd`, from r×r matrices only). The model is unchanged by
the re-factorisation (B'A' = B̄A), but the frozen A that clients train B against next round now spans the principal
directions of the aggregate update: A adapts without being trained on clients, and its orthonormal rows bound B's
gradient, which is what the paper argues preserves signal under DP-SGD's clipping and noise.

fedlora's reading, said in the README: the re-factorisation runs every round; the first round's A is PEFT's
random initialisation (not orthonormalised); where B̄A has rank < r the missing rows of A' are completed inside the
previous A's row space (the paper does not say). The server needs only Σ p_u B_u, so central DP noises that mean
before the re-factorisation (:meth:`from_mean`) and secure aggregation fits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, Upload
from fedlora.registry import METHODS

if TYPE_CHECKING:
    import torch


class FedSVD(Method):
    name = "fedsvd"
    description = "FedSVD (Lee et al. 2025): train and average B on a frozen A, then re-factorise B̄A by SVD (A = Vᵀ)"
    default_share_head = True
    has_global_model = True
    needs = frozenset({"factors", "magnitude-free"})  # the product B·A is re-factorised
    sum_only = True  # the server needs only the weighted mean of the uploaded B's (then post-processes it)

    def adapter_keys(self) -> tuple[str, ...]:
        return self.info.with_role("B")

    def frozen_keys(self) -> tuple[str, ...]:
        return self.info.with_role("A")

    def from_mean(self, mean: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        from fedlora import functional as F
        from fedlora.adapters import layer_pairs
        payload = dict(mean)  # B̄ and the head
        for a_key, b_key in layer_pairs(self.info.with_role("A", "B")).values():
            payload[b_key], payload[a_key] = F.fedsvd([mean[b_key]], global_state[a_key], [1.0])
        return Broadcast(payload=payload)

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        broadcast = self.from_mean(self.average(uploads, self.shared_keys()), global_state)
        # every client trained against the global A: B'A' = B̄A = Σ p_u B_u A, error 0 up to rounding
        return Broadcast(payload=broadcast.payload,
                         stats=self.agg_error(uploads, {**global_state, **broadcast.payload}, global_state))


METHODS.register(FedSVD)
