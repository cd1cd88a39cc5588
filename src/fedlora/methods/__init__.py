"""The built-in methods, one module each, registered in :data:`fedlora.registry.METHODS` (name → class).

Importing the registry must stay light (``fedlora methods`` lists it without torch, tested in
tests/test_speed.py): a method module imports torch, ``fedlora.functional`` and ``fedlora.adapters`` inside the
functions that compute, and only for type checking at module level.
"""

from __future__ import annotations

from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, RoundPlan, Upload
from fedlora.methods.fedex import FedExLoRA
from fedlora.methods.fedit import FedIT
from fedlora.methods.fedsa import FedSALoRA
from fedlora.methods.ffa import FFALoRA
from fedlora.methods.flora import FLoRA
from fedlora.methods.flora_na import FLoRANA
from fedlora.registry import METHODS

register = METHODS.register

for _cls in (FedIT, FFALoRA, FedSALoRA, FLoRANA, FedExLoRA, FLoRA):
    register(_cls)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (a ConfigError naming the choices otherwise)."""
    cls: type[Method] = METHODS.lookup(name)
    return cls


__all__ = ["Broadcast", "METHODS", "Method", "RoundPlan", "Upload", "get_method", "register"]
