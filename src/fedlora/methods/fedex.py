"""FedEx-LoRA: FedAvg of A and B, plus the residual ideal − B̄Ā folded into the frozen base weights, so the
global model is exactly W0 + s·Σ p_u B_u A_u (Singhal et al. 2025).

The residual is added with the adapter's scaling s (α/r, or α/√r for rsLoRA) and in the base weight's own
orientation (nn.Linear out×in, Conv1D in×out). It is FedIT's error Σ p_u (B_u − B̄)(A_u − Ā), whose rank is at
most (N−1)·r, and it is sent at that rank: in the cheaper of its dense d×k form and its exact factored form
with (N−1)·r columns (:func:`fedlora.functional.fedex_residual_factors`); the bytes counted are those of the
form sent. With a single participant the residual is zero and nothing is sent for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method, base_delta
from fedlora.registry import METHODS
from fedlora.protocol import BaseUpdate, Broadcast, Upload

if TYPE_CHECKING:
    import torch


class FedExLoRA(Method):
    name = "fedex"
    description = "FedEx-LoRA (Singhal et al. 2025): FedAvg of A, B plus the exact residual folded into W0"
    default_share_head = True
    has_global_model = True
    needs = frozenset({"factors", "magnitude-free"})  # the residual is Σ p_u B_u A_u − B̄Ā
    changes_base = True
    cumulative = True  # every residual must reach every client

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        import torch

        from fedlora import functional as F

        w = self.weights(uploads)
        payload = self.average(uploads, self.shared_keys())
        base_update = BaseUpdate()
        delivered: dict[str, torch.Tensor] = {}
        for layer, a_key, b_key, Bs, As in self.layer_factors(uploads):
            _, _, P, Q = F.fedex_residual_factors(Bs, As, w)
            if P.shape[1]:  # one client (or one of positive weight): B̄Ā is already exact
                base_update |= base_delta(self.info.layers[layer], P, Q)
            # what the clients' models now hold for this layer: B̄Ā + PQ = [B̄, P]·[Ā; Q]
            delivered[b_key] = torch.cat([payload[b_key], P], dim=1)
            delivered[a_key] = torch.cat([payload[a_key], Q], dim=0)
        return Broadcast(payload=payload, base_update=base_update,
                         stats=self.agg_error(uploads, delivered, global_state))


METHODS.register(FedExLoRA)
