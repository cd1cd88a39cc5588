"""LoRA-FAIR (Bian et al., ICCV 2025, "Federated LoRA fine-tuning with aggregation and initialization
refinement"): the server averages A and B as FedIT does, then refines B̄ with a correction ΔB so that (B̄ + ΔB)Ā
approaches the ideal update Σ p_u B_u A_u while B̄ + ΔB stays close to B̄, which keeps the next round's starting
point (every client restarts from the broadcast factors) consistent with what clients trained. FedIT's
communication: both factors up and down.

fedlora's reading, said in the README: the paper writes the objective with a generic similarity S(·,·) and a
regulariser λ‖ΔB‖ and solves it by gradient descent on the server; fedlora takes S = squared Frobenius distance
and λ‖ΔB‖_F², whose minimiser has a closed form computed from r×r matrices
(:func:`fedlora.functional.lora_fair`); ``method.fair_lambda`` is that ridge weight relative to the mean
eigenvalue of ĀĀᵀ, so its value is not the paper's λ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, Upload
from fedlora.registry import METHODS, Option

if TYPE_CHECKING:
    import torch


class LoRAFAIR(Method):
    name = "lora-fair"
    description = "LoRA-FAIR (Bian et al. 2025): FedIT's means with B̄ corrected so (B̄+ΔB)Ā nears Σ p_u B_u A_u"
    default_share_head = True
    has_global_model = True
    needs = frozenset({"factors", "magnitude-free"})  # the product B·A is what the correction targets
    options = (Option("fair_lambda", 0.01, "lora-fair: ridge weight keeping B̄+ΔB near B̄, relative to the mean "
                      "eigenvalue of ĀĀᵀ (0: least-squares B for Ā)", ge=0.0),)

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        from fedlora import functional as F
        w = self.weights(uploads)
        payload = self.average(uploads, self.head_keys())
        for _, a_key, b_key, Bs, As in self.layer_factors(uploads):
            payload[b_key], payload[a_key] = F.lora_fair(Bs, As, w, lam=float(self.config.method.fair_lambda))
        return Broadcast(payload=payload, stats=self.agg_error(uploads, payload, global_state))


METHODS.register(LoRAFAIR)
