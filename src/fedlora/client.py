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

from fedlora.adapters import PRIVATE, Mixing, State, private_part, read_state, shared_part, write_state
from fedlora.models import resolve_dtype
from fedlora.config import TrainConfig
from fedlora.errors import ClientFailure, ConfigError
from fedlora.schedule import is_constant, lr_factor, run_step
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


def round_seed(seed: int, round_: int, client: int, *stream: int) -> int:
    """A 63-bit seed for one client in one round, independent of every other (client, round); ``stream`` tells
    apart several independent draws of the same client and round (none: the one of the shared adapter's training)."""
    return int(np.random.SeedSequence([seed, round_, client, *stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class PrivateStep:
    """How a client trains its private adapter in one round, before its shared adapter: ``train.local_steps`` steps
    on the private adapter alone, in the forward W0 + w_s·ΔW_shared + w_p·ΔW_private with ``weights`` = (w_s, w_p)
    and the shared adapter frozen; with ``from_shared`` the private adapter first becomes a copy of the shared one."""

    weights: tuple[float, float]
    from_shared: bool = False


@dataclass(frozen=True)
class PrivateAdapter:
    """A second adapter that every client holds beside the shared one and never sends (``Method.private_adapter``:
    FedDPA's local adapter). Same kind, rank and targets as the shared adapter; its tensors sit in the client's state
    under ``fedlora.adapters.PRIVATE`` + saved name, outside the method's AdapterInfo, so no plan can upload them.

    The method says, and the client does: what the private adapter trains in round r (``step(r)``: a
    :class:`PrivateStep`, or None), and with which weights (w_s, w_p) the two adapters form the client's own model
    (``weights(batch, reference)``: floats, or one weight per example from the embeddings (:func:`embed`, under
    W0 + ΔW_private) of the batch, n × h, and of ``reference_examples`` of the client's training examples, K × h; both
    None when ``reference_examples`` is 0). The global model, where there is one, is the shared adapter alone."""

    step: Callable[[int], PrivateStep | None]
    weights: Callable[[torch.Tensor | None, torch.Tensor | None], tuple[float | torch.Tensor, float | torch.Tensor]]
    reference_examples: int = 0


def embed(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each example's last-layer hidden states averaged over its real tokens (attention mask), n × h, float32."""
    inner = model.base_model.model  # type: ignore[union-attr]  # under PEFT's wrapper: no pre-hook of the wrapper runs
    out = inner(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    hidden = out.hidden_states[-1].float()
    mask = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def batch_indices(train: np.ndarray, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches drawn without replacement from ``train``, reshuffling at each pass over it."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    passes = [rng.permutation(train) for _ in range(-(-need // len(train)))]
    flat = np.concatenate(passes)[:need]
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing (``train.gradient_checkpointing``) on the PEFT model's transformer: each layer's
    activations are recomputed in the backward pass instead of kept (transformers checkpoints every
    ``GradientCheckpointingLayer``). Non-reentrant checkpointing (``use_reentrant=False``, what PEFT and transformers
    recommend) gives the adapters inside a checkpointed layer their gradients whether or not the layer's input
    requires one; transformers also adds its ``enable_input_require_grads`` hook (the embeddings' output requires a
    gradient, the embedding weights stay frozen), which is what PEFT relies on for the reentrant kind. Dropout masks
    are replayed in the recomputation (the RNG state is saved), so the update is the one without checkpointing."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing = true, but {type(inner).__name__} does not support "
                          "activation checkpointing in transformers; set train.gradient_checkpointing = false")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x: gradient_… is its deprecated alias
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class LocalTrainer:
    """Trains and evaluates client states on one shared model.

    With per-client ranks the model holds one PEFT adapter per distinct rank (``other_adapters``: adapter name
    → its slots); each call names the adapter of the client whose state it is, and that adapter is activated.
    """

    def __init__(self, model: nn.Module, slot_map: Mapping[str, nn.Parameter], task: Task, train: TrainConfig,
                 device: torch.device, other_adapters: Mapping[str, Mapping[str, nn.Parameter]] | None = None,
                 private_slots: Mapping[str, nn.Parameter] | None = None) -> None:
        self.model = model
        # The private adapter's slots (PRIVATE + saved name → parameter) when the method has one (PrivateAdapter).
        self.private_slots = dict(private_slots or {})
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
        if train.gradient_checkpointing:
            enable_checkpointing(model)

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
        if self.private_slots and any(k.startswith(PRIVATE) for k in state):
            write_state(self.private_slots, state)

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.cfg
        assert cfg.lr is not None, "resolve the config (Config.resolved) before training"
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def train_private(self, state: Mapping[str, torch.Tensor], data: ClientData, round_: int, step: PrivateStep
                      ) -> tuple[State, float]:
        """``train.local_steps`` optimizer steps of the private adapter alone (fresh optimizer, its own seed stream),
        in the forward W0 + w_s·ΔW_shared + w_p·ΔW_private with the shared adapter frozen. Returns ``state`` with
        the private adapter replaced, and the mean loss. Local DP-SGD does not apply: nothing of it leaves."""
        cfg = self.cfg
        self.load(state, "default")
        if step.from_shared:
            write_state(self.private_slots, {k: state[k[len(PRIVATE):]] for k in self.private_slots})
        params = list(self.private_slots.values())
        opt = self._optimizer(params)
        seed = round_seed(cfg.seed, round_, data.client_id, 1)
        losses = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                Mixing(self.model, *step.weights):
            for p in params:  # after Mixing's entry, which freezes both adapters
                p.requires_grad_(True)
            torch.manual_seed(seed)
            self.model.train()
            for k, idx in enumerate(batch_indices(data.train, cfg.local_steps, cfg.batch_size, seed)):
                losses.append(self._step(self.model, opt, params, idx, clip=True, lr=self._lr(round_, k)))
            self.model.eval()
            for p in params:
                p.requires_grad_(False)
        return {**state, **read_state(self.private_slots)}, float(np.mean(losses)) if losses else 0.0

    def _step(self, model: torch.nn.Module, opt: torch.optim.Optimizer, params: Sequence[torch.Tensor],
              idx: np.ndarray, clip: bool, lr: float | None = None) -> float:
        """One optimizer step on the examples ``idx`` (gradient clipped to ``train.max_grad_norm`` when ``clip``; at
        learning rate ``lr`` when given, else the optimizer's); returns the batch's loss.

        Gradient accumulation (``train.micro_batch_size`` = m > 0): the batch is computed in passes over at most m of
        its examples, in order, each padded to its own longest example. The batch's loss is a mean over its N loss
        terms (:meth:`fedlora.tasks.Task.loss_terms`: examples for classification, response tokens for generation),
        so a pass's mean loss over its own n_j terms is weighted by n_j / N before its backward: the gradients then
        sum to Σ_j (n_j / N)·(1/n_j)·Σ_{i∈j} ∇ℓ_i = (1/N)·Σ_i ∇ℓ_i, the full batch's gradient, whatever the passes'
        lengths or numbers of response tokens (a plain mean of the passes' means would weigh a pass with few response
        tokens as much as one with many). Clipping and the step then see that gradient. Equal up to float rounding
        (summation order; dropout masks are drawn per pass, as for any other split of the batch)."""
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        m = self.cfg.micro_batch_size
        passes = [self.task.batch(idx[i:i + m], self.device) for i in range(0, len(idx), m)] if 0 < m < len(idx) \
            else [self.task.batch(idx, self.device)]
        terms = [self.task.loss_terms(b) for b in passes]
        total = sum(terms)
        if total == 0:  # no loss term at all: the one pass's mean over nothing (NaN), as without accumulation
            passes = [self.task.batch(idx, self.device)]
        value = 0.0
        for batch, n in zip(passes, terms):
            if len(passes) > 1 and n == 0:  # a pass without loss terms (no response token) adds no gradient
                continue
            with self._autocast():
                loss = self.task.loss(model, batch)
                if len(passes) > 1:
                    loss = loss * (n / total)
            loss.backward()
            value += float(loss.detach())
        if clip and self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value

    def _lr(self, round_: int, k: int) -> float | None:
        """The learning rate of local step ``k`` of round ``round_`` (``train.lr_schedule``), or None when the
        schedule is constant (the optimizer's own, never touched: results stay bit-identical to no schedule)."""
        if is_constant(self.cfg):
            return None
        assert self.cfg.lr is not None, "resolve the config (Config.resolved) before training"
        return self.cfg.lr * lr_factor(self.cfg, run_step(self.cfg, round_, k))

    def train(self, state: Mapping[str, torch.Tensor], data: ClientData, round_: int,
              frozen: Collection[str] = (), adapter: str = "default") -> TrainResult:
        """``train.local_steps`` optimizer steps from ``state`` at the rates of ``train.lr_schedule`` (fedlora.schedule:
        local step k of round r is run step (r - 1)·local_steps + k); the optimizer is fresh each round."""
        cfg = self.cfg
        self.load(state, adapter)
        params = []
        for key, p in self.slots.items():
            p.requires_grad_(key not in frozen)
            if key not in frozen:
                params.append(p)
        opt = self._optimizer(params)
        seed = round_seed(cfg.seed, round_, data.client_id)
        losses = []
        self.model.train()
        dp = self.dp_sgd
        batches = (dp.batches if dp else batch_indices)(data.train, cfg.local_steps, cfg.batch_size, seed)
        private = dp.attach(self.model, opt, cfg.batch_size, seed, self.device) if dp else nullcontext((self.model, opt))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), private as (model, opt):
            torch.manual_seed(seed)  # dropout draws from the global generator; pin it per client and round
            for k, idx in enumerate(batches):
                if len(idx) == 0:  # a Poisson batch (DP-SGD) may be empty: no gradient, no step
                    continue
                # DP-SGD clips each example's gradient instead of the batch's
                losses.append(self._step(model, opt, params, idx, clip=dp is None, lr=self._lr(round_, k)))
        self.model.eval()
        for p in params:
            p.requires_grad_(False)
        return TrainResult(state=read_state(self.slots), loss=float(np.mean(losses)),
                           num_examples=int(len(data.train)), steps=len(losses))

    def evaluate(self, state: Mapping[str, torch.Tensor], idx: np.ndarray, adapter: str = "default",
                 private: PrivateAdapter | None = None, data: ClientData | None = None) -> dict[str, float]:
        """Metrics of the model with ``state`` on the examples ``idx`` (real predictions), at the training dtype
        and under ``torch.inference_mode`` (no autograd bookkeeping at all). With ``private`` and a state that holds
        a private adapter, the model is the client's combination of both (``data``: the client, whose training
        examples are the reference of instance-wise weights)."""
        self.load(state, adapter)
        with torch.inference_mode(), self._autocast():
            if private is None or not private_part(state):
                return self.task.evaluate(self.model, idx, self.cfg.eval_batch_size, self.device)
            return self._evaluate_mixed(idx, private, data)

    def _evaluate_mixed(self, idx: np.ndarray, private: PrivateAdapter, data: ClientData | None) -> dict[str, float]:
        k = private.reference_examples
        if k == 0:
            with Mixing(self.model, *private.weights(None, None)):
                return self.task.evaluate(self.model, idx, self.cfg.eval_batch_size, self.device)
        if data is None or len(data.train) == 0:
            raise ValueError("instance-wise weights need the client's training examples as reference")
        # The same K reference examples at every evaluation of a client: drawn from (train.seed, client) only.
        rng = np.random.default_rng([self.cfg.seed, data.client_id, 0xD9A])
        ref_idx = np.sort(rng.choice(data.train, size=min(k, len(data.train)), replace=False))
        with Mixing(self.model, 0.0, 1.0) as mix:
            reference = embed(self.model, self.task.batch(ref_idx, self.device))

            def weigh(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                mix.weights = (0.0, 1.0)  # embed with W0 + ΔW_private alone, then weigh each example of the batch
                mix.weights = private.weights(embed(self.model, kwargs), reference)

            hook = self.model.register_forward_pre_hook(weigh, with_kwargs=True)
            try:
                return self.task.evaluate(self.model, idx, self.cfg.eval_batch_size, self.device)
            finally:
                hook.remove()


class ClientNode:
    """One client's side of the protocol: receive broadcasts, train and upload, evaluate its own model.

    ``state`` is the client's full adapter state (shared and private tensors). Private tensors never leave
    this object: :meth:`fit` returns only what ``method.upload`` selects. ``adapter`` names the model's PEFT
    adapter of this client's rank (``"default"`` unless ranks differ between clients).
    """

    def __init__(self, data: ClientData, method: Method, trainer: LocalTrainer, init_state: Mapping[str, torch.Tensor],
                 fingerprint: str | None = None, apply_base: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
                 adapter: str = "default", private: PrivateAdapter | None = None) -> None:
        self.data = data
        self.private = private  # the method's private second adapter (its tensors are in ``state``), or None
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
        state, private_loss = self.state, 0.0
        step = self.private.step(round_) if self.private is not None else None
        if step is not None:  # the private adapter trains first, against the shared adapter the round starts from
            state, private_loss = self.trainer.train_private(state, self.data, round_, step)
        result = self.trainer.train(shared_part(state), self.data, round_, frozen=plan.frozen, adapter=self.adapter)
        new = {**private_part(state), **result.state}
        bad = [k for k, v in new.items() if not bool(torch.isfinite(v).all())]
        if bad or not np.isfinite(result.loss) or not np.isfinite(private_loss):
            # Keep the state from before this round: nothing non-finite may enter a client's adapter.
            raise ClientFailure(f"local training diverged (non-finite loss or weights in {bad[:2]})")
        self.state = new
        # "round": which round the upload answers (FedRot-LoRA's server rule alternates the side it aligns by round)
        meta = {"train_loss": result.loss, "fingerprint": self.fingerprint, "round": round_}
        # privatize: the identity, or a privacy wrapper's clipping and noise (fedlora.privacy)
        payload = self.method.privatize(self.method.upload(self.state, round_), start, round_, self.data.client_id)
        return Upload(self.data.client_id, payload, result.num_examples, meta), result

    def evaluate(self) -> dict[str, float]:
        return self.trainer.evaluate(self.state, self.data.test, self.adapter, self.private, self.data)
