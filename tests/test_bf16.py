"""The bf16 paths, on every machine: ``train.dtype = "auto"`` forced to bf16 (``FEDLORA_AUTO_DTYPE``), as a CPU
with bf16 units resolves it. The suite otherwise forces auto to float32 (tests/conftest.py), so that its
comparisons run one dtype on both sides whatever the CPU; here both sides of every comparison run bf16.

Small on purpose: where the CPU has no bf16 units PyTorch emulates bf16 and is many times slower than float32.
The Flower launcher's kill-and-resume comparison in bf16 is in tests/test_flower.py (parametrized by dtype).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import RESUMABLE, assert_same_run, interrupted_and_resumed, tiny_config
from fedlora import config
from fedlora.report import RunDir
from fedlora.runtime import simulation
from test_conformance import SMALL, check_conformance


@pytest.fixture
def auto_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_AUTO_DTYPE", "bfloat16")


@pytest.mark.usefixtures("auto_bf16")
@pytest.mark.parametrize("at", ["metrics:1", "aggregate:2"])
def test_a_bf16_run_killed_and_resumed_ends_as_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    at: str) -> None:
    # Prepare: the resumable tiny run with the dtype left to auto, which resolves to bf16 here.
    cfg = config.load(None, [*RESUMABLE, "train.rounds=3", "train.dtype=auto"])
    simulation.run(cfg, RunDir(tmp_path / "full"), progress=False)
    # Execute
    cut = interrupted_and_resumed(cfg, tmp_path / "cut", monkeypatch, at)
    # Assert: both ran bf16 (recorded, with the reason) and ended alike, metrics row for row, adapters bit for bit.
    for run in (tmp_path / "full", cut):
        assert config.load(run / "config.toml").train.dtype == "bfloat16"
    assert (tmp_path / "full" / "config.toml").read_text().splitlines()[0] == \
        "# train.dtype = 'bfloat16': auto chose bfloat16 because FEDLORA_AUTO_DTYPE=bfloat16 is set"
    assert_same_run(tmp_path / "full", cut)


@pytest.mark.usefixtures("auto_bf16")
@pytest.mark.parametrize("method,adapter", [("fedsa", "lora"), ("fedex", "lora"), ("flora-na", "rslora")])
def test_the_conformance_checks_hold_in_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                             adapter: str) -> None:
    # FedSA keeps private state on the clients, FedEx merges residuals into float32 masters of bf16-stored base
    # weights, FLoRA-NA replaces both factors from the server: the three ways a client's state moves.
    cfg = tiny_config(*SMALL, f"method.name={method}", f"adapter.kind={adapter}", "train.dtype=auto")
    check_conformance(cfg, tmp_path, monkeypatch)
    assert config.load(tmp_path / "full" / "config.toml").train.dtype == "bfloat16"
