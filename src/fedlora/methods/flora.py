"""FLoRA: stack the clients' factors, whose product is exactly the ideal update, merge s·B_stack·A_stack into
the base weights, and let every client start the next round from a fresh adapter (Wang et al. 2024).

Clients may have different ranks (``adapter.rank`` a per-client list): client u's update is s_u·B_u·A_u with its
own scaling s_u (alpha/r_u, or alpha/sqrt(r_u) for rsLoRA), so B_u is rescaled by s_u / s before stacking, where s
is the scaling of the global (largest-rank) adapter; the stacked product times s is then exactly Σ p_u s_u B_u A_u.

The merged update is sent in the cheaper of its dense and its stacked (factored) form; the bytes counted are
those of the form sent. The fresh adapter (A at a new PEFT-style random init, B = 0) is drawn from a generator
seeded by (adapter.seed, broadcast version), so server and clients agree without sending it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method, base_delta
from fedlora.registry import METHODS
from fedlora.protocol import BaseUpdate, Broadcast, Upload

if TYPE_CHECKING:
    import torch


class FLoRA(Method):
    name = "flora"
    description = "FLoRA (Wang et al. 2024): stack A, B exactly, merge into W0, fresh adapter each round"
    default_share_head = True
    has_global_model = True
    needs = frozenset({"factors", "magnitude-free"})  # stacked factors are merged into W0 as s·B·A
    provides = frozenset({"per-client-ranks"})  # stacking works for factors of any rank
    changes_base = True
    cumulative = True  # every merge must reach every client

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        from fedlora import functional as F

        uploads = self.rescaled(uploads)
        w = self.weights(uploads)
        payload = self.average(uploads, self.head_keys())
        base_update = BaseUpdate()
        delivered: dict[str, torch.Tensor] = {}
        for layer, a_key, b_key, Bs, As in self.layer_factors(uploads):
            B, A = F.flora_stack(Bs, As, w)
            base_update |= base_delta(self.info.layers[layer], B, A)
            delivered[b_key], delivered[a_key] = B, A
        return Broadcast(payload=payload, base_update=base_update, reset_adapter=True,
                         stats=self.agg_error(uploads, delivered, global_state))


METHODS.register(FLoRA)
