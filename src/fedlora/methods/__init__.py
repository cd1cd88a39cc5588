"""The built-in methods, one module each (every module of this package but :mod:`fedlora.methods.base`), each
registering its class in :data:`fedlora.registry.METHODS` (name → class) when the registry first loads them.

Importing the registry must stay light (``fedlora methods`` lists it without torch, tested in
tests/test_speed.py): a method module imports torch, ``fedlora.functional`` and ``fedlora.adapters`` inside the
functions that compute, and only for type checking at module level.
"""

from __future__ import annotations

from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, RoundPlan, Upload
from fedlora.registry import METHODS

# Modules of this package that are not methods (the registry imports every other one as a method plugin).
SHARED_MODULES = ("base",)

register = METHODS.register


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (a ConfigError naming the choices otherwise)."""
    cls: type[Method] = METHODS.lookup(name)
    return cls


__all__ = ["Broadcast", "METHODS", "Method", "RoundPlan", "Upload", "get_method", "register"]
