"""Experiments: the compare grid and its files, report, resuming an interrupted grid, the asymmetry analysis and
TensorBoard logging. Every run is the tiny experiment of conftest (tiny-bert, 2 rounds)."""

from __future__ import annotations

import csv
import json
import math
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import TINY, tiny_config
from fedlora.analyze import layer_similarities, mean_pairwise, pairwise_cosine
from fedlora.cli import main
from fedlora.compare import compare, parse_seeds, plan, skipped_notes
from fedlora.errors import ConfigError
from fedlora.methods import METHODS
from fedlora.runtime import simulation

TINY_SET = [arg for kv in TINY for arg in ("--set", kv)]
FILES = ("results.csv", "results.md", "runs.csv", "accuracy_vs_round.png", "accuracy_vs_bytes.png")
PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*")) if p.is_file()}


def grid(out: Path, **kwargs) -> None:
    compare(tiny_config(), ["fedit", "fedsa"], ["lora"], [0, 1], out, progress=False, echo=lambda s: None, **kwargs)


# ------------------------------------------------------------------------------------------------ the grid

def test_tiny_grid_writes_every_file_with_the_right_rows(tmp_path) -> None:
    out = tmp_path / "cmp"
    grid(out)

    for name in FILES:
        assert (out / name).is_file(), name
    for name in FILES[3:]:
        assert (out / name).read_bytes()[:8] == PNG
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["fedit-lora-s0", "fedit-lora-s1", "fedsa-lora-s0", "fedsa-lora-s1"]
    assert all((out / "runs" / r / "summary.json").is_file() for r in runs)

    rows = read_csv(out / "results.csv")
    assert [(r["method"], r["adapter"], r["seeds"], r["n"]) for r in rows] == [("fedit", "lora", "0 1", "2"),
                                                                              ("fedsa", "lora", "0 1", "2")]
    fedit, fedsa = rows
    assert fedsa["global_acc_mean"] == "" and fedit["global_acc_mean"] != ""  # FedSA has no global model
    assert float(fedsa["bytes_up_mean"]) < float(fedit["bytes_up_mean"])  # A side only vs A and B
    for r in rows:
        assert 0 <= float(r["personal_acc_mean"]) <= 1 and r["personal_acc_std"] != ""
        assert 0 <= float(r["rounds_to_95_mean"]) <= 2
    per_run = read_csv(out / "runs.csv")
    assert [(r["method"], r["seed"]) for r in per_run] == [("fedit", "0"), ("fedit", "1"), ("fedsa", "0"),
                                                           ("fedsa", "1")]
    md = (out / "results.md").read_text()
    assert "| fedit | lora | 0,1 |" in md and "| fedsa | lora | 0,1 |" in md and " ± " in md

    # The same seed gives every method the same data, partition, adapter init and training seed.
    cfg = {r: tomllib.loads((out / "runs" / r / "config.toml").read_text()) for r in runs}
    for section in ("data", "train", "adapter", "model"):
        assert cfg["fedit-lora-s0"][section] == cfg["fedsa-lora-s0"][section], section
    assert {cfg["fedit-lora-s1"][s]["seed"] for s in ("data", "train", "adapter")} == {1}

    # `fedlora report` rebuilds the same table from the run directories, given the compare dir or the runs.
    before = (out / "results.csv").read_text()
    for name in FILES:
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.csv").read_text() == before
    assert all((out / name).is_file() for name in FILES)
    elsewhere = tmp_path / "elsewhere"
    assert main(["report", *(str(out / "runs" / r) for r in runs), "--out", str(elsewhere)]) == 0
    assert (elsewhere / "results.csv").read_text() == before


