"""Secure aggregation on the Flower runtime (privacy.secure_aggregation = true; fedlora.runtime.flower_secagg):
Flower's SecAgg+ workflow and mod between fedlora's ServerApp and ClientApp.

Most tests run the ServerApp and the ClientApp in this process through test_flower's LoopbackGrid (Flower's
messages, no network), so that every message the ServerApp received can be inspected; one runs real processes on
127.0.0.1. Tolerance: SecAgg+ quantises each client's weighted entries to steps of 2·8 / 2²² = 3.8e-6 (stochastic
rounding, so each is off by less than one step), hence the mean of m clients is off by at most
m · step / Σ (n_u / max n) per entry (:func:`bound`), plus float32 rounding of the result.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from safetensors.torch import load_file

from conftest import tiny_config
from fedlora.config import Config
from fedlora.experiment import build
from fedlora import registry
from fedlora.methods import METHODS
from fedlora.methods.base import Method
from fedlora.privacy.secagg import Parameters
from fedlora.report import RunDir
from fedlora.runtime import flower_secagg, simulation
from test_flower import BOUND, assert_all_stopped, loopback_run, records

SUM_ONLY = sorted(n for n, m in METHODS.items() if m.sum_only)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Message() in this process needs them


def secure(*overrides: str) -> Config:
    return tiny_config("data.num_clients=3", "train.rounds=1", "runtime.kind=flower",
                       "privacy.secure_aggregation=true", *overrides)


def plain(cfg: Config) -> Config:
    return replace(cfg, privacy=replace(cfg.privacy, secure_aggregation=False),
                   runtime=replace(cfg.runtime, kind="simulation"))


def bound(cfg: Config, clients: list[int]) -> float:
    """The largest error of one entry of the secure mean of ``clients``' uploads (module docstring)."""
    exp = build(plain(cfg))
    n = [len(exp.clients[c].train) for c in clients]
    ratios = [1.0] * len(n) if cfg.method.weighting == "uniform" else [x / max(n) for x in n]
    return len(n) * Parameters().step() / sum(ratios) + 1e-7  # + float32 rounding of entries ~1


def adapters(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.parent.relative_to(run)): load_file(str(p)) for p in sorted(run.glob("**/adapter_model.safetensors"))}


def max_diff(a: Path, b: Path) -> float:
    x, y = adapters(a), adapters(b)
    assert x.keys() == y.keys() and x
    return max(float((x[n][k] - y[n][k]).abs().max()) for n in x for k in x[n])


def max_product_diff(a: Path, b: Path, eps: float) -> float:
    """Max difference of every layer's B·A between two runs' adapters; asserts it is within what an error of
    ``eps`` per entry of B (A fixed, r rows) can cause, and that every other tensor is within ``eps``."""
    x, y = adapters(a), adapters(b)
    worst = 0.0
    for n in x:
        for k in x[n]:
            if "lora_B" in k:
                ka = k.replace("lora_B", "lora_A")
                d = float((x[n][k] @ x[n][ka] - y[n][k] @ y[n][ka]).abs().max())
                assert d <= eps * x[n][ka].shape[0] * float(x[n][ka].abs().max()) + 1e-6, (n, k)
                worst = max(worst, d)
            elif "lora_A" not in k:
                assert float((x[n][k] - y[n][k]).abs().max()) <= eps, (n, k)
    return worst


# ---- the result: the plain run's, up to quantisation ------------------------------------------------------------
@pytest.mark.parametrize("method", SUM_ONLY)
def test_a_secure_round_gives_the_plain_result_up_to_quantisation(tmp_path: Path, method: str) -> None:
    fits = registry.fitting_adapters(METHODS[method])
    adapter = "lora" if "lora" in fits else fits[0]  # Fed-SB trains LoRA-SB's cores
    cfg = secure(f"method.name={method}", f"adapter.kind={adapter}")
    simulation.run(plain(cfg), RunDir(tmp_path / "plain"), progress=False)

    loopback_run(cfg, tmp_path / "secure")

    eps = bound(cfg, [0, 1, 2])
    if METHODS[method].from_mean is Method.from_mean:  # the broadcast is the mean itself
        assert 0 < max_diff(tmp_path / "plain", tmp_path / "secure") <= eps  # quantised, within SecAgg+'s bound
    else:  # the mean is post-processed (FedSVD's SVD): the factors may turn, the model B·A may not
        assert 0 < max_product_diff(tmp_path / "plain", tmp_path / "secure", eps)
    a, b = records(tmp_path / "plain")[-1], records(tmp_path / "secure")[-1]
    assert b["participants"] == a["participants"] == [0, 1, 2] and b["missing"] == []
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=4 * 3 * Parameters().step())  # LOSS_SCALE = 4
    assert b.get("agg_error") is None  # it needs each client's factors
    for k in ("acc_global", "acc_personal_mean"):
        assert b[k] == pytest.approx(a[k], abs=0.05), k  # the same model up to ~1e-5: at most a flipped example


