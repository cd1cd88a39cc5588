"""What an adapter kind is: the plugin interface every module of this package implements (one file per kind).

An :class:`AdapterKind` says how to build its PEFT config, its scaling s in ΔW = s·B·A, which of its saved tensors
are the A side (the rank-r input side), the B side (the output side) and other trainables (DoRA's magnitude),
and what it provides to methods (capabilities in :data:`fedlora.registry.CAPABILITIES`). A saved tensor that no
kind claims and that is not a task head is an error that names it (:func:`fedlora.adapters.core.role`).

Light to import: PEFT is imported inside :meth:`AdapterKind.peft_config` only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from fedlora.registry import Option

if TYPE_CHECKING:
    from fedlora.config import AdapterConfig

# The roles of a client's tensors. "A" and "B" are the two sides FedSA-LoRA tells apart; "M" is a trainable of
# the adapter that is neither (DoRA's magnitude vector); "head" is the task head PEFT trains beside the adapter.
Role = Literal["A", "B", "M", "head"]


class AdapterKind:
    """Base class of the adapter kinds; subclasses set the class attributes and :meth:`peft_config`."""

    name: ClassVar[str]
    description: ClassVar[str]
    provides: ClassVar[frozenset[str]] = frozenset()
    needs: ClassVar[frozenset[str]] = frozenset()
    options: ClassVar[tuple[Option, ...]] = ()
    default_lr: ClassVar[float] = 3e-3  # measured on the demo (README): learns past the majority class in 8 rounds
    # Saved-name endings of the tensors the kind trains, by role.
    a_suffixes: ClassVar[tuple[str, ...]] = ()
    b_suffixes: ClassVar[tuple[str, ...]] = ()
    m_suffixes: ClassVar[tuple[str, ...]] = ()
    side_names: ClassVar[tuple[str, str]] = ("A", "B")  # what tables and plots call the two sides
    # Saved names PEFT writes differently from the in-model name minus the adapter name: (ending, saved ending).
    saved_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def claims(self, key: str) -> Role | None:
        """The role of a saved key if this kind trains it, else None."""
        for role, suffixes in (("A", self.a_suffixes), ("B", self.b_suffixes), ("M", self.m_suffixes)):
            if key.endswith(suffixes):
                return role  # type: ignore[return-value]
        return None

    def layer_of(self, key: str) -> str | None:
        """The adapted module of a key this kind claims (the key without its suffix)."""
        for suffix in self.a_suffixes + self.b_suffixes + self.m_suffixes:
            if key.endswith(suffix):
                return key[: -len(suffix)]
        return None

    def scaling(self, cfg: AdapterConfig, rank: int) -> float:
        """s in ΔW = s·B·A."""
        return 1.0

    def peft_config(self, cfg: AdapterConfig, task_type: Any, rank: int) -> Any:
        """The PEFT config of this kind for ``cfg`` at ``rank``."""
        raise NotImplementedError


class LoRAFamily(AdapterKind):
    """LoRA and its variants that PEFT builds with ``LoraConfig``: ΔW = s·B·A on each target module."""

    provides = frozenset({"factors", "magnitude-free", "per-example-gradients"})
    a_suffixes = (".lora_A.weight",)
    b_suffixes = (".lora_B.weight",)
    use_rslora: ClassVar[bool] = False
    use_dora: ClassVar[bool] = False

    def scaling(self, cfg: AdapterConfig, rank: int) -> float:
        return cfg.alpha / math.sqrt(rank) if self.use_rslora else cfg.alpha / rank

    def peft_config(self, cfg: AdapterConfig, task_type: Any, rank: int) -> Any:
        from peft import LoraConfig

        return LoraConfig(task_type=task_type, r=rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.targets or ()), use_rslora=self.use_rslora, use_dora=self.use_dora)
