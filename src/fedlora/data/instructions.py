"""Instruction data for generation tasks: the two bundled ``-gen`` tasks, user CSV / JSON Lines files, and (in
their own modules) ``math-word`` (:mod:`fedlora.data.mathword`) and ``python-functions``
(:mod:`fedlora.data.pyfunctions`), which fix their own global test set (``InstructionDataset.held_out``).

An example is an *instruction*, an optional *input* (the text the instruction is about) and the *response* the
model must produce. The loss covers the response only; evaluation generates a response greedily and compares it
with the reference (:mod:`fedlora.tasks_gen`).

User files (``data.dataset`` csv or jsonl) are read in one of three layouts:

* Alpaca: ``instruction``, optional ``input``, ``output``;
* ``prompt`` and ``response``;
* any two columns named by ``data.prompt_column`` and ``data.response_column`` (both or neither).

Partitioning (Dirichlet, pathological, stratified test sets) needs a label per example. The bundled tasks use
their class (the news category, the sentiment). A user file uses its normalised response text when it has at
most :data:`MAX_RESPONSE_CLASSES` distinct responses (classification-like instruction data), otherwise a stable
hash of the normalised response into :data:`HASH_BUCKETS` buckets (free-text responses: clients then differ in
which responses they hold, not in any semantic class).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.config import DataConfig
from fedlora.data.datasets import _BBC, _ROTTEN, _bundled_path, _read_bbc_news, _read_rotten_tomatoes, check_labels
from fedlora.data.partition import stratified_subsample
from fedlora.data.userfiles import read_records
from fedlora.errors import DataError

MAX_RESPONSE_CLASSES = 32  # at most this many distinct responses: each is its own partition label
HASH_BUCKETS = 8  # otherwise: partition labels are a hash of the response into this many buckets

BBC_INSTRUCTION = ("What is the topic of this BBC news article? Answer with one word: business, entertainment, "
                   "politics, sports or tech.")
ROTTEN_INSTRUCTION = "Is this movie review positive or negative? Answer with one word."
ROTTEN_RESPONSES = ("negative", "positive")  # in the order of datasets.ROTTEN_LABELS: rotten, fresh


@dataclass(frozen=True)
class InstructionDataset:
    """Instruction / input / response triples with an int64 partition label per example.

    ``labels[i]`` indexes ``label_names``; the label only steers how examples are spread over clients.
    """

    name: str
    instructions: tuple[str, ...]
    inputs: tuple[str, ...]  # "" where an example has no input
    responses: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    # Indices of a test set fixed by the dataset itself (math-word's test problems, generated apart; the held-out
    # stdlib modules of python-functions): split_federated uses them as the global test set. None: drawn there.
    held_out: np.ndarray | None = None
    # Each example's owner (data.partition_column) for data.partition = "natural-id": one client per value.
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.instructions)
        if self.groups is not None and len(self.groups) != n:
            raise DataError(f"dataset {self.name!r} has {n} instructions but {len(self.groups)} owners")
        if not (len(self.inputs) == len(self.responses) == n):
            raise DataError(f"dataset {self.name!r}: {n} instructions, {len(self.inputs)} inputs and "
                            f"{len(self.responses)} responses must be as many")
        check_labels(self.name, self.labels, self.label_names, n, "instructions")

    def __len__(self) -> int:
        return len(self.instructions)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, idx: np.ndarray) -> InstructionDataset:
        """The examples at ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda xs: tuple(xs[i] for i in idx)  # noqa: E731
        held = None if self.held_out is None else np.flatnonzero(np.isin(idx, self.held_out)).astype(np.int64)
        return InstructionDataset(self.name, pick(self.instructions), pick(self.inputs), pick(self.responses),
                                  self.labels[idx].copy(), self.label_names, held,
                                  None if self.groups is None else self.groups[idx].copy())


