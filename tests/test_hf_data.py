"""``data.dataset = "hf"`` (issue 25): datasets read with the ``datasets`` library, in the column layouts of GLUE's
SST-2, MNLI (sentence pairs, 3 labels), RTE and of GSM8K. The fixtures are small parquet files written here in the
layout of the Hub repositories (a folder per configuration, ``<split>-00000-of-00001.parquet``, the README's
``configs``), so ``data.path`` = that folder loads exactly as the Hub id would from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedlora import config, models
from fedlora.data import hf
from fedlora.data.datasets import load_dataset
from fedlora.data.tokenize import collate, encode
from fedlora.errors import ConfigError, DataError

GOOD = ("a warm and funny film", "an inventive, moving story", "great acting and a clever plot")
BAD = ("a dull and tedious mess", "flat, lifeless and far too long", "a clumsy script and weak acting")
NLI = ("entailment", "neutral", "contradiction")

# Rows per split of each configuration (GLUE's test splits are unlabelled: -1).
SIZES = {"train": 60, "validation": 15, "test": 6}


def _sst2(split: str, n: int) -> dict:
    labels = [i % 2 for i in range(n)] if split != "test" else [-1] * n
    return {"sentence": [(GOOD if y == 1 else BAD)[i % 3] + f" #{i}" for i, y in enumerate(labels)],
            "label": labels, "idx": list(range(n))}


def _pairs(split: str, n: int, classes: int, a: str, b: str) -> dict:
    labels = [i % classes for i in range(n)] if not split.startswith("test") else [-1] * n
    return {a: [f"the cat sat on mat {i}" for i in range(n)],
            b: [("a cat sat", "a dog ran maybe", "no cat sat")[y if y >= 0 else 0] + f" {i}" for i, y in
                enumerate(labels)], "label": labels, "idx": list(range(n))}


def _write(folder: Path, configs: dict[str, dict[str, tuple[dict, "datasets.Features"]]]) -> Path:
    """A dataset repository's layout: README configs and ``<config>/<split>-00000-of-00001.parquet``."""
    yaml = ["---", "configs:"]
    for name, splits in configs.items():
        yaml += [f"- config_name: {name}", "  data_files:"]
        for split, (columns, features) in splits.items():
            (folder / name).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(columns, features=features).to_parquet(
                str(folder / name / f"{split}-00000-of-00001.parquet"))
            yaml += [f"  - split: {split}", f"    path: {name}/{split}-*"]
    (folder / "README.md").write_text("\n".join(yaml + ["---", ""]))
    return folder


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    F, V = datasets.Features, datasets.Value
    sst2 = F({"sentence": V("string"), "label": datasets.ClassLabel(names=["negative", "positive"]),
              "idx": V("int32")})
    mnli = F({"premise": V("string"), "hypothesis": V("string"), "label": datasets.ClassLabel(names=list(NLI)),
              "idx": V("int32")})
    rte = F({"sentence1": V("string"), "sentence2": V("string"),
             "label": datasets.ClassLabel(names=["entailment", "not_entailment"]), "idx": V("int32")})
    return _write(tmp_path_factory.mktemp("glue"), {
        "sst2": {s: (_sst2(s, n), sst2) for s, n in SIZES.items()},
        "mnli": {s: (_pairs(s, n, 3, "premise", "hypothesis"), mnli) for s, n in
                 (("train", 60), ("validation_matched", 15), ("test_matched", 6))},
        "rte": {s: (_pairs(s, n, 2, "sentence1", "sentence2"), rte) for s, n in SIZES.items()},
    })


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    F, V = datasets.Features, datasets.Value

    def split(n: int, start: int) -> tuple[dict, datasets.Features]:
        q = [f"Ann has {i} apples and buys {i + 2} more. How many apples does she have?" for i in range(start,
                                                                                                     start + n)]
        a = [f"She has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}" for i in range(start, start + n)]
        return {"question": q, "answer": a}, F({"question": V("string"), "answer": V("string")})

    return _write(tmp_path_factory.mktemp("gsm8k"), {"main": {"train": split(40, 0), "test": split(10, 100)}})


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The datasets library's cache of prepared files in a temporary folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def hf_data(path: Path, *overrides: str) -> config.DataConfig:
    return config.load(None, ["data.dataset=hf", f"data.path={path}", "data.max_examples=0", *overrides]).data


