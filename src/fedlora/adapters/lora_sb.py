"""LoRA-SB (Ponkshe et al. 2024), the parametrisation of Fed-SB: ΔW = s·B·R·A with B (d×r) and A (r×k) fixed and only
the r×r core R trained, built with PEFT's PSOFT tuner (``PsoftConfig``) with its orthogonality constraint and both
magnitude vectors off, which is exactly ΔW = s·B·(R − I)·A with a free r×r matrix R starting at I.

Why PSOFT: PEFT 0.21 has no LoRA-SB tuner, and PSOFT with ``psoft_orth=False, psoft_mag_a=False,
psoft_mag_b=False`` *is* a free r×r core between two frozen factors (``R − I`` is LoRA-SB's R, zero at the start).
Its B and A are not saved: PEFT rebuilds them when the adapter is loaded, from the SVD of the base weight
(B = U_r·Σ_r / s, A = V_rᵀ), so a saved adapter is one r×r tensor per layer (``psoft_R.weight``) and loads with
``PeftModel.from_pretrained`` on the same base model. Every client builds the same B and A from the same base
weights, so the one shared tensor, R, averages exactly: Σ p_u B(R_u − I)A = B(R̄ − I)A.

fedlora's reading, said in the README: LoRA-SB initialises B and A from the SVD of an approximation of the first
full fine-tuning step's gradient (computed on a few batches before training) and R from its singular values;
here B and A come from the SVD of the pretrained weight W0 (PSOFT's principal-subspace initialisation, which is
also what the Fed-SB code's ``find_and_initialize`` computes) and ΔW starts at zero. A gradient-based B and A
could not be saved by PEFT's PSOFT (its B and A are rebuilt from W0 at load), so an adapter trained from them
would not reload to the model that was evaluated.

R is neither an A side nor a B side (role ``"M"``). Only methods that declare ``core-sharing`` (Fed-SB) take this
kind: a method that shares A or B alone would have nothing to send.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedlora.adapters.kind import AdapterKind
from fedlora.registry import ADAPTERS

if TYPE_CHECKING:
    from fedlora.config import AdapterConfig


class LoRASB(AdapterKind):
    name = "lora-sb"
    description = "LoRA-SB: ΔW = (α/r)·B·(R − I)·A, B and A fixed (SVD of W0), only the r×r core R trained (PEFT PSOFT)"
    provides = frozenset({"core-factor"})
    needs = frozenset({"core-sharing"})  # a method that uploads the core R (Fed-SB)
    m_suffixes = (".psoft_R.weight",)
    side_names = ("A", "B")

    def scaling(self, cfg: AdapterConfig, rank: int) -> float:
        return cfg.alpha / rank  # PSOFT's scaling, psoft_alpha / r

    def peft_config(self, cfg: AdapterConfig, task_type: Any, rank: int) -> Any:
        from peft import PsoftConfig

        # A free r×r core (no Cayley orthogonality, no magnitude vectors); B and A from the full SVD of W0
        # (deterministic: every client and every reload builds the same ones from the same base weights).
        return PsoftConfig(task_type=task_type, r=rank, psoft_alpha=cfg.alpha, psoft_dropout=cfg.dropout,
                           target_modules=list(cfg.targets or ()), psoft_orth=False, psoft_mag_a=False,
                           psoft_mag_b=False, ab_svd_init="psoft_init", psoft_svd="full")


ADAPTERS.register(LoRASB())
