"""FedSA-LoRA: only the A side is shared and averaged; every client keeps its own B side (and head).

A learns what is common to all clients, B what is specific to one (Guo et al., ICLR 2025). Client u's model is
W0 + s·B_u·Ā. The same split applies to rsLoRA (s = α/√r) and to VeRA (λ_d shared, λ_b private). There is no
single global model: evaluation is personalized.

``method.share = "B"`` is the mirror image, FedDR-LoRA's split (ICML 2026) as issue 28 states it (fedlora could not
read that paper or its code, so nothing else of it is implemented): B (with DoRA's magnitude, which is
indexed by output features like B's rows) is shared and averaged, A stays with each client, whose model is
W0 + s·B̄·A_u (VeRA: λ_b shared, λ_d private). It is an option of this plugin rather than a plugin of its own
because the two differ in one thing only, which saved tensors the plan uploads: the server rule (a weighted mean),
the client rule (replace what was shared, keep the rest), the missing global model and what fits (every adapter
kind, central DP and secure aggregation) are the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.registry import METHODS, Option
from fedlora.protocol import Broadcast, Upload

if TYPE_CHECKING:
    import torch


class FedSALoRA(Method):
    name = "fedsa"
    description = "FedSA-LoRA (Guo et al. 2025): share and average A only, keep B and the head private"
    default_share_head = False
    has_global_model = False
    sum_only = True  # the broadcast is the weighted mean of the uploads
    options = (Option("share", "A", "fedsa: the side shared and averaged; 'A' (FedSA-LoRA) or 'B' (the mirror "
                      "image, FedDR-LoRA: B and DoRA's magnitude shared, A private)", choices=("A", "B")),)

    def adapter_keys(self) -> tuple[str, ...]:
        if self.config.method.share == "B":
            return self.info.with_role("B", "M")  # A and the head stay
        return self.info.with_role("A")  # B, DoRA's magnitude (fedlora.adapters.dora says why) and the head stay

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        return Broadcast(payload=self.average(uploads, self.shared_keys()))


METHODS.register(FedSALoRA)
