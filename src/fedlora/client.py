"""Local training and evaluation of one client, independent of the runtime.

The trainer holds the one live model of the process; a client's state (its adapter tensors, keyed by saved
names) is copied into the model's adapter parameters, trained for a fixed number of steps and copied out.
All randomness of a client's round (batch order, dropout) is derived from (train.seed, round, client), so a
round's result does not depend on which clients ran before it, in which order, or in which process.
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedlora.adapters import State, read_state, write_state
from fedlora.models import resolve_dtype
from fedlora.config import TrainConfig
from fedlora.errors import ClientFailure
from fedlora.tasks import Task

if TYPE_CHECKING:
    from fedlora.methods import Broadcast, Method, Upload


@dataclass(frozen=True)
class ClientData:
    """Indices of one client's examples in the task's tokenized data."""

    client_id: int
    train: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class TrainResult:
    state: State
    loss: float
    num_examples: int
    steps: int


def round_seed(seed: int, round_: int, client: int) -> int:
    """A 63-bit seed for one client in one round, independent of every other (client, round)."""
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1, dtype=np.uint64)[0] >> 1)


def batch_indices(train: np.ndarray, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches drawn without replacement from ``train``, reshuffling at each pass over it."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    passes = [rng.permutation(train) for _ in range(-(-need // len(train)))]
    flat = np.concatenate(passes)[:need]
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


class LocalTrainer:
    """Trains and evaluates client states on one shared model.

    With per-client ranks the model holds one PEFT adapter per distinct rank (``other_adapters``: adapter name
    → its slots); each call names the adapter of the client whose state it is, and that adapter is activated.
    """

    def __init__(self, model: nn.Module, slot_map: Mapping[str, nn.Parameter], task: Task, train: TrainConfig,
                 device: torch.device, other_adapters: Mapping[str, Mapping[str, nn.Parameter]] | None = None) -> None:
        self.model = model
        self.slot_maps = {"default": slot_map, **(other_adapters or {})}
        self.active = "default"
        self.slots = slot_map
        self.task = task
        self.cfg = train
        self.device = device
        # In bf16 the frozen base weights are stored in bf16 (experiment.build) and autocast computes every product
        # in bf16; adapter weights, heads, gradients and optimizer state stay float32.
        self.bf16 = resolve_dtype(train.dtype, device) == "bfloat16"
        # privacy.dp_sgd: a fedlora.privacy.DPSGD (Opacus per-example clipping and noise, Poisson batches), set by
        # experiment.build; None trains without it.
        self.dp_sgd: Any = None

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def activate(self, adapter: str) -> None:
        """Make ``adapter`` the model's active PEFT adapter (a no-op for the one adapter of equal ranks)."""
        if adapter == self.active:
            return
        if adapter not in self.slot_maps:
            raise KeyError(f"no adapter {adapter!r} in this model (have: {', '.join(self.slot_maps)})")
        self.model.set_adapter(adapter)  # type: ignore[operator]
        for p in self.model.parameters():  # set_adapter marks the adapter trainable; train() decides what is
            p.requires_grad_(False)
        self.active, self.slots = adapter, self.slot_maps[adapter]

    def load(self, state: Mapping[str, torch.Tensor], adapter: str = "default") -> None:
        self.activate(adapter)
        write_state(self.slots, state)

    def train(self, state: Mapping[str, torch.Tensor], data: ClientData, round_: int,
              frozen: Collection[str] = (), adapter: str = "default") -> TrainResult:
        """``train.local_steps`` optimizer steps from ``state``; the optimizer is fresh each round."""
        cfg = self.cfg
        self.load(state, adapter)
        params = []
        for key, p in self.slots.items():
            p.requires_grad_(key not in frozen)
            if key not in frozen:
                params.append(p)
        assert cfg.lr is not None, "resolve the config (Config.resolved) before training"
        if cfg.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        seed = round_seed(cfg.seed, round_, data.client_id)
        losses = []
        self.model.train()
        dp = self.dp_sgd
        batches = (dp.batches if dp else batch_indices)(data.train, cfg.local_steps, cfg.batch_size, seed)
        private = dp.attach(self.model, opt, cfg.batch_size, seed, self.device) if dp else nullcontext((self.model, opt))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), private as (model, opt):
            torch.manual_seed(seed)  # dropout draws from the global generator; pin it per client and round
            for idx in batches:
                if len(idx) == 0:  # a Poisson batch (DP-SGD) may be empty: no gradient, no step
                    continue
                with self._autocast():
                    loss = self.task.loss(model, self.task.batch(idx, self.device))
                loss.backward()
                if cfg.max_grad_norm > 0 and dp is None:  # DP-SGD clips each example's gradient instead
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        self.model.eval()
        for p in params:
            p.requires_grad_(False)
        return TrainResult(state=read_state(self.slots), loss=float(np.mean(losses)),
                           num_examples=int(len(data.train)), steps=len(losses))

    def evaluate(self, state: Mapping[str, torch.Tensor], idx: np.ndarray, adapter: str = "default") -> dict[str, float]:
        """Metrics of the model with ``state`` on the examples ``idx`` (real predictions), at the training dtype
        and under ``torch.inference_mode`` (no autograd bookkeeping at all)."""
        self.load(state, adapter)
        with torch.inference_mode(), self._autocast():
            return self.task.evaluate(self.model, idx, self.cfg.eval_batch_size, self.device)


