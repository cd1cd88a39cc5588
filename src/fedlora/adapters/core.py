"""PEFT glue shared by every adapter kind: attach an adapter, name each saved key's role, move state in and out.

A client's state is a dict of tensors keyed by PEFT's *saved* names (the keys of adapter_model.safetensors,
e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``). The saved name is a pure
function of the in-model parameter name: drop the adapter name (``.default``) and the ``modules_to_save``
wrapper. :func:`slots` maps each saved name to the live parameter so that swapping a client in is a copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from peft import PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from torch import nn

from fedlora.adapters.kind import AdapterKind, Role
from fedlora.config import AdapterConfig
from fedlora.errors import FedloraError
from fedlora.registry import ADAPTERS

State = dict[str, torch.Tensor]

# The task heads PEFT trains beside the adapter (its modules_to_save for sequence classification): the only
# tensors no adapter kind claims that are allowed in a client's state.
HEAD_MODULES = ("classifier", "score")


class UnclaimedTensor(FedloraError):
    """A saved adapter tensor that no registered adapter kind claims and that is not a task head."""


def kind_of(cfg: AdapterConfig) -> AdapterKind:
    """The registered adapter kind of an adapter section."""
    kind: AdapterKind = ADAPTERS.lookup(cfg.kind)
    return kind


def role(key: str) -> Role:
    """The role of a saved key: ``"A"`` (shared by FedSA), ``"B"`` (kept private by FedSA), ``"M"`` (another
    trainable of the adapter, e.g. DoRA's magnitude) as claimed by a registered kind, or ``"head"`` for the task
    head. Any other key raises :class:`UnclaimedTensor` naming it (it is never silently taken for a head)."""
    for _, kind in ADAPTERS.items():
        claimed = kind.claims(key)
        if claimed is not None:
            return claimed
    module = key.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
    # A head is one linear layer (BERT's classifier, Llama's score) or a module of them (RoBERTa's classifier.dense
    # and classifier.out_proj): its top-level module is a head module.
    if module in HEAD_MODULES or key.removeprefix("base_model.model.").split(".", 1)[0] in HEAD_MODULES:
        return "head"
    raise UnclaimedTensor(f"adapter tensor {key!r} is claimed by no adapter kind ({', '.join(ADAPTERS)}) and is not "
                          f"a task head ({', '.join(HEAD_MODULES)})")


def layer_of(key: str) -> str:
    """The adapted module a saved adapter key belongs to (the key without its kind's suffix)."""
    for _, kind in ADAPTERS.items():
        layer = kind.layer_of(key)
        if layer is not None:
            return layer
    raise ValueError(f"{key!r} is not an adapter key of any kind")


def layer_pairs(keys: list[str] | tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """``{layer: (A key, B key)}`` for every adapted layer among ``keys``; both sides must be present."""
    a = {layer_of(k): k for k in keys if role(k) == "A"}
    b = {layer_of(k): k for k in keys if role(k) == "B"}  # other trainables (DoRA's magnitude) are not factors
    if a.keys() != b.keys():
        raise ValueError(f"A and B keys do not pair up: {sorted(a.keys() ^ b.keys())}")
    return {layer: (a[layer], b[layer]) for layer in sorted(a)}


def scaling(cfg: AdapterConfig, rank: int | None = None) -> float:
    """s in ΔW = s·B·A of the section's kind (alpha/r for LoRA, alpha/sqrt(r) for rsLoRA, 1 for VeRA)."""
    return kind_of(cfg).scaling(cfg, rank if rank is not None else cfg.max_rank)


def peft_config(cfg: AdapterConfig, task_type: TaskType | None, rank: int | None = None) -> Any:
    """The PEFT config of an adapter section (``rank`` overrides a per-client list)."""
    return kind_of(cfg).peft_config(cfg, task_type, rank if rank is not None else cfg.max_rank)


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
    name = param_name.replace(f".modules_to_save.{adapter_name}.", ".").replace(f".{adapter_name}.", ".").removesuffix(
        f".{adapter_name}")
    for _, kind in ADAPTERS.items():
        for ending, saved in kind.saved_renames:
            if name.endswith(ending):
                return name[: -len(ending)] + saved
    return name


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


# ---- a second, private adapter on every client (a method's ``private`` spec: FedDPA's local adapter) ---------
# A client's state holds the private adapter's tensors beside the shared ones, under PRIVATE + the saved name; the
# method's AdapterInfo never lists them, so no plan uploads them and the server rejects any upload that has them.
PRIVATE = "private/"
PRIVATE_ADAPTER = "private"  # its PEFT adapter name in the one shared model


def add_private_adapter(peft_model: PeftModel, cfg: AdapterConfig) -> dict[str, nn.Parameter]:
    """Add the PEFT adapter :data:`PRIVATE_ADAPTER` (same kind, rank and targets as ``default``) and return its slots,
    ``{PRIVATE + saved name: live parameter}``, A and B only: the task head stays with the shared adapter (PEFT
    gives the new adapter a copy of the head, which is never trained, saved or used). Initialised like
    :func:`attach` but from ``adapter.seed + 1``, so that its A is not a copy of the shared adapter's A. The
    ``default`` adapter stays the only active one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        peft_model.add_adapter(PRIVATE_ADAPTER, peft_config(cfg, None))
    peft_model.set_adapter("default")
    live = {saved_name(n, PRIVATE_ADAPTER): p for n, p in peft_model.named_parameters()
            if f".{PRIVATE_ADAPTER}." in n and ".modules_to_save." not in n}
    return {PRIVATE + k: p for k, p in sorted(live.items()) if role(k) in ("A", "B")}


def private_part(state: Mapping[str, torch.Tensor]) -> State:
    """The private adapter's tensors of a client's state (keys keep their :data:`PRIVATE` prefix)."""
    return {k: v for k, v in state.items() if k.startswith(PRIVATE)}


def shared_part(state: Mapping[str, torch.Tensor]) -> State:
    """Everything of a client's state but its private adapter."""
    return {k: v for k, v in state.items() if not k.startswith(PRIVATE)}


class Mixing:
    """Both adapters in the forward, each with a weight on its ΔW: y = W0·x + w_s·s·B_s·A_s·x + w_p·s·B_p·A_p·x.

    A context manager over the live model. Each weight is a float, or a 1-D tensor with one weight per example of
    the batch (FedDPA's instance-wise weighting: set :attr:`weights` before each forward). It works through PEFT's
    own per-adapter ``scaling``: on entry both adapters become active on every LoRA layer (frozen: the caller sets
    ``requires_grad`` on what it trains), and a pre-hook on each layer sets ``scaling[name] = s · w`` shaped for
    that layer's input; on exit only ``default`` is active and every scaling is back to s.
    """

    def __init__(self, peft_model: PeftModel, shared: float | torch.Tensor, private: float | torch.Tensor) -> None:
        self.model = peft_model
        self.weights: tuple[float | torch.Tensor, float | torch.Tensor] = (shared, private)
        self._layers: list[tuple[nn.Module, dict[str, Any]]] = []
        self._base: dict[int, dict[str, Any]] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> Mixing:
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer) and PRIVATE_ADAPTER in module.lora_A:
                self._layers.append((module, dict(module.scaling)))
                self._base[id(module)] = self._layers[-1][1]
                module.set_adapter(["default", PRIVATE_ADAPTER], inference_mode=True)
                self._hooks.append(module.register_forward_pre_hook(self._scale))
        return self

    def _scale(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        base = self._base[id(module)]
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        # the output has the input's dimensions (a Linear layer), one more for token ids (an Embedding layer)
        ndim = 1 if x is None else x.dim() + int(not x.is_floating_point())
        for name, w in zip(("default", PRIVATE_ADAPTER), self.weights):
            if isinstance(w, torch.Tensor):  # one weight per example: (batch, 1, ..., 1) against the layer's input
                w = w.reshape(-1, *([1] * (ndim - 1)))
            module.scaling[name] = base[name] * w  # type: ignore[index]

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        for module, scaling in self._layers:
            module.scaling.update(scaling)  # type: ignore[union-attr]
            module.set_adapter(["default"], inference_mode=True)
        self._hooks, self._layers, self._base = [], [], {}
