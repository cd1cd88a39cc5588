"""What a run leaves behind is the model it evaluated (issue 14): honest bytes, saved = evaluated, export and
re-evaluation. Tiny-bert, 2 rounds; expected byte counts are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedlora.experiment import build
from fedlora.runtime.loop import run_round
from fedlora.runtime.simulation import make_server
from test_methods import Recorder

# tiny-bert: hidden 32, 2 layers, LoRA rank 4 on query and value (4 modules), float32, 2 labels.
A_SIDE = B_SIDE = 4 * (4 * 32) * 4  # 4 modules × 128 floats × 4 bytes
HEAD = (2 * 32 + 2) * 4


def rounds(*overrides: str, n: int = 2):  # type: ignore[no-untyped-def]
    exp = build(tiny_config(*overrides))
    server = make_server(exp)
    transport = Recorder(exp)
    records = [run_round(server, transport, exp.config, r, exp.split.global_test, evaluate=True)
               for r in range(1, n + 1)]
    return exp, server, transport, records


# ------------------------------------------------------------------------------------------- honest bytes
def test_fedex_residual_is_sent_at_its_true_rank() -> None:
    exp, server, _, records = rounds("method.name=fedex")
    # 3 clients, r = 4: the residual has (N−1)·r = 8 columns, 8 × (32 + 32) = 512 floats per module, cheaper
    # than the dense 32 × 32 = 1024 (the stacked (N+1)·r = 16 columns would have cost 1024, i.e. dense).
    residual = 4 * 512 * 4
    per_client = A_SIDE + B_SIDE + HEAD + residual
    for record in records:
        assert record["bytes_down"] == 3 * per_client
        assert record["bytes_eval_sync"] == 0  # every client took part
    latest = server.history[-1]
    assert latest.base_update and all(v.shape in ((32, 8), (8, 32)) for v in latest.base_update.values())


def test_evaluation_only_syncs_are_counted_apart() -> None:
    exp, _, _, records = rounds("method.name=fedit", "train.clients_per_round=1")
    broadcast = A_SIDE + B_SIDE + HEAD
    for record in records:
        assert len(record["participants"]) == 1
        # the round's broadcast reaches its participant (protocol) and the 2 others only to be evaluated;
        # each participant was brought up to date by the previous evaluation, so nothing is pending at fit
        assert record["bytes_down"] == broadcast
        assert record["bytes_eval_sync"] == 2 * broadcast


# ------------------------------------------------------------------------------------ saved = evaluated
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedlora import export  # noqa: E402
from fedlora.cli import main  # noqa: E402
from fedlora.report import RunDir  # noqa: E402
from fedlora.runtime import simulation  # noqa: E402

_RUNS: dict[tuple[str, ...], Path] = {}


def finished_run(tmp_path_factory: pytest.TempPathFactory, *overrides: str) -> Path:
    """A finished tiny run (cached per set of overrides for this test session)."""
    if overrides not in _RUNS:
        path = tmp_path_factory.mktemp("run") / "run"
        simulation.run(tiny_config(*overrides), RunDir(path), progress=False)
        _RUNS[overrides] = path
    return _RUNS[overrides]


SAVED_CASES = [("fedit", "lora"), ("ffa", "lora"), ("fedsa", "lora"), ("flora-na", "lora"), ("fedex", "lora"),
               ("flora", "lora"), ("fedex", "rslora"), ("flora", "rslora"), ("fedit", "vera"), ("fedsa", "vera")]


@pytest.mark.parametrize("method,adapter", SAVED_CASES)
def test_saved_models_reproduce_the_last_evaluation(tmp_path_factory, method: str, adapter: str) -> None:
    run = finished_run(tmp_path_factory, f"method.name={method}", f"adapter.kind={adapter}")
    summary = json.loads((run / "summary.json").read_text())
    for client in (None, 0, 2):
        if client is None and summary["acc_global"] is None:
            with pytest.raises(export.FedloraError, match="has no global model"):
                export.evaluate(run, None)
            continue
        result = export.evaluate(run, client)
        assert result["reproduced"], result
        want = summary["acc_global"] if client is None else summary["clients"][str(client)]
        assert result["metrics"]["acc"] == want
        if client is None:  # the loss, to all its digits: a model that differs anywhere would show here
            assert result["metrics"]["loss"] == result["recorded"]["loss"]
    changed = method in ("fedex", "flora")
    for folder in [run / "clients" / "0"] + ([run / "global"] if summary["acc_global"] is not None else []):
        assert (folder / export.BASE_FILE).is_file() == changed


def test_flora_learning_is_in_the_saved_base_weights(tmp_path_factory) -> None:
    run = finished_run(tmp_path_factory, "method.name=flora", "adapter.kind=lora")
    adapter = load_file(str(run / "global" / "adapter_model.safetensors"))
    assert all(not v.any() for k, v in adapter.items() if "lora_B" in k)  # merged: the adapter is fresh
    saved = export.load_saved(run)
    cfg = export._run_config(run)
    without = PeftModel.from_pretrained(export._base_model(cfg, ("rotten", "fresh")), str(run / "global"))
    batch = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])}
    with torch.no_grad():
        a, b = saved(**batch).logits, without.eval()(**batch).logits
        c = export.load_saved(run, client=1)(**batch).logits
    assert not torch.allclose(a, b)  # the federated training lives in base_weights.safetensors
    assert torch.equal(a, c)  # after the last broadcast every FLoRA client holds the global model
