"""FLoRA-NA: the server estimates B̂, Â from the uploaded factors so that B̂Â is as close as possible to the ideal
update Σ p_u B_u A_u (Nguyen et al. 2025), at FedIT's communication cost.

``method.na_estimator`` chooses the estimator:

With a per-client ``adapter.rank`` list (``"svd"`` only) the server computes the optimum at the largest rank and
each client receives its leading components, truncated to its own rank (the rank-r_u optimum: Eckart–Young), as
FlexLoRA does; the two then differ only in how each component is split between B and A.

- ``"svd"`` (default): the exact rank-r optimum (truncated SVD of the ideal update, computed from QR factors of
  the stacked uploads, never forming a d×k matrix; :func:`fedlora.functional.flora_na`). ``method.na_split``
  chooses how the optimal product is split into B̂ and Â (it changes the next round's training, not the product).
  The default ``"fedit-scale"`` was chosen on the replication's validation split (benchmarks/na_split.py, issue
  27); the earlier default ``"balanced"`` shrinks A to √σ of a small first update, which starves ∂L/∂B ∝ A.
- ``"paper"``: the authors' public-code estimator (:func:`fedlora.functional.flora_na_paper`): 2N scalars U, V
  shared by all layers, B̂ = B_g + Σ p_u V_u ΔB_u and Â = A_g + Σ p_u U_u ΔA_u from the previous global factors,
  fitted by 200 AdamW steps from FedIT's point, last iterate kept.
- ``"layer-mix"``: 2N scalars fitted per layer as a plain mix Σ β_u B_u, Σ α_u A_u, best iterate kept
  (:func:`fedlora.functional.flora_na_coefficients`); what fedlora called ``"coefficients"`` before it was
  found not to be the paper's form. Kept for comparison.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.config import Config
from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, Upload
from fedlora.registry import METHODS, Option

if TYPE_CHECKING:
    import torch


class FLoRANA(Method):
    name = "flora-na"
    description = "FLoRA-NA (Nguyen et al. 2025): server sends B̂, Â, the rank-r optimum of Σ p_u B_u A_u"
    default_share_head = True
    has_global_model = True
    needs = frozenset({"factors", "magnitude-free"})  # the product B·A is what is estimated
    provides = frozenset({"per-client-ranks"})  # "svd": the rank-max optimum, truncated to each client's rank
    options = (
        Option("na_estimator", "svd", "flora-na: 'svd' (exact rank-r optimum), 'paper' (the authors' code: 2N scalars "
               "shared by all layers) or 'layer-mix' (2N scalars per layer)", choices=("svd", "paper", "layer-mix")),
        Option("na_split", "fedit-scale", "flora-na: how B^A^ is split into two factors: 'balanced' (sqrt(sigma) on "
               "each), 'fedit-scale' (FedIT's norm ratio), 'orthonormal-a' (A orthonormal rows, sigma on B, as "
               "FlexLoRA) or 'a-row-norm' (A's rows at the uploaded A's mean row norm)",
               choices=("balanced", "fedit-scale", "orthonormal-a", "a-row-norm")),
    )

    @classmethod
    def check_config(cls, config: Config) -> str | None:
        if isinstance(config.adapter.rank, tuple) and config.method.na_estimator != "svd":
            return (f"a per-client adapter.rank needs method.na_estimator = 'svd' (the {config.method.na_estimator!r} "
                    f"estimator mixes factors of one shape)")
        return None

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        from fedlora import functional as F

        uploads = self.rescaled(uploads)  # per-client ranks: s·B_u·A_u is client u's update (identity otherwise)
        w = self.weights(uploads)
        payload = self.average(uploads, self.head_keys())
        estimator = self.config.method.na_estimator
        layers = list(self.layer_factors(uploads))
        if estimator == "paper":  # one set of 2N scalars for every layer, anchored on the global factors
            estimates = F.flora_na_paper([(Bs, As, global_state[b_key], global_state[a_key])
                                          for _, a_key, b_key, Bs, As in layers], w)
            for (_, a_key, b_key, _, _), (B, A) in zip(layers, estimates):
                payload[b_key], payload[a_key] = B, A
        for _, a_key, b_key, Bs, As in layers if estimator != "paper" else ():
            if estimator == "svd":  # at the global adapter's (largest) rank
                payload[b_key], payload[a_key] = F.flora_na(Bs, As, w, rank=int(global_state[a_key].shape[0]),
                                                            split=self.config.method.na_split)
            else:  # "layer-mix"
                payload[b_key], payload[a_key] = F.flora_na_coefficients(Bs, As, w)
        return Broadcast(payload=payload, stats=self.agg_error(uploads, payload, global_state))

    def deliver(self, broadcast: Broadcast, state: Mapping[str, torch.Tensor]) -> Broadcast:
        """A client of a smaller rank receives the optimum truncated to its rank (the SVD's leading components)."""
        return self.truncated(broadcast, state)


METHODS.register(FLoRANA)