def test_central_dp_with_secure_aggregation_is_dp_fedavg_on_the_secure_mean(tmp_path: Path) -> None:
    cfg = secure("method.name=fedit", "method.weighting=uniform", "privacy.dp=central", "privacy.noise_multiplier=0",
                 "privacy.clip_norm=0.05")  # a clip that binds; no noise, so both runs are comparable
    simulation.run(plain(cfg), RunDir(tmp_path / "plain"), progress=False)

    loopback_run(cfg, tmp_path / "secure")

    # the shares are not re-clipped away nor miscounted: Σ clip(Δ_u) / E[m] with m = the clients in the sum
    sampled = records(tmp_path / "secure")[-1]["participants"]
    assert sampled == records(tmp_path / "plain")[-1]["participants"]
    assert max_diff(tmp_path / "plain", tmp_path / "secure") <= bound(cfg, sampled)


# ---- the wire: no upload readable -------------------------------------------------------------------------------
def test_no_message_the_serverapp_receives_holds_an_upload_in_the_clear(tmp_path: Path, monkeypatch) -> None:
    truth: dict[int, list[np.ndarray]] = {}  # what each node's mod masked (its weighted upload, before masking)
    real = flower_secagg.held_upload

    def spy(message: Message, context):  # the client side, seen from inside the node
        reply = real(message, context)
        from flwr.compat.common import recorddict_compat as compat
        from flwr.common import parameters_to_ndarrays

        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        truth[message.metadata.dst_node_id] = parameters_to_ndarrays(fitres.parameters)
        return reply

    monkeypatch.setattr(flower_secagg, "held_upload", spy)
    grid = loopback_run(secure("method.name=fedit"), tmp_path / "secure")

    received = [m for m in grid.seen if m.metadata.reply_to_message_id]
    assert len(truth) == 3 and len(received) > 12
    for m in received:  # no reply carries an array with data (the receipts and the mod's replies are emptied)
        arrays = [a for r in m.content.array_records.values() for a in r.values()] if m.has_content() else []
        assert all(a.numpy().size == 0 for a in arrays)
    wire = b"".join(obj.deflate() for m in received for obj in get_all_nested_objects(m).values())
    for vectors in truth.values():  # not one 16-byte run of any uploaded tensor occurs in what was received
        for v in vectors[:-1]:
            raw = np.ascontiguousarray(v, dtype=np.float32).tobytes()
            assert all(raw[i:i + 16] not in wire for i in range(0, min(len(raw), 1600), 16))
    masked = {m.metadata.src_node_id: m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
              for m in received if m.has_content() and RECORD_KEY_CONFIGS in m.content.config_records
              and Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]}
    assert masked.keys() == truth.keys()
    from flwr.common import bytes_to_ndarray

    for node, blobs in masked.items():
        # the masked vector: [weight, entries...] mod 2^32, uniform: its mean is 2^31 and it does not follow the upload
        vec = np.concatenate([bytes_to_ndarray(b).ravel() for b in blobs])[1:].astype(np.float64)
        upload = np.concatenate([v.ravel() for v in truth[node]])
        assert vec.size == upload.size > 1000
        # 5 standard deviations of a uniform vector of this size: the test is not flaky, and no upload passes it
        assert abs(vec.mean() / 2**32 - 0.5) < 5 / np.sqrt(12 * vec.size)
        assert abs(np.corrcoef(vec, upload)[0, 1]) < 5 / np.sqrt(vec.size)
        assert abs(np.corrcoef(upload, upload + 1e-3 * np.random.default_rng(0).standard_normal(upload.size))[0, 1]) > 0.9
    log = [json.loads(x) for x in (tmp_path / "secure" / "flower" / "messages.jsonl").read_text().splitlines()]
    up = [e for e in log if e["dir"] == "up" and e["kind"] in ("train", "secagg.collect_masked_vectors")]
    assert len(up) == 6 and all(not any(e["arrays"].values()) for e in up)  # the message log says the same
    phases = [e for e in log if e["kind"] == "secagg.round"]  # the round's two phases, timed (--secagg-cost)
    assert [(e["round"], e["nodes"], e["summed"], e["attempts"]) for e in phases] == [(1, 3, 3, 1)]


