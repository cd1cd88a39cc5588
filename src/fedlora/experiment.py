"""Everything a run needs, built once from a config: data, partition, tokenized examples, the model with its
adapter, the method and the initial adapter state. Both runtimes start from :func:`build`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import numpy as np
import torch
from peft import PeftModel, TaskType
from torch import nn

from fedlora import adapters, models, precision
from fedlora.adapters import AdapterInfo, State
from fedlora.client import ClientData, ClientNode, LocalTrainer, PrivateAdapter
from fedlora.config import Config
from fedlora.data import FederatedSplit, TextDataset, load_dataset, split_federated
from fedlora.data.instructions import InstructionDataset, load_instruction_dataset
from fedlora.data.tokenize import encode
from fedlora.methods import Method, get_method
from fedlora.tasks import ClassificationTask
from fedlora.tasks_gen import GenerationTask, build_task


@dataclass
class Experiment:
    config: Config  # resolved
    dataset: TextDataset | InstructionDataset
    split: FederatedSplit
    clients: list[ClientData]
    model: PeftModel
    slots: Mapping[str, nn.Parameter]
    task: ClassificationTask | GenerationTask
    method: Method
    info: AdapterInfo
    init_state: State
    fingerprint: str | None
    device: torch.device
    trainer: LocalTrainer
    # The PEFT adapter of each client ("default" for all unless adapter.rank is a per-client list) and the
    # initial state of every adapter of the model.
    client_adapters: dict[int, str]
    init_states: dict[str, State]
    # The method's private second adapter on every client (Method.private_adapter: FedDPA's local adapter) and its
    # initial tensors (keys fedlora.adapters.PRIVATE + saved name), or None and {}.
    private: PrivateAdapter | None = None
    private_init: State | None = None
    # Why train.dtype is what it is (fedlora.precision.choose_dtype), for config.toml and summary.json.
    dtype_reason: str = ""

    @property
    def base_path(self) -> str | None:
        return models.resolve(self.config.model).path

    def client_node(self, data: ClientData, apply_base: Callable[[Mapping[str, torch.Tensor]], None] | None = None
                    ) -> ClientNode:
        """The node of client ``data.client_id``, at its initial state and on its rank's adapter."""
        adapter = self.client_adapters[data.client_id]
        return ClientNode(data, self.method, self.trainer, {**self.init_states[adapter], **(self.private_init or {})},
                          self.fingerprint, apply_base=apply_base, adapter=adapter, private=self.private)


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from fedlora.errors import ConfigError

            raise ConfigError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


def set_threads(threads: int) -> int:
    """Pin torch's CPU threads: ``threads`` or one per core this process may use."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def check_max_length(model: torch.nn.Module, config: Config) -> None:
    """Refuse a ``train.max_length`` beyond the model's position limit now, not at the first long batch."""
    from fedlora.errors import ConfigError

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and config.train.max_length > limit:
        raise ConfigError(f"train.max_length = {config.train.max_length} exceeds the position limit of model.name = "
                          f"{config.model.name!r} ({limit} tokens); use at most {limit}")


