"""Use and re-check what a run saved: ``fedlora export`` and ``fedlora evaluate``.

A run directory's ``global/`` and ``clients/<k>/`` hold PEFT adapters. For methods whose broadcasts change the
frozen base weights (FedEx folds its residual into W0, FLoRA merges every round's stacked update), the adapter
alone is not the model that was evaluated: next to it, ``base_weights.safetensors`` holds the current values of
the base weights the method changed (the adapted layers' weights, dense, keyed by the plain transformers
parameter name, in the weight's own orientation). Replacing those weights of the freshly loaded base model and
then loading the adapter rebuilds exactly the evaluated model (README, "What a run writes"):

    base = <the run's base model>; base.load_state_dict(load_file("global/base_weights.safetensors"), strict=False)
    model = PeftModel.from_pretrained(base, "global")

The values are saved rather than their difference from W0 so that the reload is bit-exact (W0 + (W − W0) is
not always W in float32).

:func:`export` writes a directory that plain transformers / PEFT load without fedlora; :func:`evaluate`
recomputes the metrics of a saved or exported model on the run's own test split or on a new file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.errors import FedloraError
from fedlora.private_adapter import PRIVATE_DIR, combine_private

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedlora.config import Config
    from fedlora.experiment import Experiment
    from fedlora.methods import Method

BASE_FILE = "base_weights.safetensors"
EXPORT_FILE = "fedlora_export.json"


# ---- what a run saves next to an adapter --------------------------------------------------------------------
def plain_name(peft_param: str) -> str:
    """The name of a PEFT model's base parameter in the plain transformers model
    (``base_model.model.bert....query.base_layer.weight`` → ``bert....query.weight``)."""
    return peft_param.removeprefix("base_model.model.").replace(".base_layer.", ".")


def changes_base(method: Method) -> bool:
    """Whether the method's broadcasts change base weights (``Method.changes_base``: FedEx, FLoRA)."""
    return bool(method.changes_base)


def base_weights(exp: Experiment) -> dict[str, torch.Tensor]:
    """The current values of the base weights the method may have changed (empty for the other methods)."""
    if not changes_base(exp.method):
        return {}
    params = dict(exp.model.named_parameters())
    return {plain_name(m.base_param): params[m.base_param].detach().cpu().contiguous()
            for m in exp.info.layers.values()}


def write_base_weights(exp: Experiment, folder: Path) -> None:
    """Write :data:`BASE_FILE` into ``folder`` where the method changes base weights (else nothing)."""
    weights = base_weights(exp)
    if weights:
        from safetensors.torch import save_file

        save_file(weights, str(folder / BASE_FILE), metadata={
            "format": "pt", "fedlora": "replace these weights of the base model before loading the adapter"})


# ---- which saved model ---------------------------------------------------------------------------------------
def global_refusal(cfg: Config) -> str | None:
    """Why the run's method has no global model, or None when it has one (as ``Method.global_model`` decides:
    the method declares one, and a classification head, if any, is shared)."""
    from fedlora.methods import get_method

    cls = get_method(cfg.method.name)
    share = cls.default_share_head if cfg.method.share_head is None else cfg.method.share_head
    if not cls.has_global_model:
        return (f"method {cls.name!r} has no global model: every client keeps private tensors (its B side and, "
                "by default, its head), so each client's model is its own; use --client K")
    if not share and cfg.data.task != "generation":  # causal LMs have no classification head
        return (f"method {cls.name!r} has no global model in this run: the classification head is private "
                "(method.share_head = false); use --client K")
    return None


def _run_config(run: Path) -> Config:
    from fedlora import config as cfgmod

    if not (run / "config.toml").is_file():
        raise FedloraError(f"{str(run)!r} is not a fedlora run directory (no config.toml)")
    return cfgmod.load(run / "config.toml").resolved()


def saved_folder(run: Path, client: int | None, cfg: Config | None = None) -> Path:
    """``global/`` or ``clients/<k>/`` of a finished run, with a clear error when there is none."""
    if client is None:
        if cfg is not None and (reason := global_refusal(cfg)):
            raise FedloraError(reason)
        folder = run / "global"
    else:
        folder = run / "clients" / str(client)
    if not (folder / "adapter_model.safetensors").is_file():
        what = "global model" if client is None else f"client {client}"
        raise FedloraError(f"{str(run)!r} has no saved {what} ({str(folder)!r}): the run has not finished "
                           "(see fedlora run --resume) or that client does not exist")
    return folder


