"""Split a labelled dataset into a global test set and one train/test split per client.

The order of operations in :func:`split_federated` is fixed:

1. optional stratified subsample of ``data.max_examples`` examples (:func:`stratified_subsample`; a no-op when
   :func:`~fedlora.data.load_dataset` already applied it, because the labels then have at most that many entries);
2. a stratified global test set of ``data.test_fraction`` of the examples, held out from every client;
3. the rest (the *pool*) spread over ``data.num_clients`` clients by :func:`iid`, :func:`dirichlet` or
   :func:`pathological`;
4. each client's part split into its own train and test sets by ``data.client_test_fraction`` (stratified, at
   least one example in each);
5. with ``data.validation_fraction`` > 0 (choosing hyperparameters), each client's train set split again into train
   and validation the same way; the returned split then holds the validation sets in place of the test sets (each
   client's own, and their union as the global set), so that a tuning run never sees a test example. The train
   sets are those of the same seed without validation, less the validation examples.

Every stage draws from its own random stream derived from ``data.seed`` (``SeedSequence(seed, spawn_key=(stage,))``),
never from global state. So the same seed gives the same split, and the global test set does not change when only
the partition, the number of clients or the client test fraction changes: runs stay comparable.
All returned index arrays are int64, sorted, and index the ``labels`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.config import DataConfig
from fedlora.errors import DataError

# One independent random stream per stage (the spawn key of the stage's SeedSequence).
_SUBSAMPLE, _GLOBAL_TEST, _PARTITION, _CLIENT_TEST, _VALIDATION = range(5)

# Draws of Dirichlet proportions before giving up on giving every client its minimum. Each draw costs a few
# microseconds per class (only counts are computed until one is accepted), so this bound is cheap.
DIRICHLET_MAX_TRIES = 1000


@dataclass(frozen=True)
class ClientSplit:
    """One client's data: int64 indices into the dataset, sorted."""

    client_id: int
    train: np.ndarray
    test: np.ndarray

    @property
    def num_examples(self) -> int:
        """Train plus test examples of this client."""
        return len(self.train) + len(self.test)


@dataclass(frozen=True)
class FederatedSplit:
    """A global held-out test set and the clients' splits; together they are disjoint."""

    global_test: np.ndarray
    clients: tuple[ClientSplit, ...]

    def label_counts(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        """Examples of each label held by each client (train + test): an int64 array of clients x labels."""
        labels = np.asarray(labels)
        rows = [np.bincount(labels[np.concatenate([c.train, c.test])], minlength=num_labels) for c in self.clients]
        return np.stack(rows).astype(np.int64) if rows else np.zeros((0, num_labels), dtype=np.int64)


def stage_rng(seed: int, stage: int) -> np.random.Generator:
    """The random stream of one stage of the split; negative seeds are taken modulo 2**64."""
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=(stage,)))


def _apportion(counts: np.ndarray, n_take: int) -> np.ndarray:
    """Split ``n_take`` over classes in proportion to ``counts`` (largest remainder, ties to the lower class).

    Deterministic, sums exactly to ``n_take`` and never exceeds a class's count when ``n_take <= counts.sum()``.
    """
    quota = counts * (n_take / counts.sum())
    take: np.ndarray = np.floor(quota).astype(np.int64)
    remainder = quota - take
    order = np.lexsort((np.arange(len(counts)), -remainder))
    take[order[: n_take - int(take.sum())]] += 1
    return take