@pytest.mark.parametrize("name,text,pair,classes", [
    ("sst2", "sentence", "", ("negative", "positive")),
    ("mnli", "premise", "hypothesis", NLI),
    ("rte", "sentence1", "sentence2", ("entailment", "not_entailment")),
])
def test_glue_layouts_load_with_their_class_names(glue: Path, name: str, text: str, pair: str,
                                                  classes: tuple[str, ...]) -> None:
    test_split = "validation_matched" if name == "mnli" else "validation"
    cfg = hf_data(glue, f"data.config_name={name}", f"data.text_column={text}", f"data.text_pair_column={pair}",
                  f"data.test_split={test_split}")
    ds = hf.load_hf(cfg)
    assert ds.label_names == classes and ds.name == f"{glue.name}/{name}"
    assert len(ds) == 75 and np.array_equal(ds.held_out, np.arange(60, 75))  # train, then the test split
    assert np.array_equal(ds.labels[:6], np.arange(6) % len(classes))
    source = _sst2("train", 60) if name == "sst2" else _pairs("train", 60, len(classes), text, pair)
    assert ds.texts[:60] == tuple(source[text])
    assert ds.text_pairs == (tuple(source[pair]) + tuple(_pairs(test_split, 15, len(classes), text, pair)[pair])
                             if pair else None)


def test_max_examples_is_a_stratified_sample_of_each_part(glue: Path) -> None:
    cfg = hf_data(glue, "data.config_name=mnli", "data.text_column=premise", "data.text_pair_column=hypothesis",
                  "data.test_split=validation_matched", "data.max_examples=30", "data.test_fraction=0.2")
    ds = hf.load_hf(cfg)
    assert len(ds) == 30 and len(ds.held_out) == 6  # 24 of train and 6 = 0.2 × 30 of validation_matched
    assert np.bincount(ds.labels[:24]).tolist() == [8, 8, 8] and np.bincount(ds.labels[24:]).tolist() == [2, 2, 2]
    assert load_dataset(cfg).texts == ds.texts  # the generic loader keeps it as it is


def test_sentence_pairs_are_encoded_as_pairs_with_segment_ids(glue: Path) -> None:
    ds = hf.load_hf(hf_data(glue, "data.config_name=rte", "data.text_column=sentence1",
                            "data.text_pair_column=sentence2"))
    tok = models.load_tokenizer(config.ModelConfig("tiny-bert"))
    enc = encode(ds.texts, ds.labels, tok, 12, ds.text_pairs)
    want = tok(ds.texts[3], ds.text_pairs[3], truncation=True, max_length=12)
    assert enc.input_ids[3].tolist() == want["input_ids"] and enc.token_type_ids[3].tolist() == want["token_type_ids"]
    # both texts, each cut at its end (longest first) to fit 12 tokens, the second one in segment 1
    assert tok.decode(enc.input_ids[3]) == "[CLS] the cat sat on mat [SEP] a dog ran maybe [SEP]"
    assert enc.token_type_ids[3].tolist() == [0] * 7 + [1] * 5
    batch = collate(enc, [3, 0], tok.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert torch.equal(batch["token_type_ids"][0, : len(enc.input_ids[3])], enc.token_type_ids[3])


def test_a_pair_task_runs_end_to_end_with_the_validation_split_as_test_set(glue: Path, tmp_path: Path) -> None:
    from fedlora.experiment import build
    from fedlora.report import RunDir
    from fedlora.runtime import simulation

    cfg = tiny_config("data.dataset=hf", f"data.path={glue}", "data.config_name=mnli", "data.text_column=premise",
                      "data.text_pair_column=hypothesis", "data.test_split=validation_matched",
                      "data.max_examples=0", "method.name=fedit", "train.rounds=1")
    exp = build(cfg)
    assert exp.task.num_labels == 3 and np.array_equal(exp.split.global_test, np.arange(60, 75))
    summary = simulation.run(cfg, RunDir(tmp_path / "run"), progress=False, exp=exp)
    assert 0.0 <= summary["acc_global"] <= 1.0
    recorded = config.load(tmp_path / "run" / "config.toml").data
    assert (recorded.config_name, recorded.test_split, recorded.text_pair_column) == (
        "mnli", "validation_matched", "hypothesis")


def test_gsm8k_layout_as_instruction_data_scored_by_final_number(gsm8k: Path) -> None:
    from fedlora.experiment import build

    cfg = tiny_config("model.name=tiny-llama", "data.dataset=hf", f"data.path={gsm8k}", "data.config_name=main",
                      "data.prompt_column=question", "data.response_column=answer", "data.test_split=test",
                      "data.metric=final-number", "data.max_examples=0", "data.min_examples_per_client=4",
                      "train.max_length=160")
    exp = build(cfg)
    assert exp.config.data.metric == "final-number" and exp.task.match.__name__ == "answers_match"
    ds = exp.dataset
    assert len(ds) == 50 and np.array_equal(exp.split.global_test, np.arange(40, 50))
    assert ds.instructions[0].startswith("Ann has 0 apples") and ds.inputs[0] == ""
    assert ds.responses[40] == "She has 100 + 102 = 202 apples.\n#### 202"


def test_files_and_saved_folders_with_integer_or_string_labels(tmp_path: Path) -> None:
    rows = {"text": [f"text {i}" for i in range(30)], "label": [("pos", "neg", "mid")[i % 3] for i in range(30)]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "s.parquet"))
    ds = hf.load_hf(hf_data(tmp_path / "s.parquet"))
    assert ds.label_names == ("mid", "neg", "pos") and ds.labels[:3].tolist() == [2, 1, 0]
    ints = {"text": rows["text"], "label": [(2, 10, 7)[i % 3] for i in range(30)]}
    datasets.Dataset.from_dict(ints).save_to_disk(str(tmp_path / "saved"))
    ds = hf.load_hf(hf_data(tmp_path / "saved"))
    assert ds.label_names == ("2", "7", "10") and ds.labels[:3].tolist() == [0, 2, 1]
    (arrow,) = (tmp_path / "saved").glob("*.arrow")  # the one arrow file save_to_disk wrote, read on its own
    assert hf.load_hf(hf_data(arrow)).texts == ds.texts
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"a": f"x{i}", "b": f"y{i}", "y": i % 2}) + "\n"
                                              for i in range(30)))
    for dataset in ("hf", "jsonl"):  # the datasets library and fedlora's own JSON Lines reader: the same pairs
        data = config.load(None, [f"data.dataset={dataset}", f"data.path={tmp_path / 'p.jsonl'}", "data.text_column=a",
                                  "data.text_pair_column=b", "data.label_column=y", "data.max_examples=0"]).data
        got = load_dataset(data)
        assert got.text_pairs[:2] == ("y0", "y1") and got.label_names == ("0", "1") and len(got) == 30


