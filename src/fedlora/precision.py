"""The compute dtype and the attention implementation of a run: what ``train.dtype = "auto"`` and
``train.attention = "auto"`` become, and why.

``auto`` means "the best choice that fits the whole run": bf16 where the device has fast bf16 units, unless a
feature of the run needs float32 (:meth:`fedlora.config.Config.float32_needs`: DP-SGD today), in which case float32.
The choice and its reason are written to the run's ``config.toml`` (a comment above the values) and
``summary.json``, so every figure says which dtype produced it. An explicit ``"bfloat16"`` with a feature that
needs float32 is refused at config time (``Config.__post_init__``), never silently changed.

``FEDLORA_AUTO_DTYPE`` (``float32`` | ``bfloat16``) overrides what the *hardware* answer of ``auto`` is, and is
read only here. The test suite sets it to ``float32`` so that every comparison in it runs one dtype on every
machine (with or without bf16 units), and sets it to ``bfloat16`` in the tests that check the bf16 paths
(resume, conformance) on machines whose bf16 is emulated. Features that need float32 still win over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fedlora.errors import ConfigError

AUTO_DTYPE_ENV = "FEDLORA_AUTO_DTYPE"
DTYPES = ("float32", "bfloat16")

# CPU features that make bf16 matrix products faster than float32: AMX tiles (Intel Sapphire Rapids and later) and
# the AVX512-BF16 dot-product instructions (Intel Cooper Lake, AMD Zen 4 and later). Without them PyTorch still
# computes in bf16, by converting to float32 around every product, which is slower than float32 throughout
# (measured by benchmarks/throughput.py on an AVX2-only AMD EPYC: see the README's Benchmarks).
FAST_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags: /proc/cpuinfo on Linux, else what PyTorch's own CPU detection reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    found = set()
    for flag, probe in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)  # private helpers of torch.cpu; absent in some versions
        if check is not None and check():
            found.add(flag)
    return frozenset(found)


def has_fast_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 matrix products are faster than float32 on ``device``: a CUDA GPU with native bf16 (Ampere
    and later; emulated bf16 on older GPUs is not faster), or a CPU with :data:`FAST_BF16_CPU_FLAGS`."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return bool(FAST_BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))
    return False


def forced_auto() -> str | None:
    """What ``FEDLORA_AUTO_DTYPE`` forces the hardware answer of ``auto`` to be (None: unset)."""
    value = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if not value:
        return None
    if value not in DTYPES:
        raise ConfigError(f"environment variable {AUTO_DTYPE_ENV} = {value!r} is not a compute dtype; use "
                          f"{' or '.join(repr(d) for d in DTYPES)}, or unset it")
    return value


@dataclass(frozen=True)
class DtypeChoice:
    """The resolved ``train.dtype`` and the reason, in words (written to config.toml and summary.json)."""

    dtype: str
    reason: str


def choose_dtype(name: str, device: torch.device, needs_float32: Sequence[str] = (),
                 flags: frozenset[str] | None = None) -> DtypeChoice:
    """``train.dtype``: an explicit dtype is kept; "auto" is float32 when the run has a feature that needs it
    (``needs_float32``: one phrase per feature, e.g. from ``Config.float32_needs``), else bf16 where
    :func:`has_fast_bf16` (or what ``FEDLORA_AUTO_DTYPE`` forces), else float32."""
    if name != "auto":
        return DtypeChoice(name, f"train.dtype = {name!r} was set explicitly")
    if needs_float32:
        return DtypeChoice("float32", "auto chose float32 because " + "; ".join(needs_float32))
    forced = forced_auto()
    if forced is not None:
        return DtypeChoice(forced, f"auto chose {forced} because {AUTO_DTYPE_ENV}={forced} is set")
    if has_fast_bf16(device, flags):
        where = "a CUDA GPU with native bf16" if device.type == "cuda" else \
            "a CPU with " + ", ".join(sorted(FAST_BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags)))
        return DtypeChoice("bfloat16", f"auto chose bfloat16: the device is {where}")
    return DtypeChoice("float32", f"auto chose float32: this {device.type} has no fast bf16 units "
                                  "(bf16 would be emulated, slower than float32)")


def resolve_dtype(name: str, device: torch.device, flags: frozenset[str] | None = None,
                  needs_float32: Sequence[str] = ()) -> str:
    """``train.dtype`` resolved (see :func:`choose_dtype`): never "auto"."""
    return choose_dtype(name, device, needs_float32, flags).dtype


def resolve_attention(name: str, device: torch.device, dtype: str) -> str:
    """``train.attention``: "auto" is the faster implementation for the device and dtype, as measured by
    benchmarks/throughput.py (one local step of minilm, batch 16 × 64 tokens, forward and backward):

    - CPU, bf16: "eager". PyTorch's SDPA has a slow bf16 backward on CPU: on a 2-core AMX machine it took about
      half of a 245 ms step, where the eager step takes 100 ms (issue 15).
    - CPU, float32: "sdpa", the default before issue 15. On the 2-core AVX2 machine (heavily loaded) eager was
      10-16% faster for minilm (4 of 5 alternating pairs) but sdpa 30% faster for SmolLM2 (118 s vs 169 s per
      step); switching minilm would also change the default demo's numerics and published figures.
    - CUDA: "sdpa" (fused attention kernels).
    """
    if name != "auto":
        return name
    return "eager" if device.type == "cpu" and dtype == "bfloat16" else "sdpa"
