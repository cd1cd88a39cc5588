"""FedSA-LoRA: only the A side is shared and averaged; every client keeps its own B side (and head).

A learns what is common to all clients, B what is specific to one (Guo et al., ICLR 2025). Client u's model is
W0 + s·B_u·Ā. The same split applies to rsLoRA (s = α/√r) and to VeRA (λ_d shared, λ_b private). There is no
single global model: evaluation is personalized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.registry import METHODS
from fedlora.protocol import Broadcast, Upload

if TYPE_CHECKING:
    import torch


class FedSALoRA(Method):
    name = "fedsa"
    description = "FedSA-LoRA (Guo et al. 2025): share and average A only, keep B and the head private"
    default_share_head = False
    has_global_model = False
    sum_only = True  # the broadcast is the weighted mean of the uploads

    def adapter_keys(self) -> tuple[str, ...]:
        return self.info.with_role("A")  # B, DoRA's magnitude (fedlora.adapters.dora says why) and the head stay

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        return Broadcast(payload=self.average(uploads, self.shared_keys()))


METHODS.register(FedSALoRA)
