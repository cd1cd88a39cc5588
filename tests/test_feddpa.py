"""FedDPA (fedlora.methods.feddpa): a global adapter shared as FedIT, a local adapter that never leaves, and the
client's model W0 + w_g·ΔW_g + w_l·ΔW_l. Conformance (bytes, Flower = embedded, resume at round 1, saved =
evaluated) is in tests/test_conformance.py; here: what is specific to the second, private adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from fedlora.adapters import PRIVATE, Mixing, private_part
from fedlora.errors import ConfigError
from fedlora.methods.feddpa import dynamic_weights
from fedlora.report import RunDir
from fedlora.runtime import simulation
from fedlora.runtime.driver import make_server
from fedlora.runtime.loop import run_rounds

DPA = ("method.name=feddpa", "data.num_clients=2", "data.max_examples=160", "train.rounds=3", "adapter.dropout=0.1")


class Spy:
    """The embedded transport, keeping every upload."""

    def __init__(self, inner: simulation.EmbeddedTransport) -> None:
        self.inner, self.uploads = inner, []

    def fit(self, client, broadcasts, round_):
        upload = self.inner.fit(client, broadcasts, round_)
        self.uploads.append((round_, upload))
        return upload

    def __getattr__(self, name):
        return getattr(self.inner, name)


def spied_run(*overrides: str):
    from fedlora.experiment import build

    exp = build(tiny_config(*DPA, *overrides))
    spy = Spy(simulation.EmbeddedTransport(exp))
    records: list[dict] = []
    run_rounds(make_server(exp), spy, exp.config, exp.split.global_test, on_record=records.append)
    return exp, spy, records


def test_uploads_hold_exactly_the_global_adapter_and_equal_fedit_s() -> None:
    """The global adapter trains alone, after the local one: its uploads are FedIT's bit for bit, and the local
    adapter (trained from round 2 on) stays on the client."""
    exp, spy, records = spied_run()
    _, fedit, fedit_records = spied_run("method.name=fedit")
    shared = set(exp.method.shared_keys())
    assert shared == set(exp.info.keys) and not any(k.startswith(PRIVATE) for k in shared)
    for (r, up), (r2, ref) in zip(spy.uploads, fedit.uploads, strict=True):
        assert r == r2 and set(up.payload) == shared
        assert all(torch.equal(up.payload[k], ref.payload[k]) for k in shared)
    assert [r["bytes_up"] for r in records] == [r["bytes_up"] for r in fedit_records]
    assert [r["bytes_down"] for r in records] == [r["bytes_down"] for r in fedit_records]
    assert [r["acc_global"] for r in records] == [r["acc_global"] for r in fedit_records]
    assert records[-1]["agg_error"] == fedit_records[-1]["agg_error"]
    # every client holds a trained local adapter (B moved away from its zero init), which no message carried
    for node in spy.inner.nodes:
        local = private_part(node.state)
        assert set(local) == set(exp.trainer.private_slots) and len(local) == len(exp.info.with_role("A", "B"))
        assert any(float(v.abs().sum()) > 0 for k, v in local.items() if k.endswith("lora_B.weight"))


def test_local_adapter_trains_from_round_2_against_the_frozen_global_one() -> None:
    from fedlora.experiment import build

    exp = build(tiny_config(*DPA))
    node = exp.client_node(exp.clients[0])
    before = dict(node.state)
    node.fit(1)  # round 1: the global adapter only
    assert all(torch.equal(node.state[k], before[k]) for k in private_part(before))
    trained_global = {k: v for k, v in node.state.items() if not k.startswith(PRIVATE)}
    node.fit(2)
    assert any(not torch.equal(node.state[k], before[k]) for k in private_part(before))
    # the head is the global adapter's; PEFT's copy of it for the local adapter is not part of any state
    assert not any(k.startswith(PRIVATE) and ("classifier" in k or "score" in k) for k in node.state)
    assert set(trained_global) == set(exp.info.keys)


def test_personalized_forward_is_w0_plus_the_weighted_adapters_by_hand() -> None:
    """On one adapted layer: y = W0·x + b + w_g·s·B_g·A_g·x + w_l·s·B_l·A_l·x, for fixed weights and for one weight
    per example; outside the mixing, the layer is W0 + s·B_g·A_g again."""
    from fedlora.experiment import build

    exp = build(tiny_config(*DPA, "adapter.dropout=0.0"))
    gen = torch.Generator().manual_seed(0)
    for slots in (exp.trainer.slots, exp.trainer.private_slots):
        with torch.no_grad():
            for p in slots.values():
                p.copy_(torch.randn(p.shape, generator=gen))
    key = next(k for k in exp.info.keys if k.endswith("lora_A.weight"))
    layer = key.removesuffix(".lora_A.weight")
    module = exp.model.get_submodule(layer)
    W0, b = module.base_layer.weight, module.base_layer.bias
    Ag, Bg = exp.trainer.slots[key], exp.trainer.slots[layer + ".lora_B.weight"]
    Al, Bl = exp.trainer.private_slots[PRIVATE + key], exp.trainer.private_slots[PRIVATE + layer + ".lora_B.weight"]
    s = exp.config.adapter.alpha / exp.config.adapter.rank
    x = torch.randn(2, 3, W0.shape[1], generator=gen, dtype=torch.float64)
    W0, b, Ag, Bg, Al, Bl = (t.detach().double() for t in (W0, b, Ag, Bg, Al, Bl))

    def by_hand(wg: torch.Tensor, wl: torch.Tensor) -> torch.Tensor:
        return x @ W0.T + b + wg * s * (x @ Ag.T @ Bg.T) + wl * s * (x @ Al.T @ Bl.T)

    with torch.no_grad():
        with Mixing(exp.model, 0.3, 0.7):
            y = module(x.float()).double()
        torch.testing.assert_close(y, by_hand(torch.tensor(0.3), torch.tensor(0.7)), rtol=1e-5, atol=1e-4)
        wg, wl = torch.tensor([0.1, 0.45]), torch.tensor([0.9, 0.55])
        with Mixing(exp.model, wg, wl):
            y = module(x.float()).double()
        torch.testing.assert_close(y, by_hand(wg.double().view(2, 1, 1), wl.double().view(2, 1, 1)), rtol=1e-5, atol=1e-4)
        y = module(x.float()).double()  # mixing over: the shared adapter alone, at its own scaling
        torch.testing.assert_close(y, by_hand(torch.tensor(1.0), torch.tensor(0.0)), rtol=1e-5, atol=1e-4)
    assert module.active_adapters == ["default"] and module.scaling["default"] == s


def test_dynamic_weights_by_hand() -> None:
    """w_g = w_max · mean_k cos(e(x), e(x_k)), w_l = 1 − w_g (the public code's get_weight)."""
    batch = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    reference = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    wg, wl = dynamic_weights(batch, reference, 0.5)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([0.5 * (1 + r) / 2, 0.5 * (0 + r) / 2, 0.5 * (r + 1) / 2])
    torch.testing.assert_close(wg, expected)
    torch.testing.assert_close(wl, 1 - expected)
    wg, _ = dynamic_weights(batch.double(), reference.double(), 1.0)
    assert wg.dtype == torch.float32
    torch.testing.assert_close(wg, 2 * expected)


def test_dynamic_evaluation_uses_each_example_s_own_weights() -> None:
    """A client's evaluation with dynamic weights gives, for every batch, the model mixed with the weights computed
    by hand from the embeddings (under W0 + ΔW_l) of that batch and of the client's K reference examples."""
    import numpy as np

    from fedlora.client import embed

    exp, spy, records = spied_run("method.dpa_weighting=dynamic", "method.dpa_instances=3", "train.rounds=2")
    node = spy.inner.nodes[0]
    private = exp.private
    assert private is not None and private.reference_examples == 3
    exp.trainer.load(node.state)
    rng = np.random.default_rng([exp.config.train.seed, 0, 0xD9A])
    ref_idx = np.sort(rng.choice(node.data.train, size=3, replace=False))
    test = node.data.test[:5]
    batch = exp.task.batch(test, exp.device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.inference_mode():
        with Mixing(exp.model, 0.0, 1.0):
            wg, wl = dynamic_weights(embed(exp.model, inputs), embed(exp.model, exp.task.batch(ref_idx, exp.device)),
                                     0.5)
        with Mixing(exp.model, wg, wl):
            by_hand = exp.model(**inputs).logits
        logits: list[torch.Tensor] = []
        hook = exp.model.register_forward_hook(lambda m, a, out: logits.append(out.logits))
        try:
            with torch.no_grad():
                exp.trainer.evaluate(node.state, test, node.adapter, private, node.data)
        finally:
            hook.remove()
    assert 0 < float(wg.min()) and float(wg.max()) <= 0.5
    got = torch.cat(logits)
    order = np.argsort(exp.task._lengths[test], kind="stable")  # evaluation sorts a batch by length
    torch.testing.assert_close(got, by_hand[torch.as_tensor(order)], rtol=1e-5, atol=1e-5)


def test_killed_after_local_training_resumes_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after round 3's record (the checkpoint of round 2 holds trained local adapters), resumed: the
    uninterrupted run, metrics row for row and every saved adapter (global and local) bit for bit."""
    from conftest import assert_same_run, interrupted_and_resumed

    cfg = tiny_config(*DPA, "train.rounds=4")
    full = tmp_path / "full"
    simulation.run(cfg, RunDir(full), progress=False)
    assert (full / "clients" / "0" / "private" / "adapter_model.safetensors").is_file()

    cut = interrupted_and_resumed(cfg, tmp_path / "cut", monkeypatch, "metrics:3")
    assert_same_run(full, cut)
    local = [p for p in cut.glob("clients/*/private/adapter_model.safetensors")]
    assert len(local) == 2


@pytest.mark.parametrize("overrides,message", [
    (("adapter.kind=vera",), "needs low-rank factors"),
    (("adapter.kind=dora",), "needs an update that is exactly s·B·A"),
    (("method.dpa_weighting=dynamic", "model.name=smollm2", "data.dataset=math-word"), "classification only"),
    (("method.dpa_alpha=1.0",), "dpa_alpha"),
    (("method.dpa_weighting=softmax",), "dpa_weighting"),
])
def test_refused_at_config_time_with_the_reason(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config("method.name=feddpa", *overrides)


def test_export_serves_both_adapters_with_plain_peft(tmp_path: Path) -> None:
    """``fedlora export --client k`` writes one PEFT adapter (rank 2r: [w_g·B_g, w_l·B_l], [A_g; A_l]) that plain
    PEFT loads as the client's personalized model: the same logits as the run's own evaluation of that client."""
    from fedlora.experiment import build
    from fedlora.export import export, load_exported, load_into

    cfg = tiny_config(*DPA, "train.rounds=2", "adapter.dropout=0.0")
    run = tmp_path / "run"
    simulation.run(cfg, RunDir(run), progress=False)
    info = export(run, 1, tmp_path / "out")
    assert info["model"] == "client 1" and not (tmp_path / "out" / ".combined").exists()
    served = load_exported(tmp_path / "out", cfg.resolved())
    exp = build(cfg)
    state = load_into(exp, run / "clients" / "1")
    assert set(private_part(state)) == set(exp.trainer.private_slots)
    batch = {k: v for k, v in exp.task.batch(exp.clients[1].test[:6], exp.device).items() if k != "labels"}
    exp.trainer.load(state)
    with torch.inference_mode():
        with Mixing(exp.model, *exp.private.weights(None, None)):
            ours = exp.model(**batch).logits
        theirs = served(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    merged = tmp_path / "merged"
    export(run, 1, merged, merged=True)  # the same model with the adapters merged into the weights
    torch.testing.assert_close(load_exported(merged, cfg.resolved())(**batch).logits, ours, rtol=1e-4, atol=1e-4)
    assert json.loads((run / "clients" / "1" / "private" / "fedlora_mix.json").read_text())["weights"] == [0.5, 0.5]


def test_flower_gives_the_embedded_results_for_finetune_and_dynamic(tmp_path: Path) -> None:
    """FedDPA-F with instance-wise weights through the Flower ServerApp and ClientApp (driven in this process):
    the local adapters live in each node's state across rounds and give the embedded run's metrics and adapters."""
    from flwr.supercore.task_identity import TaskIdentity

    from conftest import assert_same_run
    from test_flower import loopback_run

    cfg = tiny_config(*DPA, "method.dpa_schedule=finetune", "method.dpa_weighting=dynamic")
    simulation.run(cfg, RunDir(tmp_path / "embedded"), progress=False)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    loopback_run(cfg, tmp_path / "flower")
    assert_same_run(tmp_path / "embedded", tmp_path / "flower")
    assert (tmp_path / "flower" / "clients" / "1" / "private" / "adapter_model.safetensors").is_file()
    from fedlora.errors import FedloraError
    from fedlora.export import export

    with pytest.raises(FedloraError, match="weighs its two adapters per example"):  # no single adapter equals it
        export(tmp_path / "embedded", 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("privacy", [("privacy.dp=local", "privacy.clip_norm=0.5", "privacy.noise_multiplier=0.5"),
                                     ("privacy.dp_sgd=true", "privacy.clip_norm=0.5")])
def test_privacy_wraps_the_global_adapter_and_the_local_one_stays(privacy: tuple[str, ...]) -> None:
    """Client-level DP noises what is uploaded (the global adapter); DP-SGD trains the global adapter; the local
    adapter, which never leaves, trains without either and still exists on every client."""
    exp, spy, records = spied_run(*privacy, "train.rounds=2")
    assert records[-1]["failed"] is None and records[-1]["participants"] == [0, 1]
    assert records[-1].get("epsilon") or records[-1].get("epsilon_sgd")  # the accountant saw the rounds
    assert all(set(u.payload) == set(exp.method.shared_keys()) for _, u in spy.uploads)
    assert all(private_part(node.state) for node in spy.inner.nodes)


@pytest.mark.parametrize("schedule,weights,from_shared", [("iterative", (0.7, 0.3), False), ("finetune", (0.0, 1.0), True)])
def test_schedules_start_the_local_adapter_as_the_paper_says(monkeypatch: pytest.MonkeyPatch, schedule: str,
                                                            weights: tuple[float, float], from_shared: bool) -> None:
    """FedDPA-T trains the local adapter from where it was, mixed with the frozen global one (weights 1 − α, α);
    FedDPA-F first makes it a copy of the global adapter and fine-tunes it alone. With a zero learning rate the
    step leaves exactly its starting point."""
    from fedlora.experiment import build

    exp = build(tiny_config(*DPA, f"method.dpa_schedule={schedule}", "method.dpa_alpha=0.3"))
    step = exp.private.step(2)
    assert exp.private.step(1) is None and step.weights == pytest.approx(weights) and step.from_shared is from_shared
    node = exp.client_node(exp.clients[0])
    node.fit(1)
    monkeypatch.setattr(exp.trainer, "_optimizer", lambda params: torch.optim.SGD(params, lr=0.0))
    after, _ = exp.trainer.train_private(node.state, node.data, 2, step)
    for key in exp.info.with_role("A", "B"):
        start = node.state[key] if from_shared else node.state[PRIVATE + key]
        assert torch.equal(after[PRIVATE + key], start), key
        assert torch.equal(after[key], node.state[key])  # the global adapter is frozen
