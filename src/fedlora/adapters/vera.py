"""VeRA (Kopiczko et al. 2024): ΔW = Λ_b·B_s·Λ_d·A_s with frozen random A_s, B_s shared by every client (one
projection seed, ``adapter.seed``, checked by fingerprint) and trainable vectors λ_d (length r: the A side) and
λ_b (length d: the B side). There are no low-rank factors to combine, so methods that need them refuse VeRA."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedlora.adapters.kind import AdapterKind
from fedlora.registry import ADAPTERS, Option

if TYPE_CHECKING:
    from fedlora.config import AdapterConfig


class VeRA(AdapterKind):
    name = "vera"
    description = "VeRA: ΔW = Λ_b·B_s·Λ_d·A_s, frozen shared random A_s, B_s; trains λ_d (A side), λ_b (B side)"
    default_lr = 1e-2  # the scaling vectors need a larger step than LoRA's factors (measured on the demo)
    a_suffixes = (".vera_lambda_d",)
    b_suffixes = (".vera_lambda_b",)
    side_names = ("λ_d", "λ_b")
    options = (Option("vera_d_initial", 0.1, "initial value of VeRA's lambda_d", gt=0),)

    def peft_config(self, cfg: AdapterConfig, task_type: Any, rank: int) -> Any:
        from peft import VeraConfig

        # One projection seed for every client: the frozen A_s, B_s must be identical everywhere.
        return VeraConfig(task_type=task_type, r=rank, target_modules=list(cfg.targets or ()), vera_dropout=cfg.dropout,
                          projection_prng_key=cfg.seed, save_projection=True, d_initial=cfg.vera_d_initial)


ADAPTERS.register(VeRA())
