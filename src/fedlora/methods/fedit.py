"""FedIT: FedAvg of A and B separately (and of the head). Inexact: B̄·Ā ≠ Σ p_u B_u A_u."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.registry import METHODS
from fedlora.protocol import Broadcast, Upload

if TYPE_CHECKING:
    import torch


class FedIT(Method):
    name = "fedit"
    description = "FedAvg of A and B separately (Zhang et al. 2024); global model W0 + s·B̄Ā, inexact"
    default_share_head = True
    has_global_model = True
    sum_only = True  # the broadcast is the weighted mean of the uploads

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        payload = self.average(uploads, self.shared_keys())
        return Broadcast(payload=payload, stats=self.agg_error(uploads, payload, global_state))


METHODS.register(FedIT)
