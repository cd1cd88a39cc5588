"""Fed-SB (Singhal et al. 2025, "Fed-SB: a silver bullet for extreme communication efficiency and performance in
(private) federated LoRA fine-tuning", arXiv 2502.15436): every client trains only the r×r core R of a LoRA-SB
adapter (``adapter.kind = "lora-sb"``: ΔW = s·B·(R − I)·A with B and A fixed and the same on every client) and
uploads R; the server averages R̄ = Σ p_u R_u (:func:`fedlora.functional.fed_sb`). Because B and A are common,
Σ p_u s·B(R_u − I)A = s·B(R̄ − I)A: the average is exact, and an upload is r² numbers per adapted layer (plus the
head when it is shared), independent of the layer's size.

The server needs only the weighted sum of the uploads (``sum_only``), so central DP (noise on the mean) and secure
aggregation fit, as the paper's private experiments use.

fedlora's reading, said in the README: B and A come from the SVD of the pretrained weight (PEFT's PSOFT
initialisation: see :mod:`fedlora.adapters.lora_sb`) rather than from LoRA-SB's gradient approximation, and R starts
at I (ΔW = 0) rather than at the approximated first update's singular values; the paper's one-shot aggregation of
fully trained clients is fedlora's ``train.rounds = 1``, its multi-round variant every other ``train.rounds``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, Upload
from fedlora.registry import METHODS

if TYPE_CHECKING:
    import torch


class FedSB(Method):
    name = "fed-sb"
    description = "Fed-SB (Singhal et al. 2025): LoRA-SB's fixed B, A; only the r×r core R trained and averaged (exact)"
    default_share_head = True
    has_global_model = True
    needs = frozenset({"core-factor"})  # adapter.kind = "lora-sb"
    provides = frozenset({"core-sharing"})
    sum_only = True  # the broadcast is the weighted mean of the uploads

    def adapter_keys(self) -> tuple[str, ...]:
        return self.info.with_role("M")  # the cores R; LoRA-SB's B and A are fixed buffers, never state

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        from fedlora import functional as F

        w = self.weights(uploads)
        payload = self.average(uploads, self.head_keys())
        for key in self.adapter_keys():  # R̄ = Σ p_u R_u; exact because every client's B and A are the same
            payload[key] = F.fed_sb([u.payload[key] for u in uploads], w)
        return Broadcast(payload=payload)


METHODS.register(FedSB)