def normalize_answer(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed: ``" Sports."`` → ``"sports"``."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def partition_labels(responses: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Partition labels of user instruction data (see the module docstring): the normalised response when there
    are at most :data:`MAX_RESPONSE_CLASSES` distinct ones, else a stable hash bucket of it."""
    norm = [normalize_answer(r) for r in responses]
    names = sorted(set(norm))
    if len(names) <= MAX_RESPONSE_CLASSES:
        ids = {name: i for i, name in enumerate(names)}
        return np.array([ids[n] for n in norm], dtype=np.int64), tuple(names)
    # blake2b, not hash(): Python's string hash is salted per process, and the split must not change between runs.
    buckets = [int.from_bytes(hashlib.blake2b(n.encode("utf-8"), digest_size=8).digest(), "big") % HASH_BUCKETS
               for n in norm]
    return np.array(buckets, dtype=np.int64), tuple(f"bucket-{b}" for b in range(HASH_BUCKETS))


# ---- bundled tasks ------------------------------------------------------------------------------------------


def bbc_news_gen(cfg: DataConfig | None = None) -> InstructionDataset:
    """BBC articles → their category word (business, entertainment, politics, sports, tech)."""
    texts, labels, names = _read_bbc_news(str(_bundled_path(*_BBC)))
    return InstructionDataset("bbc-news-gen", (BBC_INSTRUCTION,) * len(texts), texts,
                              tuple(names[i] for i in labels), np.array(labels, dtype=np.int64), names)


def rotten_tomatoes_gen(cfg: DataConfig | None = None) -> InstructionDataset:
    """Rotten Tomatoes review snippets → ``positive`` (fresh) or ``negative`` (rotten)."""
    texts, labels, _ = _read_rotten_tomatoes(str(_bundled_path(*_ROTTEN)))
    return InstructionDataset("rotten-tomatoes-gen", (ROTTEN_INSTRUCTION,) * len(texts), texts,
                              tuple(ROTTEN_RESPONSES[i] for i in labels), np.array(labels, dtype=np.int64),
                              ROTTEN_RESPONSES)


# ---- user files ---------------------------------------------------------------------------------------------

# (instruction column, input column or None, response column) of the layouts recognised without configuration.
LAYOUTS = (("instruction", "input", "output"), ("prompt", None, "response"))


def _layout(path: Path, columns: list[str], cfg: DataConfig) -> tuple[str, str | None, str]:
    if cfg.prompt_column:
        chosen = (cfg.prompt_column, None, cfg.response_column)
        for column in (cfg.prompt_column, cfg.response_column):
            if column not in columns:
                raise DataError(f"data file {str(path)!r} has no column {column!r}; its columns are: "
                                f"{', '.join(map(repr, columns))}")
        return chosen
    for instruction, inp, response in LAYOUTS:
        if instruction in columns and response in columns:
            return instruction, (inp if inp in columns else None), response
    raise DataError(f"data file {str(path)!r} is not instruction data: expected the columns instruction, "
                    f"(input,) output or prompt, response, or set data.prompt_column and data.response_column; "
                    f"its columns are: {', '.join(map(repr, columns))}")


def _cell(path: Path, line: int, record: dict[str, Any], column: str | None, required: bool) -> str:
    value = record.get(column) if column else None
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"data file {str(path)!r}, line {line}: empty or missing {column!r}")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"data file {str(path)!r}, line {line}: {column!r} must be a string, got {value!r}")
    return str(value).strip()


def read_instruction_file(path: str | Path, kind: str, cfg: DataConfig) -> InstructionDataset:
    """Parse a ``csv`` or ``jsonl`` file of instruction data (layouts in the module docstring)."""
    path = Path(path).expanduser()
    records, columns = read_records(path, kind)
    if not records:
        raise DataError(f"data file {str(path)!r} has no rows")
    instruction, inp, response = _layout(path, columns, cfg)
    rows = [(_cell(path, line, r, instruction, True), _cell(path, line, r, inp, False),
             _cell(path, line, r, response, True)) for line, r in records]
    responses = tuple(r for _, _, r in rows)
    labels, names = partition_labels(responses)
    return InstructionDataset(path.name, tuple(i for i, _, _ in rows), tuple(x for _, x, _ in rows), responses,
                              labels, names)


def load_instruction_dataset(cfg: DataConfig) -> InstructionDataset:
    """Load ``cfg.dataset`` as instruction data (its plugin's reader, fedlora.data.sources), then keep a
    stratified subsample of ``cfg.max_examples`` (same rule and seed as :func:`fedlora.data.load_dataset`) unless
    the dataset sizes itself (generated data with its own held-out test set)."""
    from fedlora.registry import DATASETS

    source = DATASETS.lookup(cfg.dataset)
    if source.task == "classification":
        raise DataError(f"data.dataset = {cfg.dataset!r} is not instruction data")
    # A user file holds either kind of data: read it as instructions (the caller asked for them).
    dataset: InstructionDataset = source.read(cfg if cfg.task == "generation" else replace(cfg, task="generation"))
    if source.sized:
        return dataset
    if 0 < cfg.max_examples < len(dataset):
        dataset = dataset.subset(stratified_subsample(dataset.labels, cfg.max_examples, cfg.seed))
    return dataset
