"""Adapter kinds (one module each: lora, rslora, vera, dora; the interface is :mod:`fedlora.adapters.kind`) and
the PEFT glue shared by all of them (:mod:`fedlora.adapters.core`: attach, roles, state in and out).

Importing this package is light: the glue (torch, PEFT) loads on first use of one of its names, so that the
registry can list the kinds without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Modules of this package that are not adapter kinds (the registry imports every other one as a kind plugin).
SHARED_MODULES = ("core", "kind")

_CORE = ("AdapterInfo", "LayerMeta", "Role", "State", "add_rank_adapters", "attach", "layer_of", "layer_pairs",
         "lora_layers", "nbytes", "peft_config", "projection_fingerprint", "rank_adapter_name", "read_state", "role",
         "saved_name", "scaling", "slots", "write_state", "kind_of", "PRIVATE", "PRIVATE_ADAPTER", "Mixing",
         "add_private_adapter", "private_part", "shared_part")


def __getattr__(name: str) -> Any:
    if name not in _CORE:
        raise AttributeError(f"module 'fedlora.adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module("fedlora.adapters.core"), name)
    globals()[name] = value
    return value


__all__ = list(_CORE)
