"""FLoRA-NA: the server estimates B̂, Â from the uploaded factors so that B̂Â is as close as possible to the ideal
update Σ p_u B_u A_u (Nguyen et al. 2025), at FedIT's communication cost.

``method.na_estimator = "svd"`` gives the exact rank-r optimum (truncated SVD of the ideal update, computed from
QR factors of the stacked uploads, never forming a d×k matrix); ``"coefficients"`` is the paper's public-code
estimator (2N scalars found by AdamW from the FedIT point), kept to compare against. ``method.na_split``
chooses how the optimal product is split into B̂ and Â (it changes the next round's training, not the product).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Broadcast, Method, Upload

if TYPE_CHECKING:
    import torch


class FLoRANA(Method):
    name = "flora-na"
    summary = "FLoRA-NA (Nguyen et al. 2025): server sends B̂, Â, the rank-r optimum of Σ p_u B_u A_u"
    default_share_head = True
    has_global_model = True
    adapters = ("lora", "rslora")

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        from fedlora import functional as F

        w = self.weights(uploads)
        payload = self.average(uploads, self.head_keys())
        for _, a_key, b_key, Bs, As in self.layer_factors(uploads):
            if self.config.method.na_estimator == "svd":
                payload[b_key], payload[a_key] = F.flora_na(Bs, As, w, split=self.config.method.na_split)
            else:
                payload[b_key], payload[a_key] = F.flora_na_coefficients(Bs, As, w)
        return Broadcast(payload=payload, stats=self.agg_error(uploads, payload, global_state))
