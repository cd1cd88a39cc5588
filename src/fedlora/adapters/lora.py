"""LoRA (Hu et al. 2022): ΔW = (α/r)·B·A; A (r×k) is the input side, B (d×r) the output side."""

from __future__ import annotations

from fedlora.adapters.kind import LoRAFamily
from fedlora.registry import ADAPTERS


class LoRA(LoRAFamily):
    name = "lora"
    description = "LoRA: ΔW = (α/r)·B·A"


ADAPTERS.register(LoRA())