def test_csv_sentence_pairs(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("premise,hypothesis,label\n" + "".join(
        f"p{i},h{i},{NLI[i % 3]}\n" for i in range(12)))
    data = config.load(None, ["data.dataset=csv", f"data.path={tmp_path / 'p.csv'}", "data.text_column=premise",
                              "data.text_pair_column=hypothesis"]).data
    ds = load_dataset(data)
    assert (ds.texts[4], ds.text_pairs[4], ds.label_names[ds.labels[4]]) == ("p4", "h4", "neutral")
    (tmp_path / "q.csv").write_text("premise,label\np,x\nq,y\n")
    with pytest.raises(DataError, match=r"has no column 'hypothesis'; its columns are: 'premise', 'label'"):
        load_dataset(config.load(None, ["data.dataset=csv", f"data.path={tmp_path / 'q.csv'}",
                                        "data.text_column=premise", "data.text_pair_column=hypothesis"]).data)


def test_bad_columns_splits_and_labels_are_clear_errors(glue: Path, tmp_path: Path) -> None:
    sst2 = ("data.config_name=sst2", "data.text_column=sentence")
    with pytest.raises(DataError, match=r"split 'train', has no column 'text'; its columns are: 'sentence', "
                                        r"'label', 'idx'"):
        hf.load_hf(hf_data(glue, "data.config_name=sst2"))
    with pytest.raises(DataError, match=r"data.splits = 'dev': .* has no such split; its splits are: 'train', "
                                        r"'validation', 'test'"):
        hf.load_hf(hf_data(glue, *sst2, "data.splits=['dev']"))
    with pytest.raises(DataError, match=r"split 'test', row 0: label -1 in column 'label' is not one of its "
                                        r"ClassLabel's 2 classes \(negative, positive\)"):
        hf.load_hf(hf_data(glue, *sst2, "data.test_split=test"))
    (tmp_path / "e").mkdir()  # a dataset folder whose validation file has a header and no rows
    (tmp_path / "e" / "train.csv").write_text("text,label\na,0\nb,1\n")
    (tmp_path / "e" / "validation.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"data.path = '.*/e': a split is empty \(Instruction \"validation\" "
                                        r"corresponds to no data!\); give it rows or leave it out of data.splits"):
        hf.load_hf(hf_data(tmp_path / "e", "data.test_split=validation"))
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0.5, 1.5]}).to_parquet(str(tmp_path / "f.parquet"))
    with pytest.raises(DataError, match=r"column 'label' holds .*float.*; classification needs a ClassLabel, integer "
                                        r"or string labels \(float labels are a regression task\)"):
        hf.load_hf(hf_data(tmp_path / "f.parquet"))
    with pytest.raises(DataError, match=r"data.path = 'nobody/no-such-dataset': no such local file or folder, and the "
                                        r"datasets library cannot load it as a Hub dataset and HF_HUB_OFFLINE=1"):
        hf.load_hf(hf_data(Path("nobody/no-such-dataset")))
    with pytest.raises(ConfigError, match=r"data.config_name = 'mnli' applies to the datasets read by the datasets "
                                          r"library \(data.dataset = hf\) only"):
        tiny_config("data.config_name=mnli")
    with pytest.raises(ConfigError, match="data.test_split = 'train' is also in data.splits"):
        hf_data(glue, "data.test_split=train")