# ---- a client dropping out mid-protocol -------------------------------------------------------------------------
@pytest.mark.parametrize("stage,kept", [("setup", [0, 1]), ("share_keys", [0, 1]), ("collect_masked_vectors", [0, 1]),
                                        ("unmask", [0, 1, 2])])
def test_a_client_dropping_out_mid_protocol_is_survived(tmp_path: Path, stage: str, kept: list[int]) -> None:
    cfg = secure("method.name=fedit", "train.min_clients=2")
    without = replace(cfg, privacy=replace(cfg.privacy, secure_aggregation=False))
    loopback_run(without, tmp_path / "plain", {2: {"fail-at": "train@1"}} if kept == [0, 1] else None)

    loopback_run(cfg, tmp_path / "secure", {2: {"fail-at": f"secagg.{stage}@1"}})

    r = records(tmp_path / "secure")[-1]
    assert r["participants"] == kept and r["failed"] is None
    # dropped before its masked vector: the others' sum (at setup or share_keys Flower's workflow halts and the round's
    # SecAgg+ starts again without it, nothing having been revealed; later, its pairwise masks are removed via shares)
    if kept == [0, 1]:
        assert [m["client"] for m in r["missing"]] == [2]
        assert f"dropped out of secure aggregation at {stage}" in r["missing"][0]["reason"]
    else:  # its masked vector arrived; its own mask was rebuilt from the others' shares
        assert r["missing"] == []
    g = "global/adapter_model.safetensors"
    x, y = load_file(str(tmp_path / "plain" / g)), load_file(str(tmp_path / "secure" / g))
    assert max(float((x[k] - y[k]).abs().max()) for k in x) <= bound(cfg, kept)


@pytest.mark.parametrize("drop", [
    {1: "collect_masked_vectors", 2: "collect_masked_vectors"},  # 1 of 3 left, below the threshold of 2
    {1: "setup", 2: "share_keys"},  # 1 left: no second attempt is possible
])
def test_a_round_that_secure_aggregation_cannot_finish_fails_and_reveals_nothing(tmp_path: Path,
                                                                                drop: dict[int, str]) -> None:
    cfg = secure("method.name=fedit")
    loopback_run(cfg, tmp_path / "secure", {c: {"fail-at": f"secagg.{stage}@1"} for c, stage in drop.items()})

    r = records(tmp_path / "secure")[-1]
    assert r["participants"] == [] and "fewer than train.min_clients" in r["failed"]
    assert all("secure aggregation halted" in m["reason"] or "dropped out" in m["reason"] for m in r["missing"])
    init = {k: v for k, v in build(plain(cfg)).init_state.items()}
    saved = load_file(str(tmp_path / "secure" / "global" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], init[k]) for k in saved if k in init)  # the global model did not move


# ---- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items() if not m.sum_only))
def test_methods_that_need_individual_uploads_are_refused(method: str) -> None:
    with pytest.raises(Exception, match=rf"method.name = '{method}' needs each client's upload"):
        secure(f"method.name={method}")


# ---- real processes on 127.0.0.1 ------------------------------------------------------------------------------------
def test_a_real_flower_federation_with_secure_aggregation(tmp_path: Path) -> None:
    from fedlora.runtime.flower_launch import run_local

    cfg = secure("method.name=fedit", "data.num_clients=2")  # 2 SuperNodes: start-up dominates on 2 loaded cores
    simulation.run(plain(cfg), RunDir(tmp_path / "plain"), progress=False)

    run_local(cfg, RunDir(tmp_path / "secure"), progress=False, timeout=BOUND)

    assert max_diff(tmp_path / "plain", tmp_path / "secure") <= bound(cfg, [0, 1])
    log = [json.loads(x) for x in (tmp_path / "secure" / "flower" / "messages.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in log if e["dir"] == "up"} >= {"train", "secagg.setup", "secagg.share_keys",
                                                             "secagg.collect_masked_vectors", "secagg.unmask"}
    assert all(not any(e["arrays"].values()) for e in log if e["dir"] == "up" and e["kind"] != "evaluate")
    assert_all_stopped(tmp_path / "secure")
