"""The command line: listings, a tiny run, and bad input (one line, exit 2, no traceback, nothing touched)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TINY
from fedlora.cli import main

TINY_SET = [arg for kv in TINY for arg in ("--set", kv)]


def test_methods_lists_every_method_and_adapter(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("fedit", "ffa", "fedsa", "lora", "rslora", "vera"):
        assert f"  {name} " in out


def test_run_writes_a_run_directory_and_prints_the_table(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    assert main(["run", *TINY_SET, "--set", "method.name=fedit", "--set", "adapter.kind=vera", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fedit/vera" in printed and "personal" in printed and "down" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedit" and summary["adapter"] == "vera"


def test_config_file_and_overrides(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[method]\nname = "ffa"\n[adapter]\nkind = "rslora"\nrank = 2\n')
    assert main(["config", str(cfg), "--set", "adapter.rank=3"]) == 0
    out = capsys.readouterr().out
    assert 'name = "ffa"' in out and "rank = 3" in out and 'kind = "rslora"' in out
    assert "lr = 0.003" in out and "share_head = true" in out  # resolved defaults are written out


BAD = [
    (["--set", "method.name=fedavg"], "method.name = 'fedavg' is not allowed; choose one of: fed-sb, feddpa, fedex, fedit"),
    (["--set", "method.nmae=fedit"], "unknown key method.nmae (did you mean 'name'?)"),
    (["--set", "trian.rounds=3"], "unknown section [trian] (did you mean 'train'?)"),
    (["--set", "train.rounds=-1"], "train.rounds = -1 is out of range; it must be >= 1"),
    (["--set", "train.rounds=ten"], "train.rounds = 'ten' has the wrong type; expected an integer"),
    (["--set", "adapter.kind=lokr"], "adapter.kind = 'lokr' is not allowed; choose one of: dora, lora, lora-sb, rslora, vera"),
    (["--set", "method.name=fedex", "--set", "adapter.kind=vera"], "method.name = 'fedex' needs low-rank factors B, A"),
    (["--set", "data.dataset=csv"], "data.dataset = 'csv' needs data.path"),
    (["--set", "data.dataset=csv", "--set", "data.path=/nonexistent.csv"], "/nonexistent.csv"),
    (["--set", "model.name=/no/such/model"], "model.name = '/no/such/model' is neither a bundled model"),
    (["--set", "train.clients_per_round=9"], "train.clients_per_round = 9 exceeds data.num_clients = 3"),
    (["--set", "rounds"], "--set 'rounds' must look like section.key=value"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message) -> None:
    keep = tmp_path / "existing"
    keep.mkdir()
    (keep / "metrics.jsonl").write_text("precious\n")
    (keep / ".fedlora-run").write_text("{}\n")  # an earlier run's folder: --overwrite may replace it, once started
    code = main(["run", *TINY_SET, *args, "--out", str(keep), "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (keep / "metrics.jsonl").read_text() == "precious\n"  # nothing overwritten


def test_missing_column_names_the_columns(tmp_path, capsys) -> None:
    data = tmp_path / "d.csv"
    data.write_text("review,stars\ngood,1\nbad,0\n")
    code = main(["run", *TINY_SET, "--set", "data.dataset=csv", "--set", f"data.path={data}",
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "text" in err and "review" in err


def test_existing_run_directory_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["run", *TINY_SET, "--out", str(out), "--quiet"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "{}"


def test_missing_config_file(capsys) -> None:
    assert main(["run", "/no/such/config.toml"]) == 2
    assert "config file '/no/such/config.toml' does not exist" in capsys.readouterr().err


def test_console_script_exit_status_without_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", "--set", "method.name=nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fedlora: error: method.name = 'nope'")
    assert "Traceback" not in proc.stderr
