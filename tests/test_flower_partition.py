"""``data.partitioner = "flower"`` (issue 25): a fedlora split and a Flower baseline's split are the same split. The
baseline is written as a Flower user writes it (``FederatedDataset`` over the same dataset folder, its partitioner,
``shuffle=True`` and the seed); each fedlora client's examples (its train and test splits together) must be exactly
that partition's rows."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from flwr_datasets import FederatedDataset  # installed by the Makefile (--no-deps: it declares datasets<5)
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

from fedlora import config
from fedlora.data import hf, split_federated
from fedlora.errors import DataError

SEED, CLIENTS = 7, 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder in the Hub's layout: 120 training rows in 4 unbalanced classes, 20 validation rows."""
    root = tmp_path_factory.mktemp("flwr")
    features = datasets.Features({"text": datasets.Value("string"), "idx": datasets.Value("int64"),
                                  "label": datasets.ClassLabel(names=["a", "b", "c", "d"])})
    for split, n in (("train", 120), ("validation", 20)):
        labels = [(0, 0, 0, 1, 1, 2, 3)[i % 7] for i in range(n)]
        datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(n)], "idx": list(range(n)), "label": labels},
                                   features=features).to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root


PARTITIONERS = {
    "iid": lambda: IidPartitioner(num_partitions=CLIENTS),
    "dirichlet": lambda: DirichletPartitioner(num_partitions=CLIENTS, partition_by="label", alpha=0.5,
                                              min_partition_size=8, seed=SEED),
    "pathological": lambda: PathologicalPartitioner(num_partitions=CLIENTS, partition_by="label",
                                                    num_classes_per_partition=2, seed=SEED),
}


@pytest.mark.parametrize("partition", sorted(PARTITIONERS))
def test_each_client_holds_exactly_the_flower_partition(folder: Path, partition: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    cfg = config.load(None, ["data.dataset=hf", f"data.path={folder}", "data.test_split=validation",
                             "data.max_examples=0", "data.partitioner=flower", f"data.partition={partition}",
                             f"data.num_clients={CLIENTS}", "data.alpha=0.5", "data.min_examples_per_client=8",
                             "data.classes_per_client=2", f"data.seed={SEED}"]).data
    ds = hf.load_hf(cfg)
    split = split_federated(ds.labels, cfg, held_out=ds.held_out)
    assert np.array_equal(split.global_test, np.arange(120, 140))  # the validation split
    baseline = FederatedDataset(dataset=str(folder), partitioners={"train": PARTITIONERS[partition]()}, shuffle=True,
                                seed=SEED)
    for client in split.clients:
        flower_rows = sorted(baseline.load_partition(client.client_id, "train")["idx"])
        assert sorted(np.concatenate([client.train, client.test]).tolist()) == flower_rows
        assert len(client.test) >= 1  # what Flower lacks: each client's own stratified test split
    # and not by chance: fedlora's own partitioner, same seed, gives another split
    own = split_federated(ds.labels, config.load(None, ["data.dataset=hf", f"data.path={folder}",
                                                        "data.test_split=validation", "data.max_examples=0",
                                                        f"data.partition={partition}", "data.alpha=0.5",
                                                        "data.classes_per_client=2", f"data.seed={SEED}"]).data,
                          held_out=ds.held_out)
    assert any(not np.array_equal(np.sort(np.concatenate([a.train, a.test])), np.sort(np.concatenate([b.train, b.test])))
               for a, b in zip(own.clients, split.clients))


def test_flowers_refusal_is_a_data_error(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    cfg = config.load(None, ["data.dataset=hf", f"data.path={folder}", "data.test_split=validation",
                             "data.max_examples=0", "data.partitioner=flower", "data.partition=dirichlet",
                             "data.num_clients=10", "data.alpha=0.01", "data.min_examples_per_client=11"]).data
    ds = hf.load_hf(cfg)
    with pytest.raises(DataError, match=r"data.partitioner = 'flower', data.partition = 'dirichlet': "):
        split_federated(ds.labels, cfg, held_out=ds.held_out)