def test_interrupted_grid_finishes_without_redoing_complete_runs(tmp_path, monkeypatch) -> None:
    out = tmp_path / "cmp"
    real_run = simulation.run
    started: list[str] = []

    def killed_during_third(config, out_dir, progress=True, exp=None, resume=False):  # type: ignore[no-untyped-def]
        started.append(out_dir.path.name)
        if len(started) == 3:
            def die(*args, **kwargs):  # the process dies after the last round, before summary.json
                raise KeyboardInterrupt
            out_dir.finish = die
        return real_run(config, out_dir, progress=progress, exp=exp, resume=resume)

    monkeypatch.setattr(simulation, "run", killed_during_third)
    with pytest.raises(KeyboardInterrupt):
        grid(out)
    complete = ["fedit-lora-s0", "fedit-lora-s1"]
    assert started == [*complete, "fedsa-lora-s0"]
    assert not (out / "runs" / "fedsa-lora-s0" / "summary.json").exists()
    assert (out / "runs" / "fedsa-lora-s0" / "metrics.jsonl").is_file()  # an incomplete run directory
    before = {r: mtimes(out / "runs" / r) for r in complete}

    started.clear()
    monkeypatch.setattr(simulation, "run", lambda config, out_dir, progress=True, exp=None, resume=False: (
        started.append(out_dir.path.name), real_run(config, out_dir, progress=progress, exp=exp, resume=resume))[1])
    grid(out)
    assert started == ["fedsa-lora-s0", "fedsa-lora-s1"]  # the incomplete one redone, the missing one run
    assert {r: mtimes(out / "runs" / r) for r in complete} == before  # complete runs untouched
    assert [r["n"] for r in read_csv(out / "results.csv")] == ["2", "2"]

    # A deleted summary.json makes that run incomplete: only it is redone.
    (out / "runs" / "fedit-lora-s1" / "summary.json").unlink()
    started.clear()
    grid(out)
    assert started == ["fedit-lora-s1"]

    # A complete run made with other settings is not silently reused.
    with pytest.raises(ConfigError, match=r"fedit-lora-s0' is a finished run with a different configuration "
                                          r"\(train.rounds: 2 there, 3 now\)"):
        compare(tiny_config("train.rounds=3"), ["fedit"], ["lora"], [0], out, progress=False, echo=lambda s: None)


def test_unsupported_combinations_are_skipped_and_named(monkeypatch) -> None:
    """What fits is the registry's one rule: a method that needs a capability the adapter kind lacks is skipped,
    with the config's own reason."""
    monkeypatch.setattr(METHODS["ffa"], "needs", frozenset({"factors"}))  # as if FFA needed low-rank factors
    cells = plan(tiny_config(), ["fedit", "ffa"], ["lora", "vera"], [0, 1])
    assert [(c.name, c.config is None) for c in cells] == [
        ("fedit-lora-s0", False), ("fedit-lora-s1", False), ("fedit-vera-s0", False), ("fedit-vera-s1", False),
        ("ffa-lora-s0", False), ("ffa-lora-s1", False), ("ffa-vera-s0", True), ("ffa-vera-s1", True)]
    assert cells[-1].reason.startswith("method.name = 'ffa' needs low-rank factors B, A")
    assert skipped_notes(cells) == [f"ffa × vera: {cells[-1].reason}"]


needs_flora_na = pytest.mark.skipif("flora-na" not in METHODS, reason="flora-na is not registered")


@needs_flora_na
def test_vera_and_dora_with_flora_na_are_skipped() -> None:
    cells = plan(tiny_config(), ["flora-na"], ["lora", "vera", "dora"], [0])
    assert [c.config is None for c in cells] == [False, True, True]
    assert cells[1].reason.startswith("method.name = 'flora-na' needs low-rank factors B, A")
    assert "no per-column magnitude" in cells[2].reason


