"""fedlora: federated fine-tuning of transformers with LoRA-family adapters.

The promised public surface is small: the config, the method registry, the functional core and the runtime
entry point. Everything else is importable but may change.

``import fedlora`` is light: the config and the errors load at once; the parts that need torch (the functional
core, the method registry) load on first use (PEP 562 module ``__getattr__``), so that commands such as
``fedlora methods`` and ``fedlora config --keys`` answer without importing torch, transformers or peft.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from fedlora.config import Config, load
from fedlora.errors import ConfigError, DataError, FedloraError, ModelError

if TYPE_CHECKING:
    from fedlora import functional
    from fedlora.methods import METHODS, Broadcast, Method, Upload, get_method

__version__ = "0.1.0"

# PEFT imports bitsandbytes whenever it is installed (the [quantization] extra), and on a CPU with avx512_bf16
# bitsandbytes 0.50 then logs, at every import, that the optional `kernels` package (optimised 4-bit CPU kernels
# fetched from the Hub) is absent; it falls back to its own PyTorch code, which benchmarks/quantized.py measures.
# Not a problem of the run: that one record is dropped so that every fedlora command does not print it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))

# Public names loaded on first access: name -> the module that defines it.
_LAZY = {"functional": "fedlora.functional", "METHODS": "fedlora.methods", "Broadcast": "fedlora.methods",
         "Method": "fedlora.methods", "Upload": "fedlora.methods", "get_method": "fedlora.methods"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"fedlora.{name}" else getattr(module, name)
    globals()[name] = value  # later accesses skip this function
    return value


def run(config: Config, out: str | None = None, progress: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run ``config`` with the runtime it names (``runtime.kind``); write a run directory to ``out`` if given
    (``resume``: continue the run there). Returns the summary. Plugins are loaded by importing them first
    (or with :func:`fedlora.registry.load_plugin`)."""
    from fedlora.registry import RUNTIMES
    from fedlora.report import RunDir

    runtime = RUNTIMES.lookup(config.runtime.kind)
    summary: dict[str, Any] = runtime.run(config, RunDir(out, resume=resume) if out else None, progress=progress,
                                          resume=resume)
    return summary


__all__ = ["Broadcast", "Config", "ConfigError", "DataError", "FedloraError", "METHODS", "Method", "ModelError",
           "Upload", "functional", "get_method", "load", "run"]
