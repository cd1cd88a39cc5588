"""Shared fixtures: a tiny, fast experiment (tiny-bert on a few hundred real examples)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# train.dtype = "auto" resolves to float32 in every test, and in every process a test starts, on every machine:
# with bf16 units "auto" would pick bf16, and a comparison of two runs (or of a run against fixed numbers) must run
# one dtype on both sides. The bf16 paths are tested with it set to "bfloat16" (tests/test_bf16.py), and the tests
# of auto's own choice unset it. Read only by fedlora.precision.choose_dtype.
os.environ["FEDLORA_AUTO_DTYPE"] = "float32"

import pytest
import torch
from safetensors.torch import load_file

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


# ---- a run that can be killed and resumed, and how two runs are compared (test_reliability, test_hardening) ---

RESUMABLE = (*TINY, "train.rounds=4", "adapter.dropout=0.1", "method.name=fedit")


def comparable(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapters_of(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.parent.relative_to(run)): load_file(str(p)) for p in sorted(run.glob("**/adapter_model.safetensors"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    from fedlora.report import RunDir
    from fedlora.runtime import simulation

    out = tmp_path_factory.mktemp("ref") / "run"
    simulation.run(config.load(None, list(RESUMABLE)), RunDir(out), progress=False)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert comparable(a) == comparable(b)
    ta, tb = adapters_of(a), adapters_of(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), (name, key)  # bit for bit


class Stop(Exception):
    """Stands for a crash: raised by the kill switch instead of SIGKILL, so the test stays in-process."""


def interrupted_and_resumed(cfg: config.Config, out: Path, monkeypatch: pytest.MonkeyPatch, at: str) -> Path:
    """Run ``cfg`` into ``out``, stopped by the kill switch at ``at`` (``point:round``, e.g. ``metrics:1``), then
    resumed there; returns ``out``."""
    from fedlora.report import RunDir
    from fedlora.runtime import observers, simulation

    def stop(self: observers.KillSwitch, point: str, round_: int) -> None:
        if self.target == f"{point}:{round_}":
            raise Stop(self.target)

    with monkeypatch.context() as m:
        m.setattr(observers.KillSwitch, "event", stop)
        m.setenv("FEDLORA_TEST_KILL_AT", at)
        with pytest.raises(Stop):
            simulation.run(cfg, RunDir(out), progress=False)
    simulation.run(cfg, RunDir(out, resume=True), progress=False, resume=True)
    return out
