"""FFA-LoRA: A frozen at one shared random initialisation; only B (and the head) is trained and averaged.

Because every client has the same A, the average of B·A is exactly B̄·A: aggregation is exact for this
parametrisation. With VeRA the A side is λ_d, frozen at its shared initial value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.registry import METHODS
from fedlora.protocol import Broadcast, Upload

if TYPE_CHECKING:
    import torch


class FFALoRA(Method):
    name = "ffa"
    description = "FFA-LoRA (Sun et al. 2024): A frozen at a shared random init, only B trained and averaged"
    default_share_head = True
    has_global_model = True
    sum_only = True  # the broadcast is the weighted mean of the uploads

    def adapter_keys(self) -> tuple[str, ...]:
        return self.info.with_role("B", "M")  # DoRA's magnitude is trained and averaged with B

    def frozen_keys(self) -> tuple[str, ...]:
        return self.info.with_role("A")

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        payload = self.average(uploads, self.shared_keys())
        # Every client's A is the frozen global A, so Σ p_u B_u A = B̄A: the error is 0 up to rounding.
        return Broadcast(payload=payload, stats=self.agg_error(uploads, {**global_state, **payload}, global_state))


METHODS.register(FFALoRA)
