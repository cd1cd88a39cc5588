"""Hostile inputs and storage faults: every case is refused with one line and exit status 2 (or ends with a
distinct status), and nothing outside the run's own files is touched.

Refusals run in-process through ``cli.main`` (fast: nothing is loaded before the refusal); kills, concurrent
writers and full disks use real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RESUMABLE, TINY, assert_same_run, comparable  # and the fixture reference
from fedlora import config as cfgmod
from fedlora.cli import EXIT_NOTHING_LEARNED, main
from fedlora.report import RunDir
from fedlora.runtime import simulation
from fedlora.storage import LOCK_FILE, DirLock

SET = [arg for kv in RESUMABLE for arg in ("--set", kv)]
TINY_SET = [arg for kv in TINY for arg in ("--set", kv)]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under ``root`` (except under ``skip``, and the lock files, which name their last holder) with a
    hash of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        if (skip is not None and (p == skip or skip in p.parents)) or p.name == LOCK_FILE:
            continue
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, args: list[str], message: str, status: int = 2) -> str:
    """Run the CLI in-process; assert the exit status and that stderr is one line holding ``message``."""
    assert main(args) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    return lines[0]


def cli(*args: str, env_extra: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", *args, "--quiet"], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# ---- --overwrite removes only fedlora's own files ------------------------------------------------------------

def test_overwrite_refuses_a_folder_of_user_files_and_deletes_nothing(tmp_path, capsys) -> None:
    thesis = tmp_path / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "chapter1.tex").write_text("precious")
    (thesis / "figures" / "f.png").write_bytes(b"\x89PNG")
    before = snapshot(tmp_path)
    refused(capsys, ["run", *TINY_SET, "--out", str(thesis), "--overwrite", "--quiet"],
            "holds files fedlora did not write ('chapter1.tex', 'figures'); nothing was deleted")
    assert snapshot(tmp_path) == before


def test_overwrite_of_the_current_directory_is_refused(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, err = finish(cli(*TINY_SET, "--out", ".", "--overwrite", cwd=tmp_path), timeout=120)
    assert code == 2 and "'notes.txt'" in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_an_earlier_run_but_not_a_user_file_put_inside_it(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", *TINY_SET, "--set", "train.rounds=1", "--out", str(out), "--quiet"]) == 0
    (out / "my-analysis.ipynb").write_text("{}")
    before = snapshot(tmp_path)
    refused(capsys, ["run", *TINY_SET, "--out", str(out), "--overwrite", "--quiet"], "'my-analysis.ipynb'")
    assert snapshot(tmp_path) == before
    (out / "my-analysis.ipynb").unlink()
    assert main(["run", *TINY_SET, "--set", "train.rounds=2", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert [r["round"] for r in comparable(out)] == [0, 1, 2]


def test_overwrite_refuses_a_folder_without_the_run_marker(tmp_path, capsys) -> None:
    """A folder named like run output (e.g. a user's own clients/ folder) is not a run directory."""
    out = tmp_path / "data"
    (out / "clients").mkdir(parents=True)
    (out / "clients" / "list.csv").write_text("a,b\n")
    before = snapshot(tmp_path)
    refused(capsys, ["run", *TINY_SET, "--out", str(out), "--overwrite", "--quiet"], "not a fedlora run directory")
    assert snapshot(tmp_path) == before


# ---- bad values: refused before anything is loaded or written ------------------------------------------------

BAD_VALUES = [
    (["--set", "train.lr=nan"], "train.lr = nan is not a finite number"),
    (["--set", "train.lr=inf"], "train.lr = inf is not a finite number"),
    (["--set", "adapter.alpha=-inf"], "adapter.alpha = -inf is not a finite number"),
    (["--set", "train.rounds=3000000000"], "train.rounds = 3000000000 is out of range; it must be <= 1000000"),
    (["--set", "train.threads=2000000000"], "train.threads = 2000000000 is out of range; it must be <= 1024"),
    (["--set", "train.batch_size=1000000000"], "train.batch_size = 1000000000 is out of range; it must be <= 65536"),
    (["--set", "data.num_clients=5000000000"], "data.num_clients = 5000000000 is out of range"),
    (["--set", "train.max_length=100000"], "train.max_length = 100000 exceeds the position limit of model.name = "
                                           "'tiny-bert' (512 tokens)"),
    (["--set", "data.text_column=review", "--set", "data.label_column=review"],
     "data.text_column and data.label_column are both 'review'"),
]


@pytest.mark.parametrize("args,message", BAD_VALUES, ids=[m[:40] for _, m in BAD_VALUES])
def test_bad_values_are_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, args, message) -> None:
    out = tmp_path / "run"
    refused(capsys, ["run", *TINY_SET, *args, "--out", str(out), "--quiet"], message)
    assert not out.exists()