class ClientNode:
    """One client's side of the protocol: receive broadcasts, train and upload, evaluate its own model.

    ``state`` is the client's full adapter state (shared and private tensors). Private tensors never leave
    this object: :meth:`fit` returns only what ``method.upload`` selects. ``adapter`` names the model's PEFT
    adapter of this client's rank (``"default"`` unless ranks differ between clients).
    """

    def __init__(self, data: ClientData, method: Method, trainer: LocalTrainer, init_state: Mapping[str, torch.Tensor],
                 fingerprint: str | None = None, apply_base: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
                 adapter: str = "default") -> None:
        self.data = data
        self.adapter = adapter
        self.method = method
        self.trainer = trainer
        self.state: State = {k: v.detach().clone() for k, v in init_state.items()}
        self.fingerprint = fingerprint
        self.apply_base = apply_base  # None where the base model is shared with the server (embedded runtime)
        self.version = 0  # the last broadcast applied: a broadcast sent twice (after a lost reply) applies once

    def receive(self, broadcasts: Sequence[Broadcast]) -> None:
        for b in broadcasts:
            if b.version and b.version <= self.version:
                continue
            self.version = max(self.version, b.version)
            if b.base_update and self.apply_base is not None:
                self.apply_base(b.base_update)
            self.state = self.method.apply(self.state, b)

    def fit(self, round_: int) -> tuple[Upload, TrainResult]:
        from fedlora.methods import Upload

        plan = self.method.plan(round_)
        start = self.method.upload(self.state, round_)  # what the round starts from: the reference of its update
        result = self.trainer.train(self.state, self.data, round_, frozen=plan.frozen, adapter=self.adapter)
        bad = [k for k, v in result.state.items() if not bool(torch.isfinite(v).all())]
        if bad or not np.isfinite(result.loss):
            # Keep the state from before this round: nothing non-finite may enter a client's adapter.
            raise ClientFailure(f"local training diverged (non-finite loss or weights in {bad[:2]})")
        self.state = result.state
        meta = {"train_loss": result.loss, "fingerprint": self.fingerprint}
        # privatize: the identity, or a privacy wrapper's clipping and noise (fedlora.privacy)
        payload = self.method.privatize(self.method.upload(self.state, round_), start, round_, self.data.client_id)
        return Upload(self.data.client_id, payload, result.num_examples, meta), result

    def evaluate(self) -> dict[str, float]:
        return self.trainer.evaluate(self.state, self.data.test, self.adapter)