def test_unknown_method_names_the_available_ones(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"--methods: 'nope' not available in this version; available: fed-sb, feddpa, fedex, fedit, "):
        plan(tiny_config(), ["fedit", "nope"], ["lora"], [0])
    assert main(["compare", *TINY_SET, "--methods", "fedit,nope", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlora: error: --methods: 'nope' not available") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,seeds", [("0,1,2", [0, 1, 2]), ("0-2", [0, 1, 2]), ("3, 1,3", [3, 1])])
def test_parse_seeds(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


# ------------------------------------------------------------------------------------------- asymmetry

def test_pairwise_cosine_by_hand() -> None:
    sim = pairwise_cosine([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])])
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(sim, torch.tensor([[1, 0, r], [0, 1, r], [r, r, 1]], dtype=torch.float64))
    assert mean_pairwise(sim) == pytest.approx((0 + r + r) / 3)
    with_zero = pairwise_cosine([torch.ones(3), torch.zeros(3), torch.ones(3)])
    assert math.isnan(with_zero[0, 1]) and mean_pairwise(with_zero) == pytest.approx(1.0)  # no direction: ignored


@pytest.mark.parametrize("a_suffix,b_suffix", [(".lora_A.weight", ".lora_B.weight"),
                                               (".vera_lambda_d", ".vera_lambda_b")])
def test_shared_a_and_differing_b_make_a_more_similar(a_suffix: str, b_suffix: str) -> None:
    """Three clients whose A moved identically from a shared init and whose B are one-hot at different places:
    A's similarity is exactly 1 (learned and change), B's exactly 0."""
    layers = [f"base_model.model.bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    gen = torch.Generator().manual_seed(0)
    init, states = {}, [{}, {}, {}]
    for layer in layers:
        a0, b0 = torch.randn(4, 6, generator=gen), torch.zeros(5, 4)
        step = torch.randn(4, 6, generator=gen)
        init[layer + a_suffix], init[layer + b_suffix] = a0, b0
        for u, state in enumerate(states):
            b = torch.zeros(5, 4)
            b[u, u] = 1.0 + u
            state[layer + a_suffix], state[layer + b_suffix] = a0 + step, b
    init["base_model.model.classifier.weight"] = torch.zeros(2, 6)  # a head is neither side: ignored
    sims = layer_similarities(states, init)
    assert [s.layer for s in sims] == layers
    for s in sims:
        row = s.row()
        assert row["a_similarity"] == pytest.approx(1.0) and row["a_change_similarity"] == pytest.approx(1.0)
        assert row["b_similarity"] == 0.0 and row["b_change_similarity"] == 0.0
        assert row["a_similarity"] > row["b_similarity"]
        assert row["b_init_norm"] == 0.0 and row["b_change_norm"] == pytest.approx(2.0)  # mean of 1, 2, 3


def test_tiny_asymmetry_run_writes_the_files(tmp_path, capsys) -> None:
    out = tmp_path / "asym"
    assert main(["analyze", "asymmetry", *TINY_SET, "--out", str(out), "--quiet"]) == 0
    assert "learned" in capsys.readouterr().out
    rows = read_csv(out / "asymmetry.csv")
    assert len(rows) == 4  # tiny-bert: 2 layers × (query, value)
    assert all(r["layer"].endswith((".query", ".value")) for r in rows)
    for r in rows:
        for key in ("a_similarity", "b_similarity", "a_change_similarity", "b_change_similarity"):
            assert -1.0 <= float(r[key]) <= 1.0 + 1e-9
    summary = json.loads((out / "asymmetry.json").read_text())
    assert summary["num_clients"] == 3 and summary["layers"] == 4 and summary["local_steps_per_client"] == 4
    assert (out / "asymmetry.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------------- TensorBoard

def test_tensorboard_missing_is_a_clear_error(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    out = tmp_path / "run"
    assert main(["run", *TINY_SET, "--tensorboard", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard needs the tensorboard package: pip install 'fedlora[tensorboard]'" in err
    assert not out.exists()


def test_tensorboard_logs_every_round(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["run", *TINY_SET, "--set", "method.name=fedit", "--tensorboard", "--out", str(out), "--quiet"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy/personal_mean")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("accuracy/global")] == [0, 1, 2]
    total = json.loads((out / "summary.json").read_text())["bytes_up_total"]
    assert events.Scalars("bytes/up_total")[-1].value == total