def _stratified_take(idx: np.ndarray, labels: np.ndarray, n_take: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_take`` of ``idx`` keeping the label proportions; return (taken, rest), both sorted."""
    classes, counts = np.unique(labels[idx], return_counts=True)
    per_class = _apportion(counts, n_take)
    taken = [rng.permutation(idx[labels[idx] == c])[:k] for c, k in zip(classes, per_class)]
    chosen = np.sort(np.concatenate(taken)).astype(np.int64) if taken else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(idx, chosen, assume_unique=True).astype(np.int64)
    return chosen, rest


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise DataError(f"labels must be >= 0, found {int(labels.min())}")
    return labels.astype(np.int64, copy=False)


def stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified subsample of ``n`` examples (all of them when ``n <= 0`` or ``n >= len``).

    This is stage 1 of :func:`split_federated`; :func:`~fedlora.data.load_dataset` calls it with
    ``data.max_examples`` and ``data.seed`` right after loading, so both places pick the same examples.
    """
    labels = _check_labels(labels)
    everything = np.arange(len(labels), dtype=np.int64)
    if n <= 0 or n >= len(labels):
        return everything
    return _stratified_take(everything, labels, n, stage_rng(seed, _SUBSAMPLE))[0]


def iid(pool: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``pool`` and cut it into ``num_clients`` parts whose sizes differ by at most one."""
    return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(pool), num_clients)]


def dirichlet(pool: np.ndarray, labels: np.ndarray, num_clients: int, alpha: float, min_examples: int,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Label-skewed parts: each class is spread over the clients by proportions drawn from Dir(alpha).

    Proportions are redrawn (at most :data:`DIRICHLET_MAX_TRIES` times) until every client has at least
    ``min_examples`` examples; a smaller ``alpha`` gives more skew and makes that harder.
    """
    classes = np.unique(labels[pool])
    members = [rng.permutation(pool[labels[pool] == c]) for c in classes]
    sizes = np.array([len(m) for m in members])
    smallest = 0
    for _ in range(DIRICHLET_MAX_TRIES):
        proportions = rng.dirichlet(np.full(num_clients, alpha), size=len(classes))  # classes x clients
        if not np.all(np.isfinite(proportions)):  # can happen for extremely small alpha
            continue
        # Cut points of each class's shuffled examples: floor of the cumulative shares, the last one at the end.
        cuts = np.floor(np.cumsum(proportions, axis=1) * sizes[:, None]).astype(np.int64)
        cuts = np.minimum(cuts, sizes[:, None])
        cuts[:, -1] = sizes
        counts = np.diff(cuts, axis=1, prepend=0)
        smallest = int(counts.sum(axis=0).min())
        if smallest >= min_examples:
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for m, row in zip(members, cuts):
                for client, chunk in enumerate(np.split(m, row[:-1])):
                    parts[client].append(chunk)
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise DataError(
        f"dirichlet partition with data.alpha = {alpha} could not give each of {num_clients} clients at least "
        f"{min_examples} examples in {DIRICHLET_MAX_TRIES} draws ({len(pool)} examples, {len(classes)} classes; "
        f"smallest client in the last draw: {smallest}); use a larger data.alpha or fewer data.num_clients"
    )


def pathological(pool: np.ndarray, labels: np.ndarray, num_clients: int, classes_per_client: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes; a class's examples are split evenly over its holders.

    Classes are dealt in a shuffled cycle (client i gets positions i*k .. i*k+k-1 modulo the number of classes), so
    every class is used whenever ``num_clients * classes_per_client >= number of classes``; otherwise the examples
    of the classes nobody holds go to no client.
    """
    classes = np.unique(labels[pool])
    k = classes_per_client
    if k > len(classes):
        raise DataError(f"data.classes_per_client = {k} exceeds the {len(classes)} classes in the data "
                        f"({', '.join(map(str, classes))}); use at most {len(classes)}")
    order = rng.permutation(classes)
    held = [[int(order[(i * k + j) % len(classes)]) for j in range(k)] for i in range(num_clients)]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in order:
        holders = [i for i in range(num_clients) if c in held[i]]
        if not holders:
            continue
        members = rng.permutation(pool[labels[pool] == c])
        if len(members) < len(holders):
            raise DataError(f"pathological partition: class {int(c)} has {len(members)} examples outside the global "
                            f"test set but {len(holders)} clients hold it; use fewer data.num_clients or a smaller "
                            "data.classes_per_client")
        for client, chunk in zip(holders, np.array_split(members, len(holders))):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def natural_id(pool: np.ndarray, groups: np.ndarray, num_clients: int, column: str) -> list[np.ndarray]:
    """One client per distinct value of ``groups`` in the pool (its owner: a user, a hospital), in sorted order of
    the values, as Flower's ``NaturalIdPartitioner`` numbers them; there must be ``num_clients`` values."""
    owners = np.unique(groups[pool])
    if len(owners) != num_clients:
        raise DataError(f"data.partition = 'natural-id': the examples for the clients have {len(owners)} distinct "
                        f"values of data.partition_column = {column!r}, but data.num_clients = {num_clients}; set "
                        f"data.num_clients = {len(owners)}")
    return [np.sort(pool[groups[pool] == owner]).astype(np.int64) for owner in owners]


def _train_test(part: np.ndarray, labels: np.ndarray, fraction: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A client's own (train, test): stratified, with at least one example on each side (needs >= 2 examples)."""
    n_test = min(max(round(len(part) * fraction), 1), len(part) - 1)
    test, train = _stratified_take(part, labels, n_test, rng)
    return train, test


def split_federated(labels: np.ndarray, cfg: DataConfig, held_out: np.ndarray | None = None,
                    groups: np.ndarray | None = None) -> FederatedSplit:
    """Split examples (given by their integer ``labels``) into a global test set and per-client train/test sets.

    Deterministic in ``cfg.seed``; depends on nothing but ``labels``, ``cfg`` and ``held_out``. See the module
    docstring for the order of the stages. ``held_out``: a global test set the dataset fixes itself (math-word's
    separately generated test problems, python-functions' held-out modules); stages 1 and 2 are then skipped
    (the dataset is already sized) and every other example goes to the clients. Raises :class:`DataError` when
    there are too few examples for the clients, or when the requested partition cannot be built. ``groups``: each
    example's owner, for the natural-id partition.
    """
    labels = _check_labels(labels)
    if held_out is not None:
        global_test = np.unique(np.asarray(held_out, dtype=np.int64))
        if len(global_test) == 0 or global_test[0] < 0 or global_test[-1] >= len(labels):
            raise DataError(f"the dataset's held-out test set must be non-empty indices below {len(labels)}")
        pool = np.setdiff1d(np.arange(len(labels), dtype=np.int64), global_test, assume_unique=True)
        n, n_test = len(labels), len(global_test)
    else:
        everything = stratified_subsample(labels, cfg.max_examples, cfg.seed)
        n = len(everything)
        if n < 2:
            raise DataError(f"cannot split {n} example(s): need at least 2 (one for the global test set, one for "
                            "training)")
        n_test = min(max(round(n * cfg.test_fraction), 1), n - 1)
        global_test, pool = _stratified_take(everything, labels, n_test, stage_rng(cfg.seed, _GLOBAL_TEST))

    need = cfg.num_clients * cfg.min_examples_per_client
    if len(pool) < need:
        raise DataError(
            f"{len(pool)} examples remain for the clients after holding out {n_test} of {n} as the global test set, "
            f"but data.num_clients = {cfg.num_clients} x data.min_examples_per_client = "
            f"{cfg.min_examples_per_client} needs {need}; use fewer clients, a smaller minimum or more data"
        )

    rng = stage_rng(cfg.seed, _PARTITION)
    if cfg.partition == "natural-id" and groups is None:
        raise DataError("data.partition = 'natural-id': the dataset gives no owner per example "
                        "(data.partition_column)")
    if cfg.partitioner == "flower":  # Flower Datasets' own partitioners, for splits a Flower baseline shares
        from fedlora.data.flower_partition import flower_parts

        parts = flower_parts(pool, labels, cfg, groups)
    elif cfg.partition == "natural-id":
        assert groups is not None
        parts = natural_id(pool, np.asarray(groups), cfg.num_clients, cfg.partition_column)
    elif cfg.partition == "iid":
        parts = iid(pool, cfg.num_clients, rng)
    elif cfg.partition == "dirichlet":
        parts = dirichlet(pool, labels, cfg.num_clients, cfg.alpha, cfg.min_examples_per_client, rng)
    elif cfg.partition == "pathological":
        parts = pathological(pool, labels, cfg.num_clients, cfg.classes_per_client, rng)
    else:  # DataConfig validates the choice; this guards direct construction with a bad value
        raise DataError(f"data.partition = {cfg.partition!r} is unknown; choose iid, dirichlet or pathological")

    for client, part in enumerate(parts):
        if len(part) < cfg.min_examples_per_client:
            raise DataError(
                f"{cfg.partition} partition gave client {client} only {len(part)} examples, fewer than "
                f"data.min_examples_per_client = {cfg.min_examples_per_client}; use fewer data.num_clients"
                + (" or a larger data.classes_per_client" if cfg.partition == "pathological" else "")
            )

    client_rng = stage_rng(cfg.seed, _CLIENT_TEST)
    clients = tuple(ClientSplit(i, *_train_test(part, labels, cfg.client_test_fraction, client_rng))
                    for i, part in enumerate(parts))
    if cfg.validation_fraction > 0:  # stage 5: tuning sees validation data only
        val_rng = stage_rng(cfg.seed, _VALIDATION)
        small = [c.client_id for c in clients if len(c.train) < 2]
        if small:
            raise DataError(f"data.validation_fraction = {cfg.validation_fraction}: client {small[0]} has fewer than 2 "
                            "training examples to split into train and validation; use more data per client")
        clients = tuple(ClientSplit(c.client_id, *_train_test(c.train, labels, cfg.validation_fraction, val_rng))
                        for c in clients)
        global_test = np.sort(np.concatenate([c.test for c in clients])).astype(np.int64)
    return FederatedSplit(global_test=global_test, clients=clients)
