"""PEFT glue: build LoRA / rsLoRA / VeRA adapters, name each saved key's role, move adapter state in and out.

A client's state is a dict of tensors keyed by PEFT's *saved* names (the keys of adapter_model.safetensors,
e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``). The saved name is a pure
function of the in-model parameter name: drop the adapter name (``.default``) and the ``modules_to_save``
wrapper. :func:`slots` maps each saved name to the live parameter so that swapping a client in is a copy.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
from peft import LoraConfig, PeftModel, TaskType, VeraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

from fedlora.config import AdapterConfig

Role = Literal["A", "B", "head"]
State = dict[str, torch.Tensor]

# Saved-name markers of each side. VeRA: lambda_d scales the rank-r side (A side), lambda_b the output side.
_A_MARKERS = (".lora_A.", ".vera_lambda_d")
_B_MARKERS = (".lora_B.", ".vera_lambda_b")
_A_SUFFIXES = (".lora_A.weight", ".vera_lambda_d")
_B_SUFFIXES = (".lora_B.weight", ".vera_lambda_b")


def role(key: str) -> Role:
    """The role of a saved key: ``"A"`` (shared by FedSA), ``"B"`` (kept private by FedSA) or ``"head"``."""
    if any(m in key or key.endswith(m) for m in _A_MARKERS):
        return "A"
    if any(m in key or key.endswith(m) for m in _B_MARKERS):
        return "B"
    return "head"


def layer_of(key: str) -> str:
    """The adapted module a saved A/B key belongs to (the key without its LoRA/VeRA suffix)."""
    for suffix in _A_SUFFIXES + _B_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ValueError(f"{key!r} is not an A-side or B-side adapter key")


def layer_pairs(keys: list[str] | tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """``{layer: (A key, B key)}`` for every adapted layer among ``keys``; both sides must be present."""
    a = {layer_of(k): k for k in keys if role(k) == "A"}
    b = {layer_of(k): k for k in keys if role(k) == "B"}
    if a.keys() != b.keys():
        raise ValueError(f"A and B keys do not pair up: {sorted(a.keys() ^ b.keys())}")
    return {layer: (a[layer], b[layer]) for layer in sorted(a)}


def scaling(cfg: AdapterConfig, rank: int | None = None) -> float:
    """s in ΔW = s·B·A: alpha/r for LoRA, alpha/sqrt(r) for rsLoRA (1 for VeRA, whose scale is in the lambdas)."""
    r = rank if rank is not None else cfg.max_rank
    if cfg.kind == "lora":
        return cfg.alpha / r
    if cfg.kind == "rslora":
        return cfg.alpha / math.sqrt(r)
    return 1.0


def peft_config(cfg: AdapterConfig, task_type: TaskType, rank: int | None = None) -> LoraConfig | VeraConfig:
    """The PEFT config of an adapter section (``rank`` overrides a per-client list)."""
    r = rank if rank is not None else cfg.max_rank
    if cfg.kind == "vera":
        # One projection seed for every client: the frozen A_s, B_s must be identical everywhere.
        return VeraConfig(task_type=task_type, r=r, target_modules=list(cfg.targets), vera_dropout=cfg.dropout,
                          projection_prng_key=cfg.seed, save_projection=True, d_initial=cfg.vera_d_initial)
    return LoraConfig(task_type=task_type, r=r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.targets), use_rslora=cfg.kind == "rslora")


def attach(model: nn.Module, cfg: AdapterConfig, task_type: TaskType, rank: int | None = None) -> PeftModel:
    """Wrap ``model`` with an adapter whose random initialisation depends only on ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # LoRA's kaiming init of A uses the global generator; pin it
        try:
            peft_model = get_peft_model(model, peft_config(cfg, task_type, rank))
        except ValueError as e:
            from fedlora.errors import ConfigError

            raise ConfigError(f"adapter.targets = {list(cfg.targets)} cannot be adapted on this model: {e}") from None
    return peft_model


def rank_adapter_name(rank: int, default_rank: int) -> str:
    """The PEFT adapter name of a client of rank ``rank``: ``"default"`` at the model's own rank, else
    ``"rank<r>"`` (per-client ranks: one adapter per distinct rank, all in the one shared model)."""
    return "default" if rank == default_rank else f"rank{rank}"


