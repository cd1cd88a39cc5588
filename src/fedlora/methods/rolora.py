"""RoLoRA (Chen et al. 2025, "Robust federated finetuning of LLMs via alternating optimization of LoRA"): rounds
alternate between the two factors. In odd rounds clients train and upload only B (with DoRA's magnitude), A frozen;
in even rounds only A, B frozen. With VeRA the sides are λ_b and λ_d. The frozen factor is the same global one on every client, so the average of the products is exactly the
product of the averages (Σ p_u B_u A = B̄A, Σ p_u B A_u = BĀ): aggregation is exact, and each round uploads one
side (about half of FedIT's bytes).

fedlora's reading, said in the README: the paper alternates the two updates; here one round is one half-step
(RoLoRA's round of two half-steps is two fedlora rounds, so compare methods at equal rounds *and* equal bytes). The
first round trains B: LoRA starts with B = 0, which makes A's gradient zero, so an A-first round would learn
nothing. The head (when shared) is trained and averaged every round. Because a round's broadcast carries only the
side that changed, every broadcast must reach every client (``cumulative``): a client that missed a round receives
the broadcasts it missed, not only the latest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, RoundPlan, Upload
from fedlora.registry import METHODS

if TYPE_CHECKING:
    import torch


class RoLoRA(Method):
    name = "rolora"
    description = "RoLoRA (Chen et al. 2025): odd rounds train and average B (A frozen), even rounds A; exact"
    default_share_head = True
    has_global_model = True
    # ΔW is linear in each side (LoRA's B and A, VeRA's λ_b and λ_d), so the alternation is exact for them; DoRA's
    # magnitude is trained and averaged with B (like FFA-LoRA), which is not exact (DoRA normalises the direction)
    # (so it needs no capability: every kind fits)
    cumulative = True  # a broadcast carries one side: a lagging client needs every one it missed
    sum_only = True  # the broadcast is the weighted mean of the uploads

    def plan(self, round_: int) -> RoundPlan:
        """Odd rounds (the first one included) train and upload B with A frozen; even rounds the reverse."""
        trained, frozen = (self.info.with_role("B", "M"), self.info.with_role("A")) if round_ % 2 == 1 else \
            (self.info.with_role("A"), self.info.with_role("B", "M"))
        return RoundPlan(frozen=frozen, upload=tuple(sorted(trained + self.head_keys())))

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        keys = tuple(sorted(uploads[0].payload))  # this round's plan (the server checked every upload against it)
        payload = self.average(uploads, keys)
        # the frozen side is the global one on every client: the error is 0 up to rounding
        return Broadcast(payload=payload, stats=self.agg_error(uploads, {**global_state, **payload}, global_state))


METHODS.register(RoLoRA)
