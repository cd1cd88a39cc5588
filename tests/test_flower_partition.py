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
from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner, NaturalIdPartitioner,
                                       PathologicalPartitioner, ShardPartitioner)

from fedlora import config
from fedlora.data import hf, split_federated
from fedlora.errors import DataError

SEED, CLIENTS = 7, 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder in the Hub's layout: 120 training rows in 4 unbalanced classes, each written by one of 3
    users of unequal shares, and 20 validation rows."""
    root = tmp_path_factory.mktemp("flwr")
    features = datasets.Features({"text": datasets.Value("string"), "idx": datasets.Value("int64"),
                                  "user": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["a", "b", "c", "d"])})
    for split, n in (("train", 120), ("validation", 20)):
        labels = [(0, 0, 0, 1, 1, 2, 3)[i % 7] for i in range(n)]
        users = [("zoe", "ann", "ann", "bob", "ann")[i % 5] for i in range(n)]
        datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(n)], "idx": list(range(n)), "user": users,
                                    "label": labels},
                                   features=features).to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    return root


PARTITIONERS = {
    "iid": lambda: IidPartitioner(num_partitions=CLIENTS),
    "dirichlet": lambda: DirichletPartitioner(num_partitions=CLIENTS, partition_by="label", alpha=0.5,
                                              min_partition_size=8, seed=SEED),
    "pathological": lambda: PathologicalPartitioner(num_partitions=CLIENTS, partition_by="label",
                                                    num_classes_per_partition=2, seed=SEED),
    "natural-id": lambda: NaturalIdPartitioner(partition_by="user"),
    "shard": lambda: ShardPartitioner(num_partitions=CLIENTS, partition_by="label", num_shards_per_partition=2,
                                      seed=SEED),
}


def data_config(folder: Path, partition: str, *more: str) -> config.DataConfig:
    owners = ["data.partition_column=user"] if partition == "natural-id" else []
    return config.load(None, ["data.dataset=hf", f"data.path={folder}", "data.test_split=validation",
                              "data.max_examples=0", f"data.partition={partition}", f"data.num_clients={CLIENTS}",
                              "data.alpha=0.5", "data.min_examples_per_client=8", "data.classes_per_client=2",
                              f"data.seed={SEED}", *owners, *more]).data


@pytest.mark.parametrize("partition", sorted(PARTITIONERS))
def test_each_client_holds_exactly_the_flower_partition(folder: Path, partition: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    cfg = data_config(folder, partition, "data.partitioner=flower")
    ds = hf.load_hf(cfg)
    split = split_federated(ds.labels, cfg, held_out=ds.held_out, groups=ds.groups)
    assert np.array_equal(split.global_test, np.arange(120, 140))  # the validation split
    baseline = FederatedDataset(dataset=str(folder), partitioners={"train": PARTITIONERS[partition]()}, shuffle=True,
                                seed=SEED)
    for client in split.clients:
        flower_rows = sorted(baseline.load_partition(client.client_id, "train")["idx"])
        assert sorted(np.concatenate([client.train, client.test]).tolist()) == flower_rows
        assert len(client.test) >= 1  # what Flower lacks: each client's own stratified test split
    if partition == "shard":  # Flower's only
        with pytest.raises(config.ConfigError, match="data.partition = 'shard' is Flower Datasets' ShardPartitioner"):
            data_config(folder, partition)
        return
    # fedlora's own partitioner, same seed: another random split, except natural-id, which has no randomness
    own = split_federated(ds.labels, data_config(folder, partition), held_out=ds.held_out, groups=ds.groups)
    same = [np.array_equal(np.sort(np.concatenate([a.train, a.test])), np.sort(np.concatenate([b.train, b.test])))
            for a, b in zip(own.clients, split.clients)]
    assert all(same) if partition == "natural-id" else not all(same)


def test_flowers_refusal_is_a_data_error(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    cfg = config.load(None, ["data.dataset=hf", f"data.path={folder}", "data.test_split=validation",
                             "data.max_examples=0", "data.partitioner=flower", "data.partition=dirichlet",
                             "data.num_clients=10", "data.alpha=0.01", "data.min_examples_per_client=11"]).data
    ds = hf.load_hf(cfg)
    with pytest.raises(DataError, match=r"data.partitioner = 'flower', data.partition = 'dirichlet': "):
        split_federated(ds.labels, cfg, held_out=ds.held_out)


def test_natural_id_needs_one_client_per_owner(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    cfg = data_config(folder, "natural-id", "data.num_clients=4")
    ds = hf.load_hf(cfg)
    assert sorted(set(ds.groups.tolist())) == ["ann", "bob", "zoe"]
    with pytest.raises(DataError, match=r"3 distinct values of data.partition_column = 'user', but data.num_clients "
                                        r"= 4; set data.num_clients = 3"):
        split_federated(ds.labels, cfg, held_out=ds.held_out, groups=ds.groups)
    with pytest.raises(config.ConfigError, match="the natural-id partition needs the column of each example's owner"):
        config.load(None, ["data.partition=natural-id"])
