"""Reliability: resume after SIGKILL, faulty clients, update validation (with property-based tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import RESUMABLE, TINY, assert_same_run, tiny_config
from fedlora import config as cfgmod
from fedlora.errors import ConfigError, UpdateRejected
from fedlora.methods import Upload
from fedlora.report import RunDir
from fedlora.runtime import simulation

SET = [arg for kv in RESUMABLE for arg in ("--set", kv)]


def cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "fedlora.cli", "run", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("point", ["fit:2", "aggregate:3", "metrics:2", "checkpoint-write:3"])
def test_sigkill_at_a_point_then_resume_gives_the_uninterrupted_result(tmp_path, reference, point) -> None:
    out = tmp_path / "run"
    proc = cli(*SET, "--out", str(out), env_extra={"FEDLORA_TEST_KILL_AT": point})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert not (out / "summary.json").exists()
    resumed = cli("--resume", str(out))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_run(reference, out)


@pytest.mark.parametrize("method", ["flora", "flexlora"])
def test_per_client_ranks_resume_bit_identical(tmp_path, method: str) -> None:
    """Clients of different ranks (one PEFT adapter per rank): the server's per-rank references, the clients'
    states, FlexLoRA's per-rank truncations and FLoRA's merged base weights all come back from the checkpoint."""
    hetero = (*TINY, "train.rounds=3", f"method.name={method}", "adapter.rank=[2,4,3]")
    ref = tmp_path / "ref"
    simulation.run(cfgmod.load(None, list(hetero)), RunDir(ref), progress=False)
    out = tmp_path / "run"
    proc = cli(*[arg for kv in hetero for arg in ("--set", kv)], "--out", str(out),
               env_extra={"FEDLORA_TEST_KILL_AT": "metrics:2"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    resumed = cli("--resume", str(out))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_run(ref, out)


def test_external_sigkill_mid_run_then_resume(tmp_path, reference) -> None:
    out = tmp_path / "run"
    proc = cli(*SET, "--out", str(out))
    deadline = time.monotonic() + 240
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:  # rounds 0, 1, 2 written
            break
        time.sleep(0.05)
    proc.kill()  # SIGKILL, wherever it is
    proc.communicate(timeout=60)
    if (out / "summary.json").exists():
        pytest.skip("the run finished before it could be killed")
    resumed = cli("--resume", str(out))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_run(reference, out)


def test_resume_refuses_mixing_with_a_new_config(tmp_path, capsys) -> None:
    from fedlora.cli import main

    assert main(["run", "--resume", str(tmp_path), "--set", "train.rounds=3"]) == 2
    assert "--resume DIR continues DIR with its own config.toml" in capsys.readouterr().err


# ---- faulty clients ------------------------------------------------------------------------------------------

FAULTY = ("faults.crash=0.25", "faults.nonfinite=0.25", "faults.wrong_shape=0.25", "faults.straggler=0.25",
          "train.round_timeout=30", "data.num_clients=4", "train.rounds=4", "train.min_clients=1")


@pytest.mark.parametrize("method", ["fedit", "fedsa", "ffa"])
def test_every_fault_type_is_survived_and_nothing_nonfinite_is_saved(tmp_path, method) -> None:
    summary = simulation.run(tiny_config(*FAULTY, f"method.name={method}"), RunDir(tmp_path / "run"), progress=False)
    injected = summary["faults_injected"]
    assert all(injected[k] > 0 for k in ("crash", "nonfinite", "wrong_shape", "straggler")), injected
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reasons = " ".join(m["reason"] for r in records for m in r["rejected"] + r["missing"])
    for fragment in ("crashed (injected fault)", "non-finite values", "has shape", "train.round_timeout"):
        assert fragment in reasons
    for path in (tmp_path / "run").glob("**/*.safetensors"):
        for key, t in load_file(str(path)).items():
            assert torch.isfinite(t).all(), (path, key)


def test_too_few_replies_fail_the_round_and_change_nothing(tmp_path) -> None:
    cfg = tiny_config("faults.crash=1.0", "method.name=fedit", "train.rounds=2")
    summary = simulation.run(cfg, RunDir(tmp_path / "run"), progress=False)
    assert summary["failed_rounds"] == [1, 2]
    init = load_file(str(tmp_path / "run" / "checkpoint" / "state.safetensors"))
    exp_state = {k[len("global/"):]: v for k, v in init.items() if k.startswith("global/")}
    from fedlora.experiment import build

    fresh = build(cfg).init_state
    for k, v in fresh.items():
        assert torch.equal(exp_state[k], v)


def test_update_norm_bound_rejects_outliers() -> None:
    from fedlora.experiment import build

    exp = build(tiny_config("method.name=fedit", "train.max_update_norm_ratio=3", "data.num_clients=4"))
    server = simulation.make_server(exp)
    ref = {k: exp.init_state[k] for k in exp.method.shared_keys()}
    ups = [Upload(c, {k: v + 0.01 * (c + 1) for k, v in ref.items()}, 10) for c in range(3)]
    ups.append(Upload(3, {k: v + 100.0 for k, v in ref.items()}, 10))
    kept, rejected = server.screen(ups, 1)
    assert [u.client for u in kept] == [0, 1, 2]
    assert rejected[0].client == 3 and "exceeds 3 × the round's median" in rejected[0].reason


# ---- property-based tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server_and_ref():
    from fedlora.experiment import build

    exp = build(tiny_config("method.name=fedit"))
    server = simulation.make_server(exp)
    return server, {k: exp.init_state[k] for k in exp.method.shared_keys()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_validation_accepts_exactly_the_well_formed_updates(server_and_ref, data) -> None:
    server, ref = server_and_ref
    keys = sorted(ref)
    payload = {k: v.clone() for k, v in ref.items()}
    fault = data.draw(st.sampled_from(["none", "nan", "inf", "shape", "dtype", "missing", "extra", "examples"]))
    key = data.draw(st.sampled_from(keys))
    n = 5
    if fault in ("nan", "inf"):
        i = data.draw(st.integers(0, payload[key].numel() - 1))
        payload[key].view(-1)[i] = float("nan") if fault == "nan" else float("-inf")
    elif fault == "shape":
        payload[key] = torch.zeros(*[d + 1 for d in payload[key].shape])
    elif fault == "dtype":
        payload[key] = payload[key].double()
    elif fault == "missing":
        del payload[key]
    elif fault == "extra":
        payload[key + ".extra"] = torch.zeros(1)
    elif fault == "examples":
        n = data.draw(st.integers(-5, 0))
    upload = Upload(0, payload, n)
    if fault == "none":
        server.validate(upload, 1)
    else:
        with pytest.raises(UpdateRejected):
            server.validate(upload, 1)


_KEYS = [(s, f.name) for s, cls in cfgmod.SECTIONS.items() for f in __import__("dataclasses").fields(cls)]
_VALUES = st.one_of(st.integers(-3, 300), st.floats(-2, 2, allow_nan=False), st.booleans(),
                    st.sampled_from(["lora", "fedit", "iid", "x", "", "minilm", "adamw"]),
                    st.lists(st.sampled_from(["query", "value"]), max_size=2))


@settings(max_examples=150, deadline=None)
@given(section_key=st.sampled_from(_KEYS), value=_VALUES)
def test_config_overrides_are_either_applied_exactly_or_refused_by_name(section_key, value) -> None:
    section, key = section_key
    try:
        cfg = cfgmod.from_dict({section: {key: value}})
    except ConfigError as e:
        assert f"{section}.{key}" in str(e) or "adapter.rank" in str(e) or "exceeds" in str(e) or "needs" in str(e)
        return
    got = getattr(getattr(cfg, section), key)
    want = tuple(value) if isinstance(value, list) else value
    assert got == want or (isinstance(want, int) and got == float(want))
