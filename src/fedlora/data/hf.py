"""``data.dataset = "hf"``: a dataset read with the Hugging Face ``datasets`` library.

``data.path`` is what ``datasets`` reads: a Hub dataset id (``nyu-mll/glue`` with ``data.config_name = "mnli"``,
from the user's cache or downloaded, as the environment allows), a local folder of data files or one written by
``save_to_disk``, or a single parquet / arrow / json / jsonl / csv file (its one split is ``train``).

The examples of ``data.splits`` are pooled, and then held out and partitioned like any dataset; with
``data.test_split`` that split is the global test set instead (GLUE's ``validation_matched``, GSM8K's ``test``).
Columns: ``data.text_column``, ``data.text_pair_column`` (sentence pairs), ``data.label_column`` for
classification; for generation (a causal LM) the instruction layouts of user files (:mod:`fedlora.data.instructions`)
or ``data.prompt_column`` and ``data.response_column``. Labels are a ``ClassLabel`` (its names are the classes of
the reports), integers or strings; a value outside a ``ClassLabel`` (GLUE's unlabelled test splits hold -1) or a
float label (a regression task) is refused with the split, row and value.

``data.max_examples`` is applied here (stratified by label, seeded by ``data.seed``, the same rule as every dataset),
before any text is read, so a 393,000-row MNLI costs only its label column beyond the examples a run uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedlora.config import DataConfig
from fedlora.data.datasets import TextDataset
from fedlora.data.instructions import LAYOUTS, InstructionDataset, partition_labels
from fedlora.data.partition import stratified_subsample
from fedlora.data.userfiles import MISSING_MARKERS, label_ids
from fedlora.errors import DataError

# The datasets library's builder for a single data file, by its suffix.
FILE_BUILDERS = {**{s: s[1:] for s in (".parquet", ".arrow", ".json", ".csv")}, ".jsonl": "json"}
_INSTALL = "pip install 'datasets==5.2.0' (or the fedlora extra: pip install 'fedlora[hf]')"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def load_splits(cfg: DataConfig) -> dict[str, Any]:
    """``{split name: datasets.Dataset}`` of everything ``data.path`` (and ``data.config_name``) holds."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.dataset = {cfg.dataset!r} needs the package datasets: {_INSTALL}") from None
    from huggingface_hub import constants

    from huggingface_hub.utils import logging as hub_logging

    where = f"data.path = {cfg.path!r}" + (f" (data.config_name = {cfg.config_name!r})" if cfg.config_name else "")
    local = Path(cfg.path).expanduser()
    datasets.utils.logging.disable_progress_bar()
    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retry warnings would add lines to a one-line error
    try:
        if local.is_file():
            builder = FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"{where}: a data file must end in one of {', '.join(FILE_BUILDERS)}")
            if cfg.config_name:
                raise DataError(f"{where}: a single data file has no configurations; unset data.config_name")
            loaded = datasets.load_dataset(builder, data_files={"train": str(local)})
        elif local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(local))  # written by Dataset(Dict).save_to_disk
        else:
            loaded = datasets.load_dataset(str(local) if local.is_dir() else cfg.path, cfg.config_name or None)
    except DataError:
        raise
    except (FileNotFoundError, ConnectionError) as e:
        hint = (" and HF_HUB_OFFLINE=1 forbids downloading it; load it once online (or unset HF_HUB_OFFLINE)"
                if constants.HF_HUB_OFFLINE else " (not in the cache, and the Hub cannot be reached, or has no such "
                "dataset, or it is private: log in with `hf auth login` or set HF_TOKEN)")
        raise DataError(f"{where}: no such local file or folder, and the datasets library cannot load it as a Hub "
                        f"dataset{hint}: {_one_line(e)}") from None
    except (ValueError, OSError, TypeError, IndexError) as e:  # an unknown configuration name, a malformed file
        if "corresponds to no data" in str(e):  # the datasets library's refusal of an empty split
            raise DataError(f"{where}: a split is empty ({_one_line(e)}); give it rows or leave it out of "
                            "data.splits / data.test_split") from None
        raise DataError(f"{where}: the datasets library cannot load it: {_one_line(e)}") from None
    finally:
        hub_logging.set_verbosity(level)
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _split(splits: dict[str, Any], name: str, key: str, where: str) -> Any:
    if name not in splits:
        raise DataError(f"{key} = {name!r}: {where} has no such split; its splits are: {', '.join(map(repr, splits))}")
    if len(splits[name]) == 0:
        raise DataError(f"{key} = {name!r}: the split is empty in {where}")
    return splits[name]


