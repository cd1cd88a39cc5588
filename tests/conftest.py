"""Shared fixtures: a tiny, fast experiment (tiny-bert on a few hundred real examples)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import pytest
import torch

from fedlora import config

torch.set_num_threads(1)  # the test machine has 2 cores; one thread per test process is the fastest

TINY = (
    "model.name=tiny-bert",
    "data.max_examples=240",
    "data.num_clients=3",
    "train.rounds=2",
    "train.local_steps=2",
    "train.batch_size=8",
    "train.max_length=24",
    "train.threads=1",
    "adapter.rank=4",
    "train.dtype=float32",  # exact comparisons in the tests; "auto" would pick bf16 on a machine with bf16 units
)


def tiny_config(*overrides: str) -> config.Config:
    """The tiny experiment with extra ``section.key=value`` overrides."""
    return config.load(None, list(TINY) + list(overrides))


@pytest.fixture
def tiny() -> config.Config:
    return tiny_config()
