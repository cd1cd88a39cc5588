"""rsLoRA (Kalajdzievski 2023): LoRA with the rank-stabilised scaling s = α/√r, so that larger ranks still learn."""

from __future__ import annotations

from fedlora.adapters.kind import LoRAFamily
from fedlora.registry import ADAPTERS


class RsLoRA(LoRAFamily):
    name = "rslora"
    description = "rank-stabilised LoRA: ΔW = (α/√r)·B·A"
    use_rslora = True


ADAPTERS.register(RsLoRA())