# ---- loading ---------------------------------------------------------------------------------------------------
def _base_model(cfg: Config, label_names: tuple[str, ...]) -> nn.Module:
    """A fresh copy of the run's base model (seeded head), labels named in its config."""
    from fedlora import models

    if cfg.data.task == "generation":
        return models.load_causal_lm(cfg.model, seed=cfg.adapter.seed)
    base = models.load_classifier(cfg.model, len(label_names), seed=cfg.adapter.seed)
    base.config.id2label = dict(enumerate(label_names))
    base.config.label2id = {name: i for i, name in enumerate(label_names)}
    return base


def load_saved(run: str | Path, client: int | None = None) -> nn.Module:
    """A run's saved global model (``client=None``) or client model, rebuilt with plain PEFT: the base model,
    its changed weights from :data:`BASE_FILE` where there are any, then ``PeftModel.from_pretrained`` (for a
    client with a private adapter, of the one adapter both combine to: :func:`combine_private`)."""
    import tempfile

    from peft import PeftModel

    run = Path(run)
    cfg = _run_config(run)
    folder = saved_folder(run, client, cfg)
    if not (folder / PRIVATE_DIR).is_dir():
        return PeftModel.from_pretrained(_saved_base(cfg, folder), str(folder)).eval()
    with tempfile.TemporaryDirectory() as tmp:  # the weights are read into the model before it is removed
        combine_private(folder, Path(tmp) / "adapter")
        return PeftModel.from_pretrained(_saved_base(cfg, folder), str(Path(tmp) / "adapter")).eval()


def _saved_base(cfg: Config, folder: Path) -> nn.Module:
    """The run's base model with the weights the method changed (from ``folder``'s :data:`BASE_FILE`)."""
    from safetensors.torch import load_file

    base = _base_model(cfg, _label_names(cfg))
    if (folder / BASE_FILE).is_file():
        weights = load_file(str(folder / BASE_FILE))
        missing = set(weights) - set(base.state_dict())
        if missing:
            raise FedloraError(f"{str(folder / BASE_FILE)!r} names weights the base model lacks: {sorted(missing)[:3]}")
        base.load_state_dict(weights, strict=False)
    return base


def _label_names(cfg: Config) -> tuple[str, ...]:
    if cfg.data.task == "generation":
        return ()
    from fedlora.data import load_dataset

    return tuple(load_dataset(cfg.data).label_names)


# ---- export ------------------------------------------------------------------------------------------------
def export(run: str | Path, client: int | None, out: str | Path, merged: bool = False) -> dict[str, Any]:
    """Write the saved global (``client=None``) or client model of ``run`` into ``out`` for plain transformers:
    with ``merged``, one model directory (adapter merged into the weights, tokenizer included) that
    ``AutoModelFor….from_pretrained(out)`` loads; otherwise ``out/base/`` (the base model, with the weights the
    method changed, and its tokenizer) and the PEFT adapter in ``out`` whose ``base_model_name_or_path`` points
    there, for ``PeftModel.from_pretrained``. Returns what was written (also in ``out/fedlora_export.json``)."""
    from fedlora import models

    run, out = Path(run), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedloraError(f"--out {str(out)!r} already exists and is not an empty folder; choose another")
    cfg = _run_config(run)
    folder = saved_folder(run, client, cfg)
    tokenizer = models.load_tokenizer(cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    try:
        adapter = folder
        if (folder / PRIVATE_DIR).is_dir():  # FedDPA: the client's two adapters as the one adapter they sum to
            adapter = out / ".combined"
            combine_private(folder, adapter)
        if merged:
            load_saved(run, client).merge_and_unload().save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))
        else:
            base_dir = out / "base"  # the base the adapter was trained on (with FedEx's / FLoRA's changed weights)
            _saved_base(cfg, folder).save_pretrained(str(base_dir))
            tokenizer.save_pretrained(str(base_dir))
            tokenizer.save_pretrained(str(out))
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(adapter / name, out / name)
            adapter_cfg = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
            adapter_cfg["base_model_name_or_path"] = str(base_dir.resolve())
            (out / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2) + "\n", encoding="utf-8")
        if adapter != folder:
            shutil.rmtree(adapter)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    info = {"run": str(run.resolve()), "model": "global" if client is None else f"client {client}",
            "merged": merged, "base_weights_changed": (folder / BASE_FILE).is_file(),
            "task": cfg.data.task, "load": _load_hint(cfg, out, merged)}
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _auto_class(cfg: Config) -> str:
    return "AutoModelForCausalLM" if cfg.data.task == "generation" else "AutoModelForSequenceClassification"


