"""Read a user's labelled text from a CSV or JSON Lines file, with errors that name the file, line and column.

Labels may be strings or integers. Class names are sorted: numerically when every label is an integer
(``"2" < "10"``), otherwise as strings; label ``i`` is the ``i``-th name. Texts are stripped of surrounding
whitespace; an empty text or label is an error, not a skipped row.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

from fedlora.errors import DataError

_INTEGER = re.compile(r"[+-]?\d+")
# Spellings of "no value" that tools write into CSV cells (pandas: NaN, <NA>, NaT; SQL and JSON exports: NULL, None).
# A label cell holding one is refused rather than becoming a class of its own. "NA" is not among them: it is a
# real label in some data sets (e.g. a region).
MISSING_MARKERS = frozenset({"nan", "<na>", "nat", "null", "none", "n/a"})

# One parsed row: (line number, text, second text of a pair or "", label as written).
Row = tuple[int, str, str, str]


def _read_text(path: Path) -> str:
    """The whole file as text; BOM-tolerant UTF-8 only."""
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist (data.path)")
    if not path.is_file():
        raise DataError(f"data.path {str(path)!r} is not a file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"data file {str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                        "re-save it with UTF-8 encoding") from None


def _clean(path: Path, line: int, column: str, value: Any, what: str) -> str:
    """A non-empty stripped string for a text or label cell; integers are accepted for labels."""
    if what == "label" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise DataError(f"data file {str(path)!r}, line {line}: missing {what} (column {column!r})")
    if not isinstance(value, str):
        kinds = "a string or an integer" if what == "label" else "a string"
        raise DataError(f"data file {str(path)!r}, line {line}: the {what} in column {column!r} must be {kinds}, "
                        f"got {value!r}")
    stripped: str = value.strip()
    if not stripped:
        raise DataError(f"data file {str(path)!r}, line {line}: empty {what} in column {column!r}")
    if what == "label" and stripped.lower() in MISSING_MARKERS:
        raise DataError(f"data file {str(path)!r}, line {line}: the label in column {column!r} is {stripped!r}, "
                        "which marks a missing value (as pandas and spreadsheets write one), not a class; "
                        "drop or fill such rows")
    return stripped


def _csv_rows(path: Path, text: str, text_column: str, label_column: str, pair_column: str) -> Iterator[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = reader.fieldnames
    except csv.Error as e:
        raise DataError(f"data file {str(path)!r} is not valid CSV (line 1: {e})") from None
    if not columns:
        raise DataError(f"data file {str(path)!r} is empty: no header row and no rows")
    for column in (text_column, label_column, pair_column):
        if column and column not in columns:
            raise DataError(f"data file {str(path)!r} has no column {column!r}; its columns are: "
                            f"{', '.join(map(repr, columns))}")
    try:
        for record in reader:
            line = reader.line_num
            yield (line, _clean(path, line, text_column, record.get(text_column), "text"),
                   _clean(path, line, pair_column, record.get(pair_column), "text") if pair_column else "",
                   _clean(path, line, label_column, record.get(label_column), "label"))
    except csv.Error as e:
        raise DataError(f"data file {str(path)!r} is not valid CSV (line {reader.line_num}: {e})") from None


def jsonl_records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSONL file; DataError names a bad line."""
    records: list[tuple[int, dict[str, Any]]] = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which splitlines() breaks on.
    for line, body in enumerate(text.split("\n"), start=1):
        if not body.strip():
            continue
        try:
            record = json.loads(body)
        except json.JSONDecodeError as e:
            raise DataError(f"data file {str(path)!r}: line {line} is not valid JSON ({e.msg} at column {e.colno})") \
                from None
        if not isinstance(record, dict):
            raise DataError(f"data file {str(path)!r}: line {line} must be a JSON object, got {type(record).__name__}")
        records.append((line, record))
    return records


def _jsonl_rows(path: Path, text: str, text_column: str, label_column: str, pair_column: str) -> Iterator[Row]:
    records = jsonl_records(path, text)
    keys = sorted({k for _, r in records for k in r})
    for column in (text_column, label_column, pair_column):
        if records and column and column not in keys:
            raise DataError(f"data file {str(path)!r} has no column {column!r} in any record; its keys are: "
                            f"{', '.join(map(repr, keys))}")
    for line, record in records:
        yield (line, _clean(path, line, text_column, record.get(text_column), "text"),
               _clean(path, line, pair_column, record.get(pair_column), "text") if pair_column else "",
               _clean(path, line, label_column, record.get(label_column), "label"))


def read_records(path: Path, kind: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, record) pairs and the column names of a CSV or JSON Lines file (``kind``: the file format
    its dataset plugin declares)."""
    text = _read_text(path)
    records: list[tuple[int, dict[str, Any]]] = []
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            columns = list(reader.fieldnames or [])
            for record in reader:
                records.append((reader.line_num, dict(record)))
        except csv.Error as e:
            raise DataError(f"data file {str(path)!r} is not valid CSV (line {reader.line_num}: {e})") from None
        return records, columns
    if kind != "jsonl":
        raise DataError(f"unknown file kind {kind!r}; use csv or jsonl")
    records = jsonl_records(path, text)
    return records, sorted({k for _, r in records for k in r})


def label_ids(raw_labels: list[str], where: str, column: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(label id of each example, class names) of labels as written: names sorted, numerically when every one is an
    integer; at least two classes (``where`` and ``column`` name the data in the error)."""
    names = sorted(set(raw_labels))
    if all(_INTEGER.fullmatch(n) for n in names):
        names.sort(key=lambda n: (int(n), n))  # "2" before "10"
    if len(names) < 2:
        raise DataError(f"{where} has a single class ({names[0]!r}) in column {column!r}; classification needs at "
                        "least two")
    ids = {name: i for i, name in enumerate(names)}
    return tuple(ids[label] for label in raw_labels), tuple(names)


def read_labelled(path: str | Path, kind: str, text_column: str, label_column: str, text_pair_column: str = ""
                  ) -> tuple[tuple[str, ...], tuple[str, ...] | None, tuple[int, ...], tuple[str, ...]]:
    """Parse a ``csv`` or ``jsonl`` file into (texts, second texts of the pairs or None, label ids, label names)."""
    path = Path(path).expanduser()
    text = _read_text(path)
    if kind == "csv":
        rows = list(_csv_rows(path, text, text_column, label_column, text_pair_column))
    elif kind == "jsonl":
        rows = list(_jsonl_rows(path, text, text_column, label_column, text_pair_column))
    else:
        raise DataError(f"unknown file kind {kind!r}; use csv or jsonl")
    if not rows:
        raise DataError(f"data file {str(path)!r} has no rows")
    ids, names = label_ids([label for _, _, _, label in rows], f"data file {str(path)!r}", label_column)
    pairs = tuple(p for _, _, p, _ in rows) if text_pair_column else None
    return tuple(t for _, t, _, _ in rows), pairs, ids, names


def read_labelled_file(path: str | Path, kind: str, text_column: str,
                       label_column: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """Parse a ``csv`` or ``jsonl`` file of single texts into (texts, label ids, label names)."""
    texts, _, ids, names = read_labelled(path, kind, text_column, label_column)
    return texts, ids, names
