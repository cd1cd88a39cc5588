"""The method registry: ``get_method(name)`` and ``METHODS`` (name → class), one module per method.

Importing the registry must stay light (``fedlora methods`` lists it without torch, tested in
tests/test_speed.py): a method module imports torch, ``fedlora.functional`` and ``fedlora.adapters`` inside the
functions that compute, and only for type checking at module level.
"""

from __future__ import annotations

from fedlora.config import METHOD_NAMES
from fedlora.errors import ConfigError
from fedlora.methods.base import Broadcast, Method, Upload
from fedlora.methods.fedit import FedIT
from fedlora.methods.fedsa import FedSALoRA
from fedlora.methods.ffa import FFALoRA
from fedlora.methods.fedex import FedExLoRA
from fedlora.methods.flora import FLoRA
from fedlora.methods.flora_na import FLoRANA

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under ``cls.name`` (its name must be listed in config.METHOD_NAMES)."""
    if cls.name not in METHOD_NAMES:
        raise RuntimeError(f"method {cls.name!r} is not listed in fedlora.config.METHOD_NAMES")
    METHODS[cls.name] = cls
    return cls


for _cls in (FedIT, FFALoRA, FedSALoRA, FLoRANA, FedExLoRA, FLoRA):
    register(_cls)


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name = {name!r} is not available; choose one of: {', '.join(METHODS)}") from None


__all__ = ["Broadcast", "METHODS", "Method", "Upload", "get_method", "register"]
