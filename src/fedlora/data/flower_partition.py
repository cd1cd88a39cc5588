"""``data.partitioner = "flower"``: the clients' parts drawn by Flower Datasets' own partitioners (flwr-datasets),
so that a fedlora split and a Flower baseline's split are the same split.

Flower's ``FederatedDataset`` shuffles a split (``shuffle=True, seed=S``) and then hands it to a partitioner; this
module does the same with fedlora's pool (the examples left after the global test set), ``S = data.seed``:

=============  ==========================================================================================
data.partition Flower partitioner
=============  ==========================================================================================
iid            ``IidPartitioner(num_partitions=data.num_clients)``
dirichlet      ``DirichletPartitioner(num_partitions, partition_by="label", alpha=data.alpha,
               min_partition_size=data.min_examples_per_client, seed=S)`` (it redraws until every part has the
               minimum, at most 10 times)
pathological   ``PathologicalPartitioner(num_partitions, partition_by="label",
               num_classes_per_partition=data.classes_per_client, seed=S)``
natural-id     ``NaturalIdPartitioner(partition_by=data.partition_column)`` (fedlora's own gives the same:
               one client per owner, in sorted order)
shard          ``ShardPartitioner(num_partitions, partition_by="label",
               num_shards_per_partition=data.shards_per_client, seed=S)`` (Flower's only: McMahan et al.'s
               label-sorted shards)
=============  ==========================================================================================

With a dataset of the datasets library (``data.dataset = hf``), ``data.test_split`` set and
``data.max_examples = 0``, the pool is the whole of ``data.splits``, in order, so ``FederatedDataset(dataset=data.path, subset=data.config_name, partitioners={"train":
<the partitioner above>}, shuffle=True, seed=S).load_partition(k)`` holds exactly client k's examples (its train and
test splits together). What Flower lacks is kept: the stratified global test set, each client's stratified test
(and validation) split, and the minimum-size check of every client.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlora.config import DataConfig
from fedlora.errors import DataError

_INSTALL = "pip install --no-deps flwr-datasets==0.6.1 seaborn==0.13.2 (the Makefile does)"


def _partitioner(cfg: DataConfig) -> Any:
    try:
        from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner, NaturalIdPartitioner,
                                               PathologicalPartitioner, ShardPartitioner)
    except ImportError:
        raise DataError(f"data.partitioner = 'flower' needs the package flwr-datasets: {_INSTALL}") from None
    if cfg.partition == "natural-id":
        return NaturalIdPartitioner(partition_by="owner")
    if cfg.partition == "shard":
        return ShardPartitioner(num_partitions=cfg.num_clients, partition_by="label",
                                num_shards_per_partition=cfg.shards_per_client, seed=cfg.seed)
    if cfg.partition == "iid":
        return IidPartitioner(num_partitions=cfg.num_clients)
    if cfg.partition == "dirichlet":
        return DirichletPartitioner(num_partitions=cfg.num_clients, partition_by="label", alpha=cfg.alpha,
                                    min_partition_size=cfg.min_examples_per_client, seed=cfg.seed)
    if cfg.partition == "pathological":
        return PathologicalPartitioner(num_partitions=cfg.num_clients, partition_by="label",
                                       num_classes_per_partition=cfg.classes_per_client, seed=cfg.seed)
    raise DataError(f"data.partition = {cfg.partition!r} has no Flower partitioner; use iid, dirichlet or "
                    "pathological")


def flower_parts(pool: np.ndarray, labels: np.ndarray, cfg: DataConfig,
                 groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Each client's examples (sorted indices into ``labels``, drawn from ``pool``) by Flower's partitioner of
    ``data.partition`` on the pool shuffled as ``FederatedDataset`` shuffles a split (module docstring)."""
    import datasets

    partitioner = _partitioner(cfg)
    columns = {"label": labels[pool].tolist(), "fedlora_index": pool.tolist()}
    if groups is not None:
        columns["owner"] = np.asarray(groups)[pool].tolist()
    partitioner.dataset = datasets.Dataset.from_dict(columns).shuffle(seed=cfg.seed)
    try:
        if cfg.partition == "natural-id" and partitioner.num_partitions != cfg.num_clients:
            raise DataError(f"data.partition = 'natural-id': Flower's partitioner finds {partitioner.num_partitions} "
                            f"owners (data.partition_column = {cfg.partition_column!r}), but data.num_clients = "
                            f"{cfg.num_clients}; set data.num_clients = {partitioner.num_partitions}")
        parts = [np.asarray(partitioner.load_partition(k)["fedlora_index"], dtype=np.int64)
                 for k in range(cfg.num_clients)]
    except ValueError as e:  # Flower's refusals: a minimum not met after its redraws, too few classes, ...
        raise DataError(f"data.partitioner = 'flower', data.partition = {cfg.partition!r}: "
                        f"{' '.join(str(e).split())}") from None
    return [np.sort(p) for p in parts]
