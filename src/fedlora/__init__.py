"""fedlora: federated fine-tuning of transformers with LoRA-family adapters.

The promised public surface is small: the config, the method registry, the functional core and the runtime
entry point. Everything else is importable but may change.
"""

from __future__ import annotations

from fedlora import functional
from fedlora.config import Config, load
from fedlora.errors import ConfigError, DataError, FedloraError, ModelError
from fedlora.methods import METHODS, Broadcast, Method, Upload, get_method

__version__ = "0.1.0"


def run(config: Config, out: str | None = None, progress: bool = False) -> dict:
    """Run ``config`` in the embedded simulation; write a run directory to ``out`` if given. Returns the summary."""
    from fedlora.report import RunDir
    from fedlora.runtime.simulation import run as _run

    return _run(config, RunDir(out) if out else None, progress=progress)


__all__ = ["Broadcast", "Config", "ConfigError", "DataError", "FedloraError", "METHODS", "Method", "ModelError",
           "Upload", "functional", "get_method", "load", "run"]
