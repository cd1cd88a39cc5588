"""benchmarks/replication.py (issue 17) and the seams it needs: the validation split, the local-only method and the
paired statistics behind every verdict; its --quick mode end to end (every code path, then a resume that redoes
nothing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from fedlora import config
from fedlora.data.partition import split_federated
from fedlora.errors import ConfigError, DataError
from fedlora.report import RunDir
from fedlora.runtime import simulation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import claims_check as cc  # noqa: E402
import replication  # noqa: E402


# ------------------------------------------------------------------------------------------ validation split

def test_validation_split_is_carved_from_training_data_and_replaces_every_test_set() -> None:
    labels = np.random.default_rng(0).integers(0, 3, 600)
    plain = config.load(None, ["data.max_examples=0"]).data
    tuned = config.load(None, ["data.max_examples=0", "data.validation_fraction=0.25"]).data

    a, b = split_federated(labels, plain), split_federated(labels, tuned)

    for before, after in zip(a.clients, b.clients):
        assert set(after.train) | set(after.test) == set(before.train)  # validation comes out of training data
        assert not set(after.train) & set(after.test)
        assert not set(after.test) & set(before.test)  # no client test example is ever evaluated
        assert len(after.test) == round(0.25 * len(before.train))
    assert not set(b.global_test) & set(a.global_test)  # nor the global test set
    assert np.array_equal(b.global_test, np.sort(np.concatenate([c.test for c in b.clients])))
    assert np.array_equal(split_federated(labels, plain).global_test, a.global_test)  # off: unchanged


def test_validation_fraction_is_checked() -> None:
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        config.load(None, ["data.validation_fraction=1.0"])
    labels = np.array([0, 1, 0, 1, 0, 1])
    cfg = config.load(None, ["data.max_examples=0", "data.num_clients=2", "data.min_examples_per_client=2",
                             "data.client_test_fraction=0.5", "data.test_fraction=0.2",
                             "data.validation_fraction=0.5", "data.partition=iid"]).data
    with pytest.raises(DataError, match="fewer than 2 training examples"):
        split_federated(labels, cfg)


# ------------------------------------------------------------------------------------------------ local only

def test_local_method_sends_nothing_and_each_client_learns_alone(tmp_path: Path) -> None:
    cfg = tiny_config("method.name=local-only")

    summary = simulation.run(cfg, RunDir(tmp_path / "run"), progress=False)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["bytes_up_total"] == summary["bytes_down_total"] == summary["bytes_eval_sync_total"] == 0
    assert summary["acc_global"] is None and all(r["participants"] == [0, 1, 2] for r in records[1:])
    assert records[-1]["train_loss"] is not None and math.isfinite(records[-1]["train_loss"])


def test_local_method_refuses_a_shared_head() -> None:
    with pytest.raises(ConfigError, match="local-only training shares nothing"):
        tiny_config("method.name=local-only", "method.share_head=true")


# ------------------------------------------------------------------------------------------------ statistics

def test_paired_interval_by_hand() -> None:
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half width 4.302653 / sqrt(3) = 2.484138
    p = cc.paired({0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9}, {0: -0.5, 1: -1.4, 2: -2.3})

    assert p is not None and p.n == 3
    assert p.diff == pytest.approx(2.0) and p.lo == pytest.approx(2 - 2.484138, abs=1e-6)
    assert p.hi == pytest.approx(2 + 2.484138, abs=1e-6)
    assert cc.verdict(p) == "inconclusive"


@pytest.mark.parametrize("left,right,higher,expected", [
    ({0: 2.0, 1: 2.1, 2: 2.2}, {0: 1.0, 1: 1.0, 2: 1.1}, True, "holds"),
    ({0: 2.0, 1: 2.1, 2: 2.2}, {0: 1.0, 1: 1.0, 2: 1.1}, False, "does not hold"),
    ({0: 1.0, 1: 2.0}, {0: 2.0, 1: 1.0}, True, "inconclusive"),
    ({0: 1.0}, {0: 0.0}, True, "inconclusive"),  # one seed: no interval
    ({0: 1.0}, {1: 0.0}, True, "not run"),  # no common seed
])
def test_verdicts(left: dict[int, float], right: dict[int, float], higher: bool, expected: str) -> None:
    assert cc.verdict(cc.paired(left, right), higher) == expected


def test_a_comparison_with_a_method_at_the_majority_floor_is_not_judged() -> None:
    floors = {("d", s): cc.Floors(0.7, 0.5, (0.7,), (30,)) for s in (0, 1, 2)}
    v = {k: cc.Variant(k, k, k.upper()) for k in ("a", "b")}

    def cell(key: str, accs: list[float]) -> cc.CellResult:
        runs = {s: cc.RunNumbers(acc, None, 1, None, None, [], 1.0) for s, acc in enumerate(accs)}
        return cc.CellResult("d", "sgd", v[key], 0.1, runs)

    cells = {("d", "sgd", "a"): cell("a", [0.9, 0.91, 0.92]), ("d", "sgd", "b"): cell("b", [0.72, 0.73, 0.71])}
    block = cc.Block("x", "x", ("d",), "sgd", tuple(v.values()), (cc.Claim("1", "a", "b", "personal"),))

    rows = cc.judge([block], cells, floors)

    assert rows[0].verdict == "did not learn (B)"  # 2 points above its floor, below the 5-point margin
    assert rows[0].result is not None and rows[0].result.diff == pytest.approx(0.19)


def test_learning_rate_choice() -> None:
    assert replication.chosen_lr([(0.1, 0.8), (0.3, 0.9), (1.0, 0.9)]) == 0.3  # ties: the smaller lr
    assert replication.chosen_lr([(0.1, 0.8), (0.3, None)]) is None  # not every candidate has run


def test_a_dataset_budget_changes_only_its_dataset_and_the_probes_keep_the_base() -> None:
    args = type("Args", (), {"quick": False, "overrides": []})()
    central = next(v for v in replication.PRIVATE if v.central)
    fedsa = replication.PRIVATE[0]
    steps = {}
    for dataset in ("bbc-news", "rotten-tomatoes"):
        for base in (False, True):
            cfg = config.load(None, replication.overrides(args, dataset, "adamw", fedsa, 3e-3, base=base))
            pooled = config.load(None, replication.overrides(args, dataset, "adamw", central, 3e-3, base=base))
            assert pooled.train.local_steps == replication.CLIENTS * cfg.train.local_steps  # the same examples seen
            steps[(dataset, base)] = cfg.train.local_steps
    assert steps == {("bbc-news", False): 12, ("bbc-news", True): 12, ("rotten-tomatoes", False): 36,
                     ("rotten-tomatoes", True): 12}


# ------------------------------------------------------------------------------------------------- --quick

def test_quick_replication_runs_every_path_and_resumes(tmp_path: Path) -> None:
    out, doc = tmp_path / "runs", tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "replication.py"), "--quick", "--out", str(out), "--doc", str(doc)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)

    assert first.returncode == 0, first.stderr[-3000:]
    assert "FAILED" not in first.stdout, first.stdout[-3000:]
    text = doc.read_text()
    for heading in ("## Protocol", "## Verdicts", "## Claim 1", "## Claim 2", "## Claim 3", "## Accuracy per byte",
                    "## Learning curves", "## Learning-rate tuning", "## Majority-class floors", "## Missing cells"):
        assert heading in text
    assert "*local only*" in text and "*centralized (pooled data)*" in text and "*majority-class floor*" in text
    assert "Quick run" in text and "Partial" not in text and "None: every cell has every seed." in text
    assert any(w in text for w in ("**holds**", "**does not hold**", "**inconclusive**", "**did not learn"))
    tuned = list(out.glob("tune/*/*/*/*/runs/*/config.toml"))
    assert tuned and all("validation_fraction = 0.25" in p.read_text() for p in tuned)
    probed = list(out.glob("probe/*/*/*/*/runs/*/config.toml"))  # the learning curves at the base budget
    assert len(probed) == sum(len(vs) for _, _, vs in replication.PROBES)  # one lr per variant in --quick
    assert all("validation_fraction = 0.25" in p.read_text() for p in probed)
    assert "### At the base budget" in text and "Not run yet." not in text

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)

    assert again.returncode == 0, again.stderr[-3000:]
    assert "runs to do" not in again.stdout  # every finished run is reused