def test_output_under_a_file_or_in_an_unwritable_place_is_refused_before_loading(tmp_path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    refused(capsys, ["run", *TINY_SET, "--out", str(tmp_path / "afile" / "run"), "--quiet"], "is a file, not a "
                                                                                               "directory")
    refused(capsys, ["run", *TINY_SET, "--out", "/proc/fedlora-run", "--quiet"], "cannot be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_nan_label_cell_is_refused(tmp_path, capsys) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))
                    + "another review,NaN\n")
    refused(capsys, ["run", *TINY_SET, "--set", "data.dataset=csv", "--set", f"data.path={data}", "--out",
                     str(tmp_path / "run"), "--quiet"], "line 42: the label in column 'label' is 'NaN', which marks a "
                                                        "missing value")
    assert not (tmp_path / "run").exists()


def test_report_and_analyze_refuse_bad_outputs_and_malformed_runs(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["run", *TINY_SET, "--set", "train.rounds=1", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    (tmp_path / "file.txt").write_text("keep")
    before = snapshot(tmp_path)
    refused(capsys, ["report", str(run), "--out", str(tmp_path / "file.txt")], "exists and is not a directory")
    refused(capsys, ["analyze", "asymmetry", *TINY_SET, "--out", str(tmp_path / "file.txt"), "--quiet"],
            "exists and is not a directory")
    assert snapshot(tmp_path) == before
    for bad, message in (('["a list"]', "expected a JSON object"), ('{"acc_global": "high"}', "acc_global = 'high' "
                                                                                                "is not a number"),
                         ("{not json", "cannot read the run")):
        (run / "summary.json").write_text(bad)
        refused(capsys, ["report", str(run), "--out", str(tmp_path / "table")], message)
    assert not (tmp_path / "table").exists()


def test_a_run_in_which_every_round_failed_exits_with_its_own_status(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    refused(capsys, ["run", *TINY_SET, "--set", "faults.crash=1.0", "--out", str(out), "--quiet"],
            "every round failed (2 of 2)", status=EXIT_NOTHING_LEARNED)
    assert (out / "summary.json").is_file()  # the run is recorded, as it happened


# ---- one writer per folder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["run", "overwrite", "resume"])
def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, capsys, mode) -> None:
    out = tmp_path / "run"
    if mode != "run":
        assert main(["run", *TINY_SET, "--set", "train.rounds=1", "--out", str(out), "--quiet"]) == 0
        (out / "summary.json").unlink()  # an unfinished run, as resume expects
        capsys.readouterr()
    else:
        out.mkdir()
    holder = DirLock(out)
    holder.acquire()  # another open file description: to flock, this is another writer
    try:
        before = snapshot(tmp_path)
        args = {"run": ["run", *TINY_SET, "--out", str(out), "--quiet"],
                "overwrite": ["run", *TINY_SET, "--out", str(out), "--overwrite", "--quiet"],
                "resume": ["run", "--resume", str(out), "--quiet"]}[mode]
        refused(capsys, args, f"is in use by another fedlora process (PID {os.getpid()})")
        assert snapshot(tmp_path) == before
    finally:
        holder.release()


def test_two_real_processes_on_one_folder(tmp_path) -> None:
    """The first holds the folder until it ends; the second, started meanwhile, is refused."""
    out = tmp_path / "run"
    first = cli(*SET, "--set", "train.rounds=40", "--out", str(out))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.05)
    second = cli(*SET, "--out", str(out), "--overwrite")
    code, err = finish(second, timeout=120)
    first.kill()
    first.communicate(timeout=60)
    assert code == 2 and f"PID {first.pid}" in err, err


# ---- resume checks what it continues ------------------------------------------------------------------------

@pytest.fixture
def killed_run(tmp_path) -> Path:
    """A run SIGKILLed right after round 2's metrics were written (checkpoints of rounds 0 and 1 exist)."""
    out = tmp_path / "run"
    code, err = finish(cli(*SET, "--out", str(out), env_extra={"FEDLORA_TEST_KILL_AT": "metrics:2"}))
    assert code == -signal.SIGKILL, err
    return out


EDITS = [("adapter", "rank", "8"), ("data", "num_clients", "4"), ("model", "name", '"minilm"'),
         ("data", "seed", "7"), ("method", "name", '"fedsa"'), ("adapter", "targets", '["query"]')]


def _edit(run: Path, section: str, key: str, value: str) -> None:
    import tomllib

    import tomli_w

    raw = tomllib.loads((run / "config.toml").read_text())
    raw[section][key] = tomllib.loads(f"v = {value}")["v"]
    (run / "config.toml").write_text(tomli_w.dumps(raw))


def test_resume_refuses_every_edit_that_changes_the_state_or_the_data(killed_run, capsys) -> None:
    original = (killed_run / "config.toml").read_text()
    for section, key, value in EDITS:
        _edit(killed_run, section, key, value)
        before = snapshot(killed_run)
        line = refused(capsys, ["run", "--resume", str(killed_run), "--quiet"],
                       "config.toml no longer matches the checkpointed run")
        assert f"{section}.{key}:" in line, line
        assert snapshot(killed_run) == before
        (killed_run / "config.toml").write_text(original)


def test_resume_with_more_rounds_is_allowed_and_recorded(tmp_path, killed_run) -> None:
    reference = tmp_path / "ref5"
    simulation.run(cfgmod.load(None, [*RESUMABLE, "train.rounds=5"]), RunDir(reference), progress=False)
    _edit(killed_run, "train", "rounds", "5")
    code, err = finish(cli("--resume", str(killed_run)))
    assert code == 0, err
    assert_same_run(reference, killed_run)
    entries = [json.loads(line) for line in (killed_run / "resumes.jsonl").read_text().splitlines()]
    assert entries[-1]["from_round"] == 1 and entries[-1]["changed"] == {"train.rounds": [4, 5]}


# ---- damaged checkpoints --------------------------------------------------------------------------------------

def test_damaged_checkpoints_are_refused_and_the_previous_one_continues(reference, killed_run, capsys) -> None:
    state = killed_run / "checkpoint" / "state.safetensors"
    good = state.read_bytes()
    data = bytearray(good)
    data[-5] ^= 0x10  # one bit inside the tensor data
    state.write_bytes(bytes(data))
    line = refused(capsys, ["run", "--resume", str(killed_run), "--quiet"], "its checksum does not match")
    assert "previous.safetensors" in line and "mv " in line
    state.write_bytes(good[: len(good) // 2])  # truncated
    refused(capsys, ["run", "--resume", str(killed_run), "--quiet"], "is damaged or truncated")
    # Continue from the previous round's checkpoint, as the message says: the result is the uninterrupted run's.
    os.replace(killed_run / "checkpoint" / "previous.safetensors", state)
    assert main(["run", "--resume", str(killed_run), "--quiet"]) == 0
    assert_same_run(reference, killed_run)


# ---- kills at every kind of point, a second kill during the resume, Ctrl-C -----------------------------------

@pytest.mark.parametrize("first,second", [("metrics:0", None), ("checkpoint-write:0", None),
                                          ("adapter-write:0", None), ("metrics:1", "checkpoint-write:3")])
def test_kills_then_resume_give_the_uninterrupted_metrics_and_adapters(tmp_path, reference, first, second) -> None:
    out = tmp_path / "run"
    code, err = finish(cli(*SET, "--out", str(out), env_extra={"FEDLORA_TEST_KILL_AT": first}))
    assert code == -signal.SIGKILL, err
    if second is not None:  # killed again while resuming
        code, err = finish(cli("--resume", str(out), env_extra={"FEDLORA_TEST_KILL_AT": second}))
        assert code == -signal.SIGKILL, err
    code, err = finish(cli("--resume", str(out)))
    assert code == 0, err
    assert_same_run(reference, out)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.old"))


def test_ctrl_c_after_round_0_then_resume_does_not_repeat_round_0(tmp_path, reference) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, "
                             "signal.default_int_handler); from fedlora.cli import main; sys.exit(main(sys.argv[1:]))",
                             "run", *SET, "--out", str(out), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    code, _ = finish(proc)
    if code == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert code == 130
    code, err = finish(cli("--resume", str(out)))
    assert code == 0, err
    assert_same_run(reference, out)


# ---- a full disk ------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs (root and mount(8) needed; otherwise the test is skipped with the reason)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_a_clear_error_and_the_run_resumes_once_space_is_freed(small_disk, reference) -> None:
    from fedlora.checkpoint import has_checkpoint, read_checkpoint

    out = small_disk / "run"
    code, err = finish(cli(*SET, "--out", str(out)))
    assert code == 2, err
    assert "no space left on the device" in err and "Traceback" not in err, err
    assert not list(out.rglob("*.tmp"))  # no litter
    if has_checkpoint(out / "checkpoint"):
        read_checkpoint(out / "checkpoint")  # the last checkpoint is intact (its checksum verifies)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    code, err = finish(cli("--resume", str(out)))
    assert code == 0, err
    assert_same_run(reference, out)
    assert shutil.disk_usage(small_disk).used > 0


# Keys added to fedlora after a run was checkpointed (issue 25 added these): an earlier release's checkpoint and
# config.toml lack them.
ADDED_LATER = [("model", "revision"), ("model", "causal"), ("data", "config_name"), ("data", "metric"),
               ("data", "partitioner"), ("data", "partition_column"), ("data", "shards_per_client")]


def _as_earlier_release(run: Path, keep_in_toml: dict[tuple[str, str], object] | None = None) -> None:
    """Rewrite ``run``'s checkpoints and config.toml as a release without the ADDED_LATER keys wrote them
    (checkpoint checksums recomputed); ``keep_in_toml``: keys set in config.toml anyway, to these values."""
    import tomllib

    import tomli_w
    from safetensors.torch import save_file

    from fedlora.checkpoint import _digest, read_checkpoint

    for file in sorted((run / "checkpoint").glob("*.safetensors")):
        meta, tensors = read_checkpoint(run / "checkpoint", file.name)
        for section, key in ADDED_LATER:
            meta["config"][section].pop(key, None)
        meta_json = json.dumps(meta)
        save_file(tensors, str(file), metadata={"meta": meta_json, "sha256": _digest(meta_json, tensors)})
    raw = tomllib.loads((run / "config.toml").read_text())
    for section, key in ADDED_LATER:
        raw[section].pop(key, None)
    for (section, key), value in (keep_in_toml or {}).items():
        raw[section][key] = value
    (run / "config.toml").write_text(tomli_w.dumps(raw))


def test_a_run_checkpointed_by_an_earlier_release_resumes_to_the_uninterrupted_result(reference, killed_run) -> None:
    # Prepare: the killed run as an earlier release left it, without the keys added since.
    _as_earlier_release(killed_run)
    # Execute
    code, err = finish(cli("--resume", str(killed_run)))
    # Assert: accepted (the added keys hold what the earlier release did), and the same run as without the kill.
    assert code == 0, err
    assert_same_run(reference, killed_run)
    entry = json.loads((killed_run / "resumes.jsonl").read_text().splitlines()[-1])
    assert entry["changed"] == {}


def test_a_key_added_since_the_checkpoint_but_set_to_something_else_is_refused(killed_run, capsys) -> None:
    _as_earlier_release(killed_run, keep_in_toml={("data", "shards_per_client"): 3})
    line = refused(capsys, ["run", "--resume", str(killed_run), "--quiet"],
                   "config.toml no longer matches the checkpointed run")
    assert "data.shards_per_client: None in the checkpoint, 3 now" in line, line
