"""FedRot-LoRA (Zhang, Kim, Cha and Vikalo, ICML 2026, arXiv 2602.23638, "Mitigating rotational misalignment in
federated LoRA"): before averaging A and B, every client's factors are turned into a common latent frame by an r×r
orthogonal Procrustes rotation, (B_u, A_u) ← (B_u R_u, R_uᵀ A_u), which leaves each client's update B_u A_u
unchanged but makes the factors of different clients agree, so that FedIT's average B̄Ā loses less
(:func:`fedlora.functional.fedrot`). Communication is FedIT's exactly: clients upload A, B (and the head), the server
broadcasts the rotated means.

The reference frame is the global adapter the round started from (what every client of the round trained from), and
the side that is aligned alternates by round as in the authors' code (``method.rot_side = "alternate"``): no rotation
in round 1 (the reference is the initialisation, with B = 0), A in even rounds, B in odd rounds from round 3 on; "A" or
"B" aligns that side every round from round 2 (the authors' ablations). ``method.rot_lambda`` < 1 is the authors' soft
alignment: the rotation interpolated towards I, (1 − λ)·I + λ·R, projected back to the nearest orthogonal matrix.

fedlora's reading, said in the README: the rotation is computed on the server, from the uploaded factors and the
global adapter (the authors' clients compute it before uploading; the result is the same because the reference is
the broadcast the client started from, but the upload is then the client's own frame and the server does the r×r
work); with ``rot_lambda = 1`` the rotation may be a reflection (the Procrustes optimum over all orthogonal
matrices, as the authors' hard variant), with ``rot_lambda`` < 1 it is restricted to det +1 first (as their soft
variant). The server needs each client's factors, so central DP and secure aggregation do not fit (local DP does:
the rotation is post-processing of noised uploads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, Upload
from fedlora.registry import METHODS, Option

if TYPE_CHECKING:
    import torch


class FedRotLoRA(Method):
    name = "fedrot"
    description = ("FedRot-LoRA (Zhang et al. 2026): Procrustes-rotate each client's B, A into the global frame "
                   "(B_uA_u unchanged), then average A and B")
    default_share_head = True
    has_global_model = True
    needs = frozenset({"factors", "magnitude-free"})  # the rotation is of the factors of ΔW = s·B·A
    options = (
        Option("rot_side", "alternate", "fedrot: the side aligned to the global factors: 'alternate' (A in even "
               "rounds, B in odd rounds from 3, as the authors' code), 'A' or 'B' (every round from 2)",
               choices=("alternate", "A", "B")),
        Option("rot_lambda", 1.0, "fedrot: alignment strength in (0, 1]; 1 = the full Procrustes rotation, less = "
               "the authors' soft alignment towards the identity", gt=0.0, le=1.0),
    )

    def side(self, round_: int) -> str | None:
        """The side aligned in round ``round_`` (None: no alignment; round 1 starts from the initialisation)."""
        if round_ < 2:
            return None
        choice = str(self.config.method.rot_side)
        if choice != "alternate":
            return choice
        return "A" if round_ % 2 == 0 else "B"  # the authors' state t−1: odd states align A, even states B

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        from fedlora import functional as F

        rounds = {u.meta.get("round") for u in uploads}
        if len(rounds) != 1 or not isinstance(next(iter(rounds)), int):
            raise ValueError(f"fedrot needs every upload's round (Upload.meta['round']); got {sorted(map(str, rounds))}")
        side = self.side(int(next(iter(rounds))))  # type: ignore[arg-type]
        w = self.weights(uploads)
        others = [k for k in self.shared_keys() if k not in set(self.info.with_role("A", "B"))]
        payload = self.average(uploads, others)  # the head (and any other shared trainable): plain means
        lam = float(self.config.method.rot_lambda)
        for _, a_key, b_key, Bs, As in self.layer_factors(uploads):
            payload[b_key], payload[a_key] = F.fedrot(Bs, As, w, global_state[b_key], global_state[a_key], side, lam)
        return Broadcast(payload=payload, stats=self.agg_error(uploads, payload, global_state))


METHODS.register(FedRotLoRA)
