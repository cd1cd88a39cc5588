"""fedlora.privacy: the [privacy] config rules, clipping and noise (exact and statistical), DP-FedAvg's noised mean,
the accountant's ε in metrics.jsonl and summary.json, DP-SGD through Opacus, and "noise 0 + a clip that never
binds = the non-private run" (same metrics, same adapters)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from fedlora import config as cfgmod
from fedlora.errors import ConfigError
from fedlora.methods import Upload
from fedlora.privacy import accounting
from fedlora.privacy.mechanism import generator, privatize_update, update_norm
from fedlora.report import RunDir
from fedlora.runtime import simulation

pytest.importorskip("opacus")


# ---- configuration --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["privacy.dp=global"], r"privacy.dp = 'global' is not allowed; choose one of: off, local, central"),
    (["privacy.clip_norm=0"], r"privacy.clip_norm = 0.0 is out of range; it must be > 0"),
    (["privacy.delta=1.5"], r"privacy.delta = 1.5 is out of range"),
    (["privacy.target_epsilon=4"], r"privacy.target_epsilon = 4 needs privacy.dp = 'local' or 'central'"),
    (["privacy.dp=central", "method.name=fedit"], r"needs method.weighting = 'uniform', not 'samples'"),
    (["privacy.dp=central", "method.name=flora-na", "method.weighting=uniform"],
     r"method.name = 'flora-na' needs each client's upload, not only their sum"),
    (["privacy.secure_aggregation=true", "method.name=fedex"], r"method.name = 'fedex' needs each client's upload"),
    (["privacy.secure_aggregation=true", "method.name=fedit"], r"needs runtime.kind = 'flower'"),
    (["privacy.secure_aggregation=true", "method.name=fedit", "runtime.kind=flower", "train.max_update_norm_ratio=3"],
     r"train.max_update_norm_ratio = 3 screens updates by their norms; set it to 0"),
    (["privacy.secure_aggregation=true", "method.name=fedit", "runtime.kind=flower", "faults.crash=0.1"],
     r"faults are injected into individual uploads on the server side"),
    (["privacy.dp_sgd=true", "adapter.kind=vera"], r"privacy.dp_sgd = true needs .*adapter.kind = 'vera' does not "
                                                    r"provide"),
    (["privacy.dp_sgd=true", "train.dtype=bfloat16"], r"train.dtype = 'bfloat16' does not fit this run: privacy.dp_sgd = true needs float32"),
])
def test_bad_privacy_settings_are_refused_with_the_reason(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_every_privacy_key_is_documented() -> None:
    keys = {key: help_ for key, _, help_ in cfgmod.describe() if key.startswith("privacy.")}
    assert set(keys) == {f"privacy.{k}" for k in ("dp", "clip_norm", "noise_multiplier", "delta", "target_epsilon",
                                                  "noise_seed", "dp_sgd", "dp_sgd_noise_multiplier",
                                                  "dp_sgd_clip_norm", "secure_aggregation")}
    assert all(keys.values())


@pytest.mark.parametrize("mode,target", [("central", 4.0), ("local", 16.0)])
def test_target_epsilon_calibrates_the_noise_into_the_resolved_config(mode: str, target: float) -> None:
    cfg = tiny_config(f"privacy.dp={mode}", f"privacy.target_epsilon={target}", "method.weighting=uniform",
                      "data.num_clients=10", "train.clients_per_round=3", "train.rounds=20")
    z = cfg.resolved().privacy.noise_multiplier
    assert z != cfg.privacy.noise_multiplier
    assert f"noise_multiplier = {z}" in cfgmod.dumps(cfg.resolved())
    eps = (accounting.central_epsilon(z, 0.3, 20, 1e-5) if mode == "central"
           else accounting.local_epsilon(z, 20, 1e-5))
    assert target - 0.05 <= eps <= target  # the smallest noise that meets the target, to Opacus's tolerance
    # more noise is needed for a smaller epsilon
    smaller = tiny_config(f"privacy.dp={mode}", f"privacy.target_epsilon={target / 2}", "method.weighting=uniform",
                          "data.num_clients=10", "train.clients_per_round=3", "train.rounds=20")
    assert smaller.resolved().privacy.noise_multiplier > z


# ---- the mechanism ----------------------------------------------------------------------------------------------

def test_clipping_binds_and_scales_the_update_to_the_clip() -> None:
    start = {"a": torch.zeros(3, 4), "b": torch.ones(2)}
    payload = {"a": torch.full((3, 4), 2.0), "b": torch.ones(2) + torch.tensor([3.0, 4.0])}
    norm_before = math.sqrt(12 * 4 + 9 + 16)
    out, norm = privatize_update(payload, start, clip_norm=1.5, noise_std=0.0, gen=None)
    assert norm == pytest.approx(norm_before)
    delta = {k: out[k] - start[k] for k in out}
    assert update_norm(delta) == pytest.approx(1.5, rel=1e-6)
    # the direction is kept: every entry scaled by the same factor
    assert torch.allclose(delta["b"], torch.tensor([3.0, 4.0]) * 1.5 / norm_before)
    # a clip that does not bind leaves the payload bit for bit
    same, _ = privatize_update(payload, start, clip_norm=100.0, noise_std=0.0, gen=None)
    assert all(torch.equal(same[k], payload[k]) for k in payload)


def test_local_noise_has_the_configured_scale() -> None:
    n = 200_000
    start = {"a": torch.zeros(n, dtype=torch.float64)}
    out, _ = privatize_update({"a": start["a"].clone()}, start, clip_norm=0.5, noise_std=1.3 * 0.5,
                              gen=generator(7, 1, 2))
    noise = out["a"]
    # the sample std of 200k draws is within 0.5% of sigma with overwhelming probability (se = sigma/sqrt(2n))
    assert float(noise.std()) == pytest.approx(0.65, rel=0.005)
    assert abs(float(noise.mean())) < 5 * 0.65 / math.sqrt(n)
    again, _ = privatize_update({"a": start["a"].clone()}, start, 0.5, 0.65, generator(7, 1, 2))
    other, _ = privatize_update({"a": start["a"].clone()}, start, 0.5, 0.65, generator(7, 1, 3))
    assert torch.equal(again["a"], noise) and not torch.equal(other["a"], noise)


def _private_method(*overrides: str):
    from fedlora.experiment import build

    exp = build(tiny_config(*overrides))
    return exp


def test_central_dp_is_dp_fedavg_clipped_mean_plus_noise_on_the_sum() -> None:
    exp = _private_method("method.name=fedit", "method.weighting=uniform", "privacy.dp=central",
                          "privacy.clip_norm=0.5", "privacy.noise_multiplier=0", "train.clients_per_round=2")
    method, ref = exp.method, {k: v for k, v in exp.init_state.items()}
    keys = method.shared_keys()
    gen = torch.Generator().manual_seed(0)
    deltas = [{k: torch.randn(ref[k].shape, generator=gen) * s for k in keys} for s in (0.001, 1.0, 0.5)]
    uploads = [Upload(c, {k: ref[k] + d[k] for k in keys}, 10 + c) for c, d in enumerate(deltas)]
    out = method.aggregate(uploads, ref).payload
    # expected by hand: Σ_u clip(Δ_u) / E[m] with E[m] = clients_per_round = 2 (the fixed denominator)
    clipped = []
    for d in deltas:
        n = update_norm(d)
        clipped.append({k: d[k].double() * min(1.0, 0.5 / n) for k in keys})
    for k in keys:
        expected = ref[k].double() + sum(c[k] for c in clipped) / 2
        assert torch.allclose(out[k].double(), expected, atol=1e-6), k
    # with noise: the difference to the noiseless mean has std z·C / E[m]
    noisy = _private_method("method.name=fedit", "method.weighting=uniform", "privacy.dp=central",
                            "privacy.clip_norm=0.5", "privacy.noise_multiplier=2.0", "train.clients_per_round=2",
                            "privacy.noise_seed=3", "adapter.rank=64")
    ref = noisy.init_state
    keys = noisy.method.shared_keys()
    plain = [Upload(c, {k: ref[k].clone() for k in keys}, 1) for c in range(2)]
    diff = torch.cat([(noisy.method.aggregate(plain, ref).payload[k].double() - ref[k].double()).flatten()
                      for k in keys])
    assert diff.numel() > 15_000  # the std estimate is then within 3 % with probability > 1 - 1e-7
    assert float(diff.std()) == pytest.approx(2.0 * 0.5 / 2, rel=0.03)


def test_central_dp_samples_clients_by_poisson() -> None:
    exp = _private_method("method.name=fedit", "method.weighting=uniform", "privacy.dp=central",
                          "data.num_clients=10", "train.clients_per_round=3", "data.max_examples=400")
    server = simulation.make_server(exp)
    sizes = [len(server.sample(r)) for r in range(1, 401)]
    assert len(set(sizes)) > 3  # Poisson: the number of clients varies
    assert sum(sizes) / len(sizes) == pytest.approx(3.0, rel=0.1)


# ---- whole runs ---------------------------------------------------------------------------------------------------

def _run(tmp_path, name: str, *overrides: str) -> tuple[list[dict], dict, dict]:
    out = tmp_path / name
    simulation.run(tiny_config(*overrides), RunDir(out), progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    adapters = {c: load_file(out / "clients" / str(c) / "adapter_model.safetensors") for c in range(3)}
    return records, summary, adapters


VOLATILE = {"seconds", "epsilon", "delta", "epsilon_sgd", "epsilon_sgd_clients"}


@pytest.mark.parametrize("mode,method,extra", [("local", "fedsa", ()),
                                               ("central", "fedit", ("method.weighting=uniform",))])
def test_noise_zero_and_a_loose_clip_equal_the_non_private_run(tmp_path, mode: str, method: str, extra) -> None:
    base = (f"method.name={method}", *extra)
    plain, _, plain_adapters = _run(tmp_path, "plain", *base)
    private, summary, private_adapters = _run(tmp_path, "private", *base, f"privacy.dp={mode}",
                                              "privacy.noise_multiplier=0", "privacy.clip_norm=1e6")
    assert [{k: v for k, v in r.items() if k not in VOLATILE} for r in private] == \
        [{k: v for k, v in r.items() if k not in VOLATILE} for r in plain]
    for c in range(3):
        assert all(torch.equal(private_adapters[c][k], plain_adapters[c][k]) for k in plain_adapters[c])
    assert all(r["epsilon"] is None for r in private[1:])  # noise 0: no finite guarantee, recorded as null
    assert summary["epsilon"] is None and summary["delta"] == 1e-5


def test_epsilon_is_recorded_every_round_from_the_accountant(tmp_path) -> None:
    records, summary, _ = _run(tmp_path, "local", "privacy.dp=local", "privacy.noise_multiplier=3.0",
                               "privacy.clip_norm=0.05", "privacy.noise_seed=1", "train.rounds=3",
                               "train.clients_per_round=2", "train.min_clients=1")
    counts = [0, 0, 0]
    eps = []
    for r in records:
        assert r["delta"] == 1e-5
        if r["round"] > 0:  # the accountant sees each sampled client once per round
            for c in r["participants"] + [m["client"] for m in r["missing"] if not m["reason"].startswith("eval")]:
                counts[c] += 1
        eps.append(r["epsilon"])
        assert r["epsilon"] == pytest.approx(accounting.local_epsilon(3.0, max(counts), 1e-5))
    assert eps[0] == 0.0 and eps == sorted(eps) and eps[-1] > 0
    assert summary["epsilon"] == eps[-1]


def test_local_dp_uploads_are_noised_and_the_client_keeps_its_own_training(tmp_path) -> None:
    exp = _private_method("method.name=fedsa", "privacy.dp=local", "privacy.noise_multiplier=1.0",
                          "privacy.clip_norm=0.01", "privacy.noise_seed=5")
    node = exp.client_node(exp.clients[0])
    start = exp.method.upload(node.state, 1)
    upload, result = node.fit(1)
    assert set(upload.payload) == set(exp.method.shared_keys())  # A side only: FedSA's B never leaves
    sent = {k: upload.payload[k] - start[k] for k in start}
    trained = {k: result.state[k] - start[k] for k in start}
    d = sum(v.numel() for v in sent.values())
    # what is sent is dominated by noise of std z·C per entry: norm ≈ z·C·sqrt(d), far from the clipped update
    assert update_norm(sent) == pytest.approx(0.01 * math.sqrt(d), rel=0.1)
    assert update_norm(trained) > 0.01  # the clip binds
    assert all(torch.equal(node.state[k], result.state[k]) for k in node.state)  # un-noised local state


def test_dp_sgd_trains_through_opacus_and_reports_each_clients_epsilon(tmp_path) -> None:
    exp = _private_method("method.name=fedit", "privacy.dp_sgd=true", "privacy.dp_sgd_noise_multiplier=1.0",
                          "privacy.noise_seed=2")
    node = exp.client_node(exp.clients[0])
    before = {k: v.clone() for k, v in node.state.items()}
    node.fit(1)
    # Opacus with PEFT can silently leave the adapter unchanged (stale hooks): every trained tensor must move
    assert all(not torch.equal(node.state[k], before[k]) for k in before)
    assert not any(m._forward_hooks or m._backward_hooks for m in exp.model.modules())  # hooks removed
    assert not any(hasattr(p, "grad_sample") for p in exp.model.parameters())

    records, summary, _ = _run(tmp_path, "sgd", "privacy.dp_sgd=true", "privacy.noise_seed=2")
    sizes = [len(c.train) for c in exp.clients]
    for r in records[1:]:
        per_client = r["epsilon_sgd_clients"]
        for c, n in enumerate(sizes):  # every client trains every round here (3 of 3)
            expected = accounting.sgd_epsilon(1.0, 8 / n, 2 * r["round"], 1e-5)
            assert per_client[str(c)] == pytest.approx(expected)
        assert r["epsilon_sgd"] == max(per_client.values())
    assert summary["epsilon_sgd_clients"] == records[-1]["epsilon_sgd_clients"]
    assert "epsilon" not in records[-1]  # no client-level DP asked for


# ---- deployment security on 127.0.0.1: TLS and SuperNode authentication ------------------------------------------

FLOWER_BOUND = 600  # seconds per federation: start-up dominates on a loaded 2-core machine


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tls_federation_with_node_authentication_equals_the_embedded_run(tmp_path) -> None:
    pytest.importorskip("flwr")
    from fedlora.privacy.certs import generate
    from fedlora.runtime.flower_launch import run_local

    creds = generate(tmp_path / "creds", nodes=2)
    cfg = tiny_config("data.num_clients=2", "train.rounds=1", "method.name=fedit")
    simulation.run(cfg, RunDir(tmp_path / "embedded"), progress=False)
    run_local(cfg, RunDir(tmp_path / "tls"), progress=False, timeout=FLOWER_BOUND, credentials=creds)

    emb, tls = tmp_path / "embedded", tmp_path / "tls"
    a = [json.loads(x) for x in (emb / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tls / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(a, b, strict=True):
        for k in ("acc_global", "loss_global", "acc_personal_mean", "train_loss", "bytes_up", "bytes_down"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), k
    for c in ("0", "1"):
        x = load_file(emb / "clients" / c / "adapter_model.safetensors")
        y = load_file(tls / "clients" / c / "adapter_model.safetensors")
        assert max(float((x[k] - y[k]).abs().max()) for k in x) <= 1e-6
    logs = tls / "flower" / "logs"
    assert "https://127.0.0.1" in (logs / "superlink.log").read_text()  # the SuperLink served TLS only
    for c in (0, 1):  # each node was let in with its own registered key, over TLS
        assert "SuperNode ID" in (logs / f"supernode-{c}.log").read_text()


def test_unregistered_node_and_node_without_the_ca_are_refused(tmp_path) -> None:
    pytest.importorskip("flwr")
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from fedlora.privacy.certs import generate
    from fedlora.runtime import flower_security as security

    creds = generate(tmp_path / "creds", nodes=2)  # node 0 is registered below, node 1 never
    bindir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "home").mkdir()
    port = _free_port()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "t"\n\n[superlink.t]\naddress = "127.0.0.1:{port}"\n' + security.connection_lines(creds))
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen(argv, env=env, stdout=open(tmp_path / log, "wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        start([str(bindir / "flower-superlink"), *security.link_args(creds), "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(port)], "link.log")
        deadline = time.monotonic() + 120
        reply = ""
        while time.monotonic() < deadline:  # register node 0 once the SuperLink answers
            argv = security.registrations(creds, 1, "t")[0]
            reply = subprocess.run([str(bindir / "flwr"), *argv], env=env, capture_output=True, text=True,
                                   timeout=60).stdout
            if "registered successfully" in reply:
                break
            time.sleep(2)
        assert "registered successfully" in reply, reply

        def node(args: list[str], log: str) -> subprocess.Popen:
            return start([str(bindir / "flower-supernode"), *args, "--superlink", f"127.0.0.1:{port}", "--host",
                          "127.0.0.1", "--port", str(_free_port()), "--isolation", "process"], log)

        unregistered = node(security.node_args(creds, 1), "unregistered.log")
        no_ca = node(["--auth-supernode-private-key", str(creds.node_keys[0])], "no_ca.log")
        registered = node(security.node_args(creds, 0), "registered.log")
        for p in (unregistered, no_ca):
            assert p.wait(timeout=120) != 0  # each gives up with an error exit
        assert "Failed to activate SuperNode" in (tmp_path / "unregistered.log").read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "no_ca.log").read_text()
        deadline = time.monotonic() + 60
        while "SuperNode ID" not in (tmp_path / "registered.log").read_text() and time.monotonic() < deadline:
            time.sleep(1)
        assert registered.poll() is None and "SuperNode ID" in (tmp_path / "registered.log").read_text()
    finally:
        for p in procs:  # every process we started, by its own process group
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


# ---- secure aggregation: Flower's SecAgg+ on fedlora uploads (in process; not yet a runtime option) ----------------

def _secagg_round(fail_at: dict[int, str] | None = None):
    import numpy as np

    from fedlora.privacy.secagg import InProcessGrid, client_app, secure_mean

    exp = _private_method("method.name=fedit", "data.num_clients=4")
    ups = {100 + c.client_id: exp.client_node(c).fit(1)[0] for c in exp.clients}
    keys = list(exp.method.shared_keys())
    weight = max(u.num_examples for u in ups.values())

    def train(node: int):
        u = ups[node]
        return {k: u.payload[k].numpy() for k in keys}, u.num_examples

    grid = InProcessGrid(client_app(train, keys), list(ups), fail_at=fail_at)
    mean = secure_mean(grid, keys, {k: tuple(exp.init_state[k].shape) for k in keys}, num_shares=3, threshold=2,
                       max_weight=float(weight))
    return exp, ups, keys, grid, {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in mean.items()}


def test_secaggplus_gives_the_mean_of_the_uploads_and_no_upload_travels_in_the_clear() -> None:
    import numpy as np

    exp, ups, keys, grid, mean = _secagg_round()
    # the method's broadcast from the secure mean equals the one from the individual uploads, up to quantisation
    plain = exp.method.aggregate(list(ups.values()), exp.init_state).payload
    secure = exp.method.aggregate([Upload(0, mean, 1)], exp.init_state).payload
    err = max(float((plain[k] - secure[k]).abs().max()) for k in keys)
    assert err < 1e-4  # 4 clients x quantisation step 16 / 2^22 ≈ 4e-6, over weights quantised to 2^22 levels
    assert err > 0  # it is quantised, not the plain mean under another name
    # on the wire: the replies carrying the uploads hold no array at all, only masked integers mod 2^32
    replies = [m for d, _, m in grid.log if d == "up" and not m.has_error()]
    assert all(len(rec) == 0 for m in replies for rec in m.content.array_records.values())
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    masked = [m for m in replies if Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 4
    for m in masked:
        vec = np.concatenate([np.asarray(_bytes_to_ndarray(b), dtype=np.float64).ravel()
                              for b in m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        assert vec.size > 1000
        assert 0.45 < vec.mean() / 2**32 < 0.55  # uniform over the modulus: the mask hides the upload


def _bytes_to_ndarray(b: bytes):
    from flwr.common import bytes_to_ndarray

    return bytes_to_ndarray(b)


def test_secaggplus_survives_a_client_dropping_out_mid_protocol() -> None:
    exp, ups, keys, grid, mean = _secagg_round(fail_at={102: "collect_masked_vectors"})
    kept = [u for node, u in ups.items() if node != 102]
    plain = exp.method.aggregate(kept, exp.init_state).payload
    secure = exp.method.aggregate([Upload(0, mean, 1)], exp.init_state).payload
    assert max(float((plain[k] - secure[k]).abs().max()) for k in keys) < 1e-4  # its pairwise masks were removed
    assert any(d == "up" and n == 102 and m.has_error() for d, n, m in grid.log)