def _load_hint(cfg: Config, out: Path, merged: bool) -> str:
    auto = _auto_class(cfg)
    if merged:
        return f"transformers.{auto}.from_pretrained({str(out)!r})"
    return f"peft.PeftModel.from_pretrained(transformers.{auto}.from_pretrained({str(out / 'base')!r}), {str(out)!r})"


def load_exported(folder: str | Path, cfg: Config) -> nn.Module:
    """An exported directory loaded with plain transformers / PEFT (what a user of the export does)."""
    import transformers
    from peft import PeftModel

    folder = Path(folder)
    auto = getattr(transformers, _auto_class(cfg))
    if (folder / "adapter_config.json").is_file():
        base_path = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        base = auto.from_pretrained(str(folder / "base") if (folder / "base").is_dir() else base_path)
        return PeftModel.from_pretrained(base, str(folder)).eval()
    if not (folder / "config.json").is_file():
        raise FedloraError(f"--model {str(folder)!r} is neither a model directory (config.json) nor an adapter "
                           "(adapter_config.json)")
    return auto.from_pretrained(str(folder)).eval()


# ---- evaluate ----------------------------------------------------------------------------------------------
def evaluate(run: str | Path, client: int | None = None, model_dir: str | Path | None = None,
             data_file: str | Path | None = None) -> dict[str, Any]:
    """Metrics of a run's saved global (``client=None``) or client model — or of an exported ``model_dir`` —
    on the run's own test split (the global test set, or that client's test split) or on ``data_file`` (a
    labelled csv / jsonl with the run's columns and labels, or an instruction file for generation runs).

    On the run's own split of the saved model the evaluation is the run's own code path on the same examples,
    so ``acc`` equals the last recorded ``acc_global`` (or ``clients[k]``); the result says whether it does."""
    import torch

    from fedlora.experiment import build

    run = Path(run)
    cfg = _run_config(run)
    if client is None and (reason := global_refusal(cfg)):
        raise FedloraError(reason)
    exp = build(cfg)
    if client is not None and not 0 <= client < len(exp.clients):
        raise FedloraError(f"--client {client}: the run has clients 0..{len(exp.clients) - 1}")
    if data_file is not None:
        task, idx = _file_task(exp, Path(data_file))
        data = str(data_file)
    else:
        task, idx = exp.task, exp.split.global_test if client is None else exp.clients[client].test
        data = "global test set" if client is None else f"client {client}'s test split"
    bf16 = torch.autocast(exp.device.type, dtype=torch.bfloat16, enabled=exp.trainer.bf16)
    batch = cfg.train.eval_batch_size
    if model_dir is not None:
        model = load_exported(model_dir, exp.config).to(exp.device)
        with bf16:
            metrics = task.evaluate(model, idx, batch, exp.device)
    else:
        folder = saved_folder(run, client, cfg)
        adapter = "default" if client is None else exp.client_adapters[client]
        state = load_into(exp, folder, adapter)
        if task is exp.task:  # exactly the run's evaluation (a client's with both adapters, where it has two)
            own = exp.clients[client] if client is not None else None
            metrics = exp.trainer.evaluate(state, idx, adapter, exp.private if own else None, own)
        else:
            exp.trainer.load(state, adapter)
            with bf16:
                metrics = task.evaluate(exp.model, idx, batch, exp.device)
    samples = metrics.pop("samples", None)
    result: dict[str, Any] = {"run": str(run), "model": "global" if client is None else f"client {client}",
                              "source": str(model_dir) if model_dir is not None else "saved", "data": data,
                              "metrics": {k: _json_number(v) for k, v in metrics.items()}}
    if samples is not None:
        result["samples"] = samples
    if data_file is None:
        recorded = recorded_accuracy(run, client)
        result["recorded"] = recorded
        result["reproduced"] = recorded is not None and all(
            v == result["metrics"].get(k) for k, v in recorded.items() if k != "round")
    return result


