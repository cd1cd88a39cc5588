"""A quantized frozen base (``model.quantization``): a causal LM whose linear layers bitsandbytes stores in 4-bit NF4
or 8-bit, prepared for LoRA training by PEFT's k-bit path (``prepare_model_for_kbit_training``), as in QLoRA.

Only the frozen base is quantized: adapters, their optimizer state and what is uploaded stay float32, and a saved
adapter is a plain PEFT adapter over the unquantized base (its ``base_model_name_or_path`` is the base's own id or
directory, never a quantized copy). bitsandbytes 0.50 has a CPU backend as well as CUDA (measured:
``benchmarks/quantized.py``, docs/generation.md); a device it does not list in ``supported_torch_devices`` is
refused here with the reason, as is a missing bitsandbytes.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from typing import Any, Callable

import torch
from torch import nn

from fedlora.errors import ModelError

BNB_INSTALL = "pip install --no-deps bitsandbytes==0.50.2"


def bnb_config(quantization: str, device: torch.device, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` ("nf4" or "int8") on ``device``, or a
    :class:`ModelError` saying why it cannot be used (bitsandbytes missing, a device its backends do not cover)."""
    key = f"model.quantization = {quantization!r}"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"{key} needs the package bitsandbytes, which is not installed: {BNB_INSTALL} "
                         "(or the extra: pip install 'fedlora[quantization]')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import bitsandbytes
        except Exception as e:  # a broken native library raises anything from OSError to RuntimeError
            raise ModelError(f"{key}: bitsandbytes is installed but does not import ({' '.join(str(e).split())}); "
                             f"reinstall it: {BNB_INSTALL}") from None
    supported = set(getattr(bitsandbytes, "supported_torch_devices", ()))
    if device.type not in supported:
        raise ModelError(f"{key}: bitsandbytes {bitsandbytes.__version__} has no backend for train.device "
                         f"{device.type!r} (it supports: {', '.join(sorted(supported)) or 'none'}); use "
                         "model.quantization = 'none'")
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        # Compute in the run's dtype (float32, or bf16 under train.dtype = bfloat16); the NF4 blocks are
        # dequantized to it per matmul.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"{key}: not a quantization (use 'none', 'nf4' or 'int8')")


def load_quantized(load: Callable[..., nn.Module], source: str, name_or_path: str, quantization: str,
                   device: torch.device, compute_dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """``load(source, quantization_config=..., device_map=device, **kwargs)`` prepared for k-bit training, with
    ``name_or_path`` (the unquantized base's id, "" for a model built in code) as what a saved adapter names."""
    config = bnb_config(quantization, device, compute_dtype)
    from peft import prepare_model_for_kbit_training

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load(source, quantization_config=config, device_map={"": device}, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        raise ModelError(f"model.quantization = {quantization!r}: cannot load {name_or_path or source!r} quantized "
                         f"on {device.type}: {' '.join(str(e).split())}") from None
    # Norms and embeddings to float32, input gradients on (the frozen embedding otherwise cuts the graph);
    # activation checkpointing is train.gradient_checkpointing's business, not switched on here.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On a CPU with avx512_bf16, bitsandbytes repacks a 4-bit weight in place at its first no-grad eval
            # forward (an inference-only layout, undone only when saving), which fails for layers narrower than
            # a 64-value block (tiny-llama) and leaves training and evaluation on two layouts: keep the one.
            module.support_avx512bf16_for_cpu = False
    model.config._name_or_path = name_or_path
    model.name_or_path = name_or_path
    return model.eval()


def quantize_built(model: nn.Module, quantization: str, device: torch.device, compute_dtype: torch.dtype
                   ) -> nn.Module:
    """A model built in code (tiny-llama), quantized: saved to a temporary directory and loaded back through
    transformers' bitsandbytes loader, the one path that quantizes (the weights are those of ``model``)."""
    with tempfile.TemporaryDirectory(prefix="fedlora-quantize-") as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        return load_quantized(type(model).from_pretrained, tmp, "", quantization, device, compute_dtype)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the modules bitsandbytes quantized (Linear4bit / Linear8bitLt), for tests and reports."""
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