def _check_columns(ds: Any, split: str, columns: list[str], where: str) -> None:
    for column in columns:
        if column not in ds.column_names:
            raise DataError(f"{where}, split {split!r}, has no column {column!r}; its columns are: "
                            f"{', '.join(map(repr, ds.column_names))}")


def _texts(ds: Any, column: str, rows: np.ndarray, split: str, where: str) -> list[str]:
    out = []
    for row, value in zip(rows, ds.select(rows)[column] if len(rows) else []):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}, split {split!r}, row {int(row)}: the text in column {column!r} must be a "
                            f"non-empty string, got {value!r}")
        out.append(value.strip())
    return out


def _raw_labels(ds: Any, column: str, split: str, where: str) -> tuple[list[Any], tuple[str, ...] | None]:
    """A split's label column as values, and the ClassLabel's names when it has them."""
    import datasets

    feature = ds.features[column]
    values = ds[column]
    if isinstance(feature, datasets.ClassLabel):
        names = tuple(feature.names)
        bad = next((i for i, v in enumerate(values) if not isinstance(v, int) or not 0 <= v < len(names)), None)
        if bad is not None:
            raise DataError(f"{where}, split {split!r}, row {bad}: label {values[bad]!r} in column {column!r} is not "
                            f"one of its ClassLabel's {len(names)} classes ({', '.join(names)}); an unlabelled split "
                            "(GLUE's test splits hold -1) cannot be trained or scored on")
        return list(values), names
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string") and not (isinstance(dtype, str) and dtype.startswith(("int", "uint"))):
        raise DataError(f"{where}, split {split!r}: column {column!r} holds {feature!r}; classification needs a "
                        "ClassLabel, integer or string labels (float labels are a regression task)")
    for row, v in enumerate(values):
        if v is None or (isinstance(v, str) and (not v.strip() or v.strip().lower() in MISSING_MARKERS)):
            raise DataError(f"{where}, split {split!r}, row {row}: missing label {v!r} in column {column!r}")
    return [v.strip() if isinstance(v, str) else v for v in values], None


def _sizes(cfg: DataConfig, n_train: int, n_test: int) -> tuple[int, int]:
    """Examples kept of the pooled splits and of the test split: data.max_examples in all, data.test_fraction of it
    from the test split (0: everything)."""
    if not cfg.max_examples:
        return n_train, n_test
    want_test = min(max(round(cfg.max_examples * cfg.test_fraction), 1), n_test) if n_test else 0
    return min(cfg.max_examples - want_test, n_train), want_test


def load_hf(cfg: DataConfig) -> TextDataset | InstructionDataset:
    """Reader of the ``hf`` dataset plugin (module docstring): labelled text, or instruction data for a causal LM."""
    splits = load_splits(cfg)
    where = f"data.path = {cfg.path!r}"
    chosen = [(name, _split(splits, name, "data.splits", where)) for name in cfg.splits]
    test = (cfg.test_split, _split(splits, cfg.test_split, "data.test_split", where)) if cfg.test_split else None
    parts = chosen + ([test] if test else [])
    if cfg.task == "generation":
        return _instructions(cfg, parts, test is not None, where)
    return _labelled(cfg, parts, test is not None, where)


def _owners(cfg: DataConfig, parts: list[tuple[str, Any]], keep: list[np.ndarray], where: str) -> np.ndarray | None:
    """Each kept example's owner (``data.partition_column``) for the natural-id partition, else None."""
    if not cfg.partition_column:
        return None
    values: list[Any] = []
    for (split, ds), rows in zip(parts, keep):
        _check_columns(ds, split, [cfg.partition_column], where)
        column = ds.select(rows)[cfg.partition_column] if len(rows) else []
        for row, value in zip(rows, column):
            if value is None or isinstance(value, (float, bool)) or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{where}, split {split!r}, row {int(row)}: the owner in column "
                                f"{cfg.partition_column!r} must be a non-empty string or an integer, got {value!r}")
        values += list(column)
    if len({type(v) for v in values}) > 1:
        raise DataError(f"{where}: column {cfg.partition_column!r} mixes strings and integers")
    return np.asarray(values)