def add_rank_adapters(peft_model: PeftModel, cfg: AdapterConfig, task_type: TaskType) -> dict[int, str]:
    """Add one PEFT adapter for each distinct rank of a per-client rank list other than the ``default`` one
    (rank ``cfg.max_rank``), initialised like :func:`attach`; ``{rank: adapter name}``. The ``default``
    adapter stays active."""
    ranks = sorted(set(cfg.rank)) if isinstance(cfg.rank, tuple) else [cfg.rank]
    names = {r: rank_adapter_name(r, cfg.max_rank) for r in ranks}
    for r, name in names.items():
        if name == "default":
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            peft_model.add_adapter(name, peft_config(cfg, task_type, r))
    peft_model.set_adapter("default")
    return names


def saved_name(param_name: str, adapter_name: str = "default") -> str:
    """PEFT's saved name of an in-model parameter name."""
    return param_name.replace(f".modules_to_save.{adapter_name}.", ".").replace(f".{adapter_name}.", ".").removesuffix(
        f".{adapter_name}")


def slots(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """``{saved name: live parameter}`` for every trainable adapter tensor (A, B and head)."""
    live = {saved_name(n, adapter_name): p for n, p in peft_model.named_parameters()
            if f".{adapter_name}." in n or n.endswith(f".{adapter_name}")}
    saved = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    # VeRA's frozen projections are saved too (save_projection=True) but are not per-client state.
    expected = {k for k in saved if not k.startswith("base_model.vera_")}
    if set(live) != expected:
        raise RuntimeError(f"PEFT saved names and live parameters disagree: {sorted(set(live) ^ expected)[:4]}")
    return dict(sorted(live.items()))


def read_state(slot_map: Mapping[str, nn.Parameter]) -> State:
    """A detached copy of every slot."""
    return {k: p.detach().clone() for k, p in slot_map.items()}


@torch.no_grad()
def write_state(slot_map: Mapping[str, nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the live parameters (in place: no reallocation, no optimizer surprises)."""
    for k, p in slot_map.items():
        p.copy_(state[k])


def projection_fingerprint(peft_model: PeftModel) -> str | None:
    """SHA-256 of VeRA's frozen projections (None for LoRA): every client must report the same value."""
    buffers = [(n, b) for n, b in peft_model.named_buffers() if ".vera_A." in n or ".vera_B." in n
               or n.endswith((".vera_A", ".vera_B"))]
    if not buffers:
        return None
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, buf in sorted(buffers, key=lambda x: x[0]):
        if buf.data_ptr() in seen:  # the projections are shared between layers; hash each once
            continue
        seen.add(buf.data_ptr())
        digest.update(buf.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class LayerMeta:
    """An adapted layer's frozen base weight: its parameter name, whether it is stored in×out (GPT-2's Conv1D,
    ``fan_in_fan_out``) rather than nn.Linear's out×in, and the adapter's scaling s on it."""

    base_param: str
    transposed: bool
    scaling: float


@dataclass(frozen=True)
class AdapterInfo:
    """What the methods need to know about an adapter's keys (and, for LoRA, its layers' base weights)."""

    keys: tuple[str, ...]
    roles: Mapping[str, Role]
    shapes: Mapping[str, tuple[int, ...]]
    layers: Mapping[str, LayerMeta] = field(default_factory=dict)

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> AdapterInfo:
        keys = tuple(sorted(state))
        return cls(keys=keys, roles={k: role(k) for k in keys}, shapes={k: tuple(state[k].shape) for k in keys},
                   layers=lora_layers(model, keys) if model is not None else {})

    def with_role(self, *roles: Role) -> tuple[str, ...]:
        return tuple(k for k in self.keys if self.roles[k] in roles)


def lora_layers(model: nn.Module, keys: tuple[str, ...], adapter_name: str = "default") -> dict[str, LayerMeta]:
    """:class:`LayerMeta` of every LoRA layer among ``keys`` (saved layer name → base weight), read from the model."""
    out = {}
    for key in keys:
        if not key.endswith(".lora_A.weight"):
            continue
        layer = layer_of(key)
        module = model.get_submodule(layer)
        out[layer] = LayerMeta(base_param=f"{layer}.base_layer.weight",
                               transposed=bool(getattr(module, "fan_in_fan_out", False)),
                               scaling=float(module.scaling[adapter_name]))
    return out


def nbytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors in a message: numel × element size of what is actually in it."""
    return sum(t.numel() * t.element_size() for t in payload.values())
