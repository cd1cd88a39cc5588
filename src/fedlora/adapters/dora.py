"""DoRA (Liu et al., ICML 2024): weight-decomposed LoRA, PEFT's ``use_dora=True``.

W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_c: LoRA's factors give the direction, a trainable magnitude vector m (one
entry per output feature, saved as ``lora_magnitude_vector``) rescales every output row. ΔW is therefore *not*
s·B·A: the methods that combine or merge products of factors (FedEx, FLoRA, FLoRA-NA) need the
``magnitude-free`` capability, which DoRA does not provide, and are refused at config time.

Where the magnitude goes (role ``"M"``): with FedIT it is averaged like A and B; with FFA-LoRA it is trained and
averaged with B (A stays frozen); with FedSA-LoRA it stays **private** with B. Our reasoning for FedSA-DoRA (a
combination no paper defines): m is indexed by output features, like B's rows, and FedSA-LoRA's finding is that the
output side carries what is specific to a client; sharing m would also average away each client's per-feature
scale, which is exactly what personalisation should keep. The README reports the measured accuracy.
"""

from __future__ import annotations

from fedlora.adapters.kind import LoRAFamily
from fedlora.registry import ADAPTERS


class DoRA(LoRAFamily):
    name = "dora"
    description = "DoRA: LoRA direction s·B·A with a trainable per-output magnitude (ΔW is not s·B·A)"
    provides = frozenset({"factors"})  # neither magnitude-free nor per-example gradients (Opacus)
    m_suffixes = (".lora_magnitude_vector",)
    # PEFT saves the magnitude parameter "...lora_magnitude_vector.<adapter>.weight" as "...lora_magnitude_vector".
    saved_renames = ((".lora_magnitude_vector.weight", ".lora_magnitude_vector"),)
    use_dora = True


ADAPTERS.register(DoRA())