def _subsample(cfg: DataConfig, labels: list[np.ndarray], has_test: bool) -> list[np.ndarray]:
    """Row indices kept of each part (the pooled splits, then the test split): stratified by label."""
    pooled = np.concatenate(labels[: len(labels) - int(has_test)]) if labels else np.zeros(0, dtype=np.int64)
    n_train, n_test = _sizes(cfg, len(pooled), len(labels[-1]) if has_test else 0)
    keep = stratified_subsample(pooled, n_train, cfg.seed)
    offsets = np.cumsum([0] + [len(x) for x in labels[: len(labels) - int(has_test)]])
    out = [keep[(keep >= lo) & (keep < hi)] - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
    if has_test:
        out.append(stratified_subsample(labels[-1], n_test, cfg.seed))
    return out


def _labelled(cfg: DataConfig, parts: list[tuple[str, Any]], has_test: bool, where: str) -> TextDataset:
    columns = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    raw, class_names = [], None
    for split, ds in parts:
        _check_columns(ds, split, columns, where)
        values, names = _raw_labels(ds, cfg.label_column, split, where)
        if names is not None and class_names is not None and names != class_names:
            raise DataError(f"{where}: the ClassLabel of column {cfg.label_column!r} differs between splits")
        class_names = names or class_names
        raw.append(values)
    if class_names is not None:
        names = class_names
        ids = [np.asarray(v, dtype=np.int64) for v in raw]
    else:  # integers or strings, named as written; one class order over every split
        flat, names = label_ids([str(v) for values in raw for v in values], where, cfg.label_column)
        cuts = np.cumsum([0] + [len(v) for v in raw])
        ids = [np.asarray(flat[lo:hi], dtype=np.int64) for lo, hi in zip(cuts[:-1], cuts[1:])]
    keep = _subsample(cfg, ids, has_test)
    texts: list[str] = []
    pairs: list[str] = []
    for (split, ds), rows in zip(parts, keep):
        texts += _texts(ds, cfg.text_column, rows, split, where)
        if cfg.text_pair_column:
            pairs += _texts(ds, cfg.text_pair_column, rows, split, where)
    labels = np.concatenate([i[rows] for i, rows in zip(ids, keep)]).astype(np.int64)
    n_test = len(keep[-1]) if has_test else 0
    held = np.arange(len(labels) - n_test, len(labels), dtype=np.int64) if has_test else None
    return TextDataset(_name(cfg), tuple(texts), labels, tuple(names),
                       tuple(pairs) if cfg.text_pair_column else None, held, _owners(cfg, parts, keep, where))


def _layout(cfg: DataConfig, columns: list[str], split: str, where: str) -> tuple[str, str | None, str]:
    if cfg.prompt_column:
        _check_columns_list(columns, [cfg.prompt_column, cfg.response_column], split, where)
        return cfg.prompt_column, None, cfg.response_column
    for instruction, inp, response in LAYOUTS:
        if instruction in columns and response in columns:
            return instruction, (inp if inp in columns else None), response
    raise DataError(f"{where}, split {split!r}, is not instruction data: expected the columns instruction, (input,) "
                    "output or prompt, response, or set data.prompt_column and data.response_column (GSM8K: question, "
                    f"answer); its columns are: {', '.join(map(repr, columns))}")


def _check_columns_list(columns: list[str], wanted: list[str], split: str, where: str) -> None:
    for column in wanted:
        if column not in columns:
            raise DataError(f"{where}, split {split!r}, has no column {column!r}; its columns are: "
                            f"{', '.join(map(repr, columns))}")


def _instructions(cfg: DataConfig, parts: list[tuple[str, Any]], has_test: bool, where: str) -> InstructionDataset:
    rows: list[tuple[str, str, str]] = []
    counts = []
    for split, ds in parts:
        instruction, inp, response = _layout(cfg, ds.column_names, split, where)
        everything = np.arange(len(ds), dtype=np.int64)
        ins = _texts(ds, instruction, everything, split, where)
        res = _texts(ds, response, everything, split, where)
        extra = [str(x).strip() if x is not None else "" for x in ds[inp]] if inp else [""] * len(ds)
        rows += list(zip(ins, extra, res))
        counts.append(len(ds))
    labels, names = partition_labels(tuple(r for _, _, r in rows))
    cuts = np.cumsum([0] + counts)
    keep = _subsample(cfg, [labels[lo:hi] for lo, hi in zip(cuts[:-1], cuts[1:])], has_test)
    idx = np.concatenate([k + lo for k, lo in zip(keep, cuts[:-1])]).astype(np.int64)
    n_test = len(keep[-1]) if has_test else 0
    return InstructionDataset(_name(cfg), tuple(rows[i][0] for i in idx), tuple(rows[i][1] for i in idx),
                              tuple(rows[i][2] for i in idx), labels[idx].copy(), names,
                              np.arange(len(idx) - n_test, len(idx), dtype=np.int64) if has_test else None,
                              _owners(cfg, parts, keep, where))


def _name(cfg: DataConfig) -> str:
    return Path(cfg.path).name + (f"/{cfg.config_name}" if cfg.config_name else "")
