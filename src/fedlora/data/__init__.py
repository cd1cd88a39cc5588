"""Datasets (bundled and user files), federated splits and tokenization."""

from fedlora.data.datasets import TextDataset, load_dataset
from fedlora.data.partition import ClientSplit, FederatedSplit, split_federated

__all__ = ["ClientSplit", "FederatedSplit", "TextDataset", "load_dataset", "split_federated"]
