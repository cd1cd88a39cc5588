"""Which model ``model.name`` means, and what its config says: a bundled name, a local Hugging Face directory, or a
Hub id ``org/name`` at ``model.revision``.

A Hub id is resolved the ordinary way, by ``huggingface_hub``: from the user's cache (``HF_HOME``), downloaded when
the environment allows it (fedlora never sets ``HF_HUB_OFFLINE`` itself; ``make test``, ``make demo`` and CI do).
Its ``config.json`` decides whether it is an encoder (classification head) or a causal LM (generation), unless
``model.causal`` says so, and which modules the adapter targets by default (PEFT's own table, by model type). The
revision is resolved to the commit it names, and the run's ``config.toml`` records that commit, so a resumed run,
``fedlora export`` and ``fedlora evaluate`` load the very weights the run trained on.

Light to import: ``huggingface_hub`` and ``peft`` are imported by the functions that need them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from fedlora.config import ModelConfig

# The bundled models' model types (PEFT's target table is keyed by them) and whether each is a causal LM.
BUNDLED = {"minilm": ("bert", False), "tiny-bert": ("bert", False), "smollm2": ("llama", True),
           "tiny-llama": ("llama", True)}
DEFAULT_REVISION = "main"
# Architecture names of causal language models in transformers (Qwen2ForCausalLM, GPT2LMHeadModel); encoders name
# *Model, *ForMaskedLM or *ForSequenceClassification.
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub model id ``org/name`` (and is not a bundled name or an existing folder)."""
    if name in BUNDLED or Path(name).expanduser().is_dir() or name.count("/") != 1:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_name(name: str, revision: str) -> None:
    """The checks of ``model.name`` and ``model.revision`` that need no file and no network (config time)."""
    if name in BUNDLED or Path(name).expanduser().is_dir():
        if revision != DEFAULT_REVISION:
            raise ConfigError(f"model.revision = {revision!r} applies to Hub ids only; model.name = {name!r} is a "
                              "bundled model or a local directory: unset model.revision")
        return
    if not is_hub_id(name):
        raise ConfigError(f"model.name = {name!r} is neither a bundled model ({', '.join(BUNDLED)}), an existing "
                          "local directory, nor a Hugging Face Hub id of the form 'org/name'")
    if not revision.strip():
        raise ConfigError("model.revision = '' is empty; name a branch, tag or commit (default: 'main')")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@functools.lru_cache(maxsize=32)
def _hub_config(repo_id: str, revision: str) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, the commit it was read at) of a Hub model, through the user's cache."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from transformers.utils.hub import extract_commit_hash

    from huggingface_hub.utils import logging as hub_logging

    where = f"model.name = {repo_id!r} (revision {revision!r})"
    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retry warnings would add lines to the one-line error below
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision)
    except GatedRepoError:
        raise ModelError(f"{where} is a gated model: accept its terms on its Hub page, then log in "
                         "(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{where} does not exist on the Hugging Face Hub or is private; for a private model log "
                         "in (`hf auth login`) or set HF_TOKEN, else check the id") from None
    except RevisionNotFoundError:
        raise ModelError(f"{where}: the Hub repository has no such branch, tag or commit; check model.revision") \
            from None
    except RemoteEntryNotFoundError:
        raise ModelError(f"{where} has no config.json: it is not a transformers model") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ModelError(f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                             f"forbids downloading it; download it first (`hf download {repo_id}`) or unset "
                             "HF_HUB_OFFLINE (no local directory has that name either)") from None
        raise ModelError(f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be "
                         "reached; connect to the network or download it where you can (`hf download "
                         f"{repo_id}`) (no local directory has that name either)") from None
    except OSError as e:  # a network or file-system failure of another kind
        raise ModelError(f"{where}: cannot read its config.json: {_one_line(e)}") from None
    finally:
        hub_logging.set_verbosity(level)
    commit = extract_commit_hash(path, None)
    if commit is None:
        raise ModelError(f"{where}: {path!r} is not in a Hugging Face cache snapshot; cannot tell its commit")
    return _read_config(Path(path), repo_id), commit


def _read_config(path: Path, name: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name = {name!r}: cannot read {str(path)!r}: {_one_line(e)}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"model.name = {name!r}: {str(path)!r} is not a JSON object")
    return raw


def model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (for a bundled model: just its ``model_type``)."""
    if cfg.name in BUNDLED:
        return {"model_type": BUNDLED[cfg.name][0]}
    local = Path(cfg.name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model.name = {cfg.name!r}: no config.json in that directory (not a Hugging Face "
                             "model)")
        return _read_config(local / "config.json", cfg.name)
    return _hub_config(cfg.name, cfg.revision)[0]


def commit(cfg: ModelConfig) -> str | None:
    """The commit a Hub model's revision names (None for a bundled model or a local directory)."""
    return _hub_config(cfg.name, cfg.revision)[1] if is_hub_id(cfg.name) else None


def is_causal(cfg: ModelConfig) -> bool:
    """``model.causal`` when set, else from the model's config: a ``*ForCausalLM`` / ``*LMHeadModel`` architecture
    (a config without ``architectures``: a model type transformers has a causal LM for and no masked LM for)."""
    if cfg.causal is not None:
        return cfg.causal
    if cfg.name in BUNDLED:
        return BUNDLED[cfg.name][1]
    raw = model_config(cfg)
    architectures = [str(a) for a in raw.get("architectures") or []]
    if architectures:
        return any(a.endswith(CAUSAL_SUFFIXES) for a in architectures)
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = raw.get("model_type")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def default_targets(cfg: ModelConfig) -> tuple[str, ...]:
    """The modules an adapter targets when ``adapter.targets`` is unset: PEFT's default for the model type (BERT,
    RoBERTa: query, value; Llama, Qwen2: q_proj, v_proj; DeBERTa-v2: query_proj, value_proj)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    model_type = model_config(cfg).get("model_type")
    if model_type not in TARGETS:
        raise ConfigError(f"model.name = {cfg.name!r} has model type {model_type!r}, for which PEFT knows no default "
                          "modules to adapt; set adapter.targets to the names of its attention projections (e.g. "
                          "[\"q_proj\", \"v_proj\"])")
    return tuple(TARGETS[model_type])


def resolved(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``causal`` decided and, for a Hub id, ``revision`` replaced by the commit it names."""
    rev = commit(cfg) or cfg.revision
    return replace(cfg, revision=rev, causal=is_causal(cfg))

