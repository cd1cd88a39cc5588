"""FedDPA: a dual-personalizing adapter (Yang et al., NeurIPS 2024, arXiv:2403.19211; public code
github.com/Lydia-yang/FedDPA, which this module follows where the paper's text was not available to us).

Every client holds two LoRA adapters of the same rank on the same layers: a **global** adapter (ΔW_g = s·B_g·A_g),
trained, uploaded and averaged exactly as FedIT does (with its head, when the head is shared), and a **local**
adapter (ΔW_l = s·B_l·A_l) that never leaves the client. The global model is W0 + ΔW_g; client u's own model is

    W0 + (1 − α)·ΔW_g + α·ΔW_l                      (method.dpa_weighting = "fixed", α = method.dpa_alpha)

A round of client u (``method.dpa_schedule``):

* ``"iterative"`` (FedDPA-T, default): from round 2 on, the local adapter first trains for ``train.local_steps``
  in the forward W0 + (1 − α)·ΔW_g + α·ΔW_l with the global adapter (the one the round starts from) frozen;
  then the global adapter trains alone (W0 + ΔW_g), as in FedIT, and is uploaded. Round 1 trains the global adapter
  only (the public code's ``epoch > 0``: the local adapter starts once there is generic knowledge to start from).
* ``"finetune"`` (FedDPA-F): from round 2 on, the local adapter is reset to a copy of the global adapter the round
  starts from and fine-tuned alone (W0 + ΔW_l) for ``train.local_steps``, then the global adapter trains as above.
  The paper fine-tunes the local adapter once, after federated training ends; redoing it every round from the
  latest global adapter makes the last round's model that one, and every evaluated round comparable.

Instance-wise dynamic weighting (``method.dpa_weighting = "dynamic"``, FedDPA-D in the issue), as in the public
code's inference (``get_weight``): for an example x, with e(·) the last-layer hidden state of the model
W0 + ΔW_l and x_1..x_K (K = ``method.dpa_instances``) examples of the client's own training data,

    w_g(x) = w_max · (1/K) Σ_k cos(e(x), e(x_k)),   w_l(x) = 1 − w_g(x)      (w_max = method.dpa_dynamic_max)

and the client's model on x is W0 + w_g(x)·ΔW_g + w_l(x)·ΔW_l. Training is unchanged (fixed α).

Where we deviate or the sources are ambiguous:

* The paper's name FedDPA-F is the *fine-tuning* schedule and FedDPA-T the *training* (iterative) one; "fixed"
  vs "dynamic" is the separate choice of weights at inference (the paper reports FedDPA-F/T with dynamic weights).
* One α for training and fixed inference (the public code has two knobs, both 0.5 by default).
* Direction of the dynamic weight: the public code gives the *global* adapter the similarity-based weight, at most
  w_max = 0.5 (its ``half``), so the local adapter keeps at least half; we do the same. We could not check the
  paper's equation text, whose motivation (an example like the local data leans on the local adapter) reads the
  other way; ``dpa_dynamic_max = 1`` lets the similarity span the whole range.
* e(x) is the mean of the last hidden states over the example's real tokens (the code's ``avg``; its default
  ``last``, the last token, assumes left padding); the K reference examples are drawn once per client from
  (train.seed, client), not afresh for every test example, so that evaluations are reproducible.
* Dynamic weights are for classification: in generation a forward over prompt + response would see the answer.
* The task head (classification) belongs to the global adapter: trained in the global step, shared by default,
  frozen while the local adapter trains. The local adapter starts from its own seeded LoRA init (B = 0).

Communication is FedIT's exactly: only the global adapter (and shared head) goes up and down; ``agg_error`` is
FedIT's error on the global adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.config import Config
from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, Upload
from fedlora.registry import METHODS, Option

if TYPE_CHECKING:
    import torch

    from fedlora.adapters.core import AdapterInfo
    from fedlora.client import PrivateAdapter, PrivateStep


def dynamic_weights(batch: torch.Tensor, reference: torch.Tensor, max_weight: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """FedDPA's instance-wise weights (w_g, w_l), one pair per row of ``batch`` (n × h embeddings), given the
    embeddings of K reference examples of the client (K × h): w_g = max_weight · mean_k cos(batch_i, reference_k),
    w_l = 1 − w_g. Computed in float32 whatever the inputs."""
    import torch
    import torch.nn.functional as F

    b = F.normalize(batch.float(), dim=-1, eps=1e-12)
    r = F.normalize(reference.float(), dim=-1, eps=1e-12)
    w_g = max_weight * (b @ r.T).mean(dim=1)
    return w_g, torch.ones_like(w_g) - w_g


class FedDPA(Method):
    name = "feddpa"
    description = ("FedDPA (Yang et al. 2024): FedAvg of a global LoRA; each client also trains a local LoRA that never "
                   "leaves; its model mixes both (fixed or instance-wise weights)")
    default_share_head = True
    has_global_model = True
    sum_only = True  # the broadcast is the weighted mean of the uploads (the global adapter's)
    needs = frozenset({"factors", "magnitude-free"})  # the two adapters' ΔW = s·B·A are weighted and added
    options = (
        Option("dpa_weighting", "fixed", "feddpa: 'fixed' (W0 + (1-alpha)·dW_global + alpha·dW_local) or 'dynamic' "
               "(per-example weights from similarity to the client's training examples)", choices=("fixed", "dynamic")),
        Option("dpa_alpha", 0.5, "feddpa: weight of the local adapter (local training; fixed weighting)", gt=0, lt=1),
        Option("dpa_schedule", "iterative", "feddpa: 'iterative' (FedDPA-T: local then global adapter every round) or "
               "'finetune' (FedDPA-F: local adapter fine-tuned from the global one)", choices=("iterative", "finetune")),
        Option("dpa_dynamic_max", 0.5, "feddpa: largest weight of the global adapter with dynamic weighting", gt=0, le=1),
        Option("dpa_instances", 5, "feddpa: training examples a client compares each example with (dynamic)", ge=1),
    )

    def __init__(self, config: Config, info: AdapterInfo) -> None:
        super().__init__(config, info)
        self.alpha = float(config.method.dpa_alpha)

    @classmethod
    def check_config(cls, config: Config) -> str | None:
        # data.task may still be "auto" here: the same resolution as Config.resolved
        if config.method.dpa_weighting == "dynamic" and config._resolve_task() == "generation":
            return ("method.dpa_weighting = 'dynamic' is implemented for classification only (in generation the "
                    "weighting forward would see the response); use 'fixed'")
        return None

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        payload = self.average(uploads, self.shared_keys())
        return Broadcast(payload=payload, stats=self.agg_error(uploads, payload, global_state))

    # ---- the local adapter ------------------------------------------------------------------------------------
    def private_adapter(self) -> PrivateAdapter:
        from fedlora.client import PrivateAdapter

        dynamic = self.config.method.dpa_weighting == "dynamic"
        return PrivateAdapter(step=self.local_step, weights=self.mix,
                              reference_examples=int(self.config.method.dpa_instances) if dynamic else 0)

    def local_step(self, round_: int) -> PrivateStep | None:
        """How the local adapter trains in round ``round_`` (none in round 1)."""
        from fedlora.client import PrivateStep

        if round_ < 2:
            return None
        if self.config.method.dpa_schedule == "finetune":
            return PrivateStep(weights=(0.0, 1.0), from_shared=True)
        return PrivateStep(weights=(1.0 - self.alpha, self.alpha))

    def mix(self, batch: torch.Tensor | None, reference: torch.Tensor | None
            ) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """(w_g, w_l) of the client's own model: fixed, or per example (:func:`dynamic_weights`)."""
        if batch is None or reference is None:
            return 1.0 - self.alpha, self.alpha
        return dynamic_weights(batch, reference, float(self.config.method.dpa_dynamic_max))


METHODS.register(FedDPA)