def build(config: Config) -> Experiment:
    """Load data and model, partition, tokenize (once) and attach the adapter, from a config."""
    config = config.resolved()
    set_threads(config.train.threads)
    device = pick_device(config.train.device)
    # train.dtype and train.attention "auto" resolve here, for this device and what the run needs (DP-SGD needs
    # float32); the run's config.toml records the choice and its reason.
    choice = precision.choose_dtype(config.train.dtype, device, config.float32_needs())
    dtype = choice.dtype
    config = replace(config, train=replace(config.train, dtype=dtype, attention=precision.resolve_attention(
        config.train.attention, device, dtype)))
    method_cls = get_method(config.method.name)  # what fits was decided at config time (registry.check_compatible)

    dataset: TextDataset | InstructionDataset
    task: ClassificationTask | GenerationTask
    tokenizer = models.load_tokenizer(config.model)
    if config.data.task == "generation":  # a causal LM on instruction data (Config.resolved decides)
        dataset = load_instruction_dataset(config.data)
        base = models.load_causal_lm(config.model, seed=config.adapter.seed, device=device,
                                     compute_dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        keep = "logits_to_keep" in inspect.signature(base.forward).parameters  # LM head on response columns only
        task = build_task(dataset, tokenizer, config, keep)
        task_type = TaskType.CAUSAL_LM
    else:
        dataset = load_dataset(config.data)
        encoded = encode(dataset.texts, dataset.labels, tokenizer, config.train.max_length, dataset.text_pairs)
        num_labels = len(dataset.label_names)
        task = ClassificationTask(encoded, tokenizer.pad_token_id or 0, num_labels)
        base = models.load_classifier(config.model, num_labels, seed=config.adapter.seed)
        task_type = TaskType.SEQ_CLS
    check_max_length(base, config)
    split = split_federated(dataset.labels, config.data, held_out=getattr(dataset, "held_out", None),
                            groups=getattr(dataset, "groups", None))
    clients = [ClientData(c.client_id, c.train, c.test) for c in split.clients]

    model = adapters.attach(base, config.adapter, task_type)
    names = adapters.add_rank_adapters(model, config.adapter, task_type)
    model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    slot_maps = {name: adapters.slots(model, name) for name in ["default", *sorted(set(names.values()) - {"default"})]}
    init_states = {name: adapters.read_state(m) for name, m in slot_maps.items()}
    info = AdapterInfo.of(init_states["default"], model)
    from fedlora import privacy  # DP wraps the method (privacy.dp) and local training (privacy.dp_sgd)

    inner = method_cls(config, info)
    private = inner.private_adapter()  # asked of the method itself: a privacy wrapper adds no adapter
    private_slots = adapters.add_private_adapter(model, config.adapter) if private is not None else {}
    revision = models.resolve(config.model).revision
    for peft_config in model.peft_config.values():  # saved adapters name their Hub base model's commit (PEFT's
        peft_config.revision = revision            # revision; its base_model_name_or_path is the Hub id)
    model = model.to(device)  # the private adapter, where there is one, joins the model's device
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    method = privacy.wrap(inner, config, [len(c.train) for c in clients])
    models.set_attention(model, config.train.attention)
    if config.train.dtype == "bfloat16":  # frozen base weights in bf16; adapters, heads, optimizer state float32
        keep = [p for m in [*slot_maps.values(), private_slots] for p in m.values()]
        if method.changes_base:  # base updates (FedEx, FLoRA) accumulate in these weights: they stay float32
            params = dict(model.named_parameters())
            keep += [params[meta.base_param] for meta in info.layers.values()]
        models.store_frozen(model, torch.bfloat16, keep)
    trainer = LocalTrainer(model, slot_maps["default"], task, config.train, device,
                           {n: m for n, m in slot_maps.items() if n != "default"}, private_slots=private_slots)
    trainer.dp_sgd = privacy.local_training(config)
    return Experiment(config=config, dataset=dataset, split=split, clients=clients, model=model,
                      slots=slot_maps["default"], task=task, method=method, info=info,
                      init_state=init_states["default"], fingerprint=adapters.projection_fingerprint(model),
                      device=device, trainer=trainer,
                      client_adapters={c.client_id: names[config.adapter.rank_of(c.client_id)] for c in clients},
                      init_states=init_states, private=private,
                      private_init=adapters.read_state(private_slots) if private is not None else None,
                      dtype_reason=choice.reason)


def label_histogram(exp: Experiment) -> np.ndarray:
    """clients × labels counts of each client's training data (for the run summary)."""
    labels = exp.dataset.labels
    n = len(exp.dataset.label_names)
    return np.stack([np.bincount(labels[c.train], minlength=n) for c in exp.clients])