def _json_number(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return None if np.isnan(v) else float(v)
    return int(v) if isinstance(v, (int, np.integer)) else v


def recorded_accuracy(run: Path, client: int | None) -> dict[str, Any] | None:
    """The last evaluated round of ``metrics.jsonl``: its round and ``acc_global`` and ``loss_global`` (or
    ``clients[k]``, the client's accuracy)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("clients") is not None:
                last = record
    if last is None:
        return None
    if client is None:  # the loss is recorded for the global model only; it is the more sensitive check
        return {"round": last["round"], "acc": last.get("acc_global"), "loss": last.get("loss_global")}
    return {"round": last["round"], "acc": last["clients"].get(str(client))}


def load_into(exp: Experiment, folder: Path, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Put a saved model into the experiment: its changed base weights into ``exp.model``; returns the adapter
    state (saved names → tensors) of PEFT adapter ``adapter``, checked against the model's slots."""
    import torch
    from safetensors.torch import load_file

    if (folder / BASE_FILE).is_file():
        names = {plain_name(m.base_param): m.base_param for m in exp.info.layers.values()}
        weights = load_file(str(folder / BASE_FILE))
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise FedloraError(f"{str(folder / BASE_FILE)!r} holds weights of no adapted layer: {unknown[:3]}")
        params = dict(exp.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[names[name]].copy_(value)
    elif changes_base(exp.method):
        raise FedloraError(f"{str(folder)!r} has no {BASE_FILE}: method {exp.method.name!r} changes base weights, "
                           "and this adapter was saved without them (by an older fedlora); it cannot be rebuilt")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    expected = set(exp.trainer.slot_maps[adapter])
    state = {k: v for k, v in saved.items() if k in expected}
    if set(state) != expected:
        raise FedloraError(f"{str(folder)!r} does not hold this run's adapter: missing {sorted(expected - set(state))[:3]}")
    if (folder / PRIVATE_DIR / "adapter_model.safetensors").is_file() and exp.trainer.private_slots:
        from fedlora.adapters import PRIVATE

        private = {PRIVATE + k: v for k, v in load_file(str(folder / PRIVATE_DIR / "adapter_model.safetensors")).items()}
        if set(private) != set(exp.trainer.private_slots):
            raise FedloraError(f"{str(folder / PRIVATE_DIR)!r} does not hold this run's private adapter")
        state.update(private)
    return state


def _file_task(exp: Experiment, path: Path) -> tuple[Any, np.ndarray]:
    """A task over every example of a new file, tokenized as the run's data was."""
    from fedlora import models

    cfg = exp.config
    from fedlora.data.sources import source_for_file

    source = source_for_file(str(path))  # by suffix: the CSV or the JSON Lines reader
    kind = source.name
    tokenizer = models.load_tokenizer(cfg.model)
    if cfg.data.task == "generation":
        from fedlora.data.instructions import load_instruction_dataset
        from fedlora.data.prompts import encode_instructions
        from fedlora.tasks_gen import GenerationTask

        dataset = load_instruction_dataset(replace(cfg.data, dataset=kind, path=str(path), max_examples=0,
                                                   config_name="", splits=("train",), test_split=""))
        task: Any = GenerationTask(encode_instructions(dataset, tokenizer, cfg.train.max_length), tokenizer,
                                   exp.task.logits_to_keep,  # type: ignore[union-attr]
                                   match=exp.task.match)  # type: ignore[union-attr]  # the run's data.metric
        return task, np.arange(len(dataset.responses))
    from fedlora.data.tokenize import encode
    from fedlora.data.userfiles import read_labelled
    from fedlora.tasks import ClassificationTask

    texts, pairs, ids, names = read_labelled(path, source.file_format or kind, cfg.data.text_column,
                                             cfg.data.label_column, cfg.data.text_pair_column)
    run_names = list(exp.dataset.label_names)
    unknown = sorted({names[i] for i in ids} - set(run_names))
    if unknown:
        raise FedloraError(f"--data {str(path)!r} has labels the run does not know: {unknown}; the run's labels "
                           f"are {run_names}")
    labels = np.array([run_names.index(names[i]) for i in ids], dtype=np.int64)
    encoded = encode(texts, labels, tokenizer, cfg.train.max_length, pairs)
    return ClassificationTask(encoded, tokenizer.pad_token_id or 0, len(run_names)), np.arange(len(texts))
