"""FlexLoRA (Bai et al., NeurIPS 2024, "Federated fine-tuning of large language models under heterogeneous tasks
and client resources"): clients may have different ranks (``adapter.rank`` a per-client list). The server forms the
weighted full-size update ΔW̄ = Σ p_u s_u B_u A_u (each client's own scaling s_u), takes its SVD, and sends each
client the truncation to the client's own rank, B = U_r Σ_r, A = V_rᵀ; clients continue training from it. The SVD
is computed from the stacked factors' QR factors (:func:`fedlora.functional.flexlora`), never forming a d×k matrix.

Bytes: each client receives only its own truncation (:meth:`deliver`), counted as sent. The global model (the
server's adapter, at the largest rank) is the rank-max truncation; ``agg_error`` is measured for it. fedlora's
reading, said in the README: with equal ranks this is FLoRA-NA's SVD estimator with the singular values put on B
instead of split evenly, so the two differ only in the next round's training dynamics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, Upload
from fedlora.registry import METHODS

if TYPE_CHECKING:
    import torch


class FlexLoRA(Method):
    name = "flexlora"
    description = "FlexLoRA (Bai et al. 2024): SVD of Σ p_u s_u B_u A_u, each client gets the truncation to its rank"
    default_share_head = True
    has_global_model = True
    needs = frozenset({"factors", "magnitude-free"})  # the product s·B·A is what is decomposed
    provides = frozenset({"per-client-ranks"})  # each client receives the truncation to its own rank

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        from fedlora import functional as F
        uploads = self.rescaled(uploads)
        w = self.weights(uploads)
        payload = self.average(uploads, self.head_keys())
        for _, a_key, b_key, Bs, As in self.layer_factors(uploads):
            rank = int(global_state[a_key].shape[0])  # the global adapter's (largest) rank
            payload[b_key], payload[a_key] = F.flexlora(Bs, As, w, rank=rank)
        return Broadcast(payload=payload, stats=self.agg_error(uploads, payload, global_state))

    def deliver(self, broadcast: Broadcast, state: Mapping[str, torch.Tensor]) -> Broadcast:
        return self.truncated(broadcast, state)


METHODS.register(FlexLoRA)
