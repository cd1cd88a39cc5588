"""FLoRA-NA, FedEx-LoRA and FLoRA as methods: what the models hold after a round, against the ideal update."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2Model
from transformers.pytorch_utils import Conv1D

from conftest import tiny_config
from fedlora import adapters
from fedlora import functional as F
from fedlora.adapters import LayerMeta, layer_pairs
from fedlora.config import AdapterConfig
from fedlora.errors import ConfigError
from fedlora.experiment import build
from fedlora.methods.base import base_delta
from fedlora.runtime.loop import run_round
from fedlora.runtime.simulation import make_server
from peft import TaskType
from test_methods import Recorder


def one_round(method: str, *extra: str):  # type: ignore[no-untyped-def]
    exp = build(tiny_config(f"method.name={method}", *extra))
    w0 = {n: p.detach().clone() for n, p in exp.model.named_parameters()}
    server = make_server(exp)
    transport = Recorder(exp)
    record = run_round(server, transport, exp.config, 1, exp.split.global_test, evaluate=True)
    return exp, w0, server, transport, record


def ideal(exp, uploads, a_key, b_key):  # type: ignore[no-untyped-def]
    w = [float(u.num_examples) for u in uploads]
    return F.ideal_update([u.payload[b_key] for u in uploads], [u.payload[a_key] for u in uploads], w)


@pytest.mark.parametrize("adapter", ["lora", "rslora"])
@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_exact_methods_deliver_the_ideal_update(method: str, adapter: str) -> None:
    exp, w0, server, transport, record = one_round(method, f"adapter.kind={adapter}")
    params = dict(exp.model.named_parameters())
    for layer, (a_key, b_key) in layer_pairs(exp.info.with_role("A", "B")).items():
        meta = exp.info.layers[layer]
        s = meta.scaling
        assert s == pytest.approx(16 / 4 if adapter == "lora" else 16 / 2)  # alpha/r or alpha/sqrt(r), r = 4
        want = w0[meta.base_param].double() + s * ideal(exp, transport.uploads, a_key, b_key).double()
        g = server.global_state
        got = params[meta.base_param].double() + s * (g[b_key].double() @ g[a_key].double())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert record["agg_error"] < 1e-5


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_global_model_output_equals_a_model_built_with_the_ideal_update(method: str) -> None:
    exp, w0, server, transport, _ = one_round(method)
    batch = exp.task.batch(exp.split.global_test[:8], exp.device)
    adapters.write_state(exp.slots, server.global_state)
    with torch.no_grad():
        got = exp.model(**batch).logits
    ref = build(tiny_config(f"method.name={method}"))  # same seeds: same W0, same initial adapter
    params = dict(ref.model.named_parameters())
    state = dict(server.global_state)
    with torch.no_grad():
        for layer, (a_key, b_key) in layer_pairs(ref.info.with_role("A", "B")).items():
            meta = ref.info.layers[layer]
            params[meta.base_param].add_(meta.scaling * ideal(ref, transport.uploads, a_key, b_key))
            state[b_key] = torch.zeros_like(state[b_key])  # the whole update lives in W
    adapters.write_state(ref.slots, state)
    with torch.no_grad():
        want = ref.model(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_flora_next_round_starts_from_the_merged_model() -> None:
    exp, _, server, transport, _ = one_round("flora")
    node = transport.nodes[0]
    for k in exp.info.with_role("B"):
        assert torch.count_nonzero(node.state[k]) == 0  # fresh adapter: B = 0, so the adapter adds nothing
    for k in exp.info.with_role("A"):
        assert not torch.equal(node.state[k], exp.init_state[k])  # a new draw, not the old A
        torch.testing.assert_close(node.state[k], server.global_state[k], rtol=0, atol=0)


def test_flora_na_error_is_below_fedit_and_na_sends_fedit_bytes() -> None:
    _, _, _, _, fedit = one_round("fedit", "train.local_steps=4")
    _, _, _, _, na = one_round("flora-na", "train.local_steps=4")
    assert 0 < na["agg_error"] < fedit["agg_error"]
    assert na["bytes_up"] == fedit["bytes_up"] and na["bytes_down"] == fedit["bytes_down"]


def test_flora_na_broadcast_is_the_truncated_svd() -> None:
    exp, _, server, transport, _ = one_round("flora-na")
    for a_key, b_key in layer_pairs(exp.info.with_role("A", "B")).values():
        dense = ideal(exp, transport.uploads, a_key, b_key).double()
        U, S, Vh = torch.linalg.svd(dense)
        r = exp.config.adapter.rank
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        got = server.global_state[b_key].double() @ server.global_state[a_key].double()
        torch.testing.assert_close(got, best, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["flora-na", "flora"])
def test_vera_is_refused_where_there_are_no_factors(method: str) -> None:
    with pytest.raises(ConfigError, match="needs low-rank factors B, A"):
        tiny_config(f"method.name={method}", "adapter.kind=vera")


@pytest.mark.parametrize("dense_or_factored", [(6, 5, 1), (6, 5, 4)])
def test_base_delta_in_conv1d_orientation(dense_or_factored) -> None:
    d, k, c = dense_or_factored  # c = 1: factored form is smaller; c = 4: the dense form is sent
    gen = torch.Generator().manual_seed(0)
    P, Q = torch.randn(d, c, generator=gen), torch.randn(c, k, generator=gen)
    conv = Conv1D(d, k)  # GPT-2 style: weight is in×out = k×d, y = x·W + b
    x = torch.randn(3, k, generator=gen)
    before = conv(x)
    update = base_delta(LayerMeta("weight", transposed=True, scaling=0.5), P, Q)
    assert bool(update.factored) == (c * (d + k) < d * k) != bool(update.dense)
    with torch.no_grad():
        conv.weight.add_(update.materialize()["weight"])
    torch.testing.assert_close(conv(x), before + 0.5 * x @ (P @ Q).T, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_layers_are_seen_as_transposed() -> None:
    model = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    peft_model = adapters.attach(model, AdapterConfig(rank=2, targets=("c_attn",)), TaskType.FEATURE_EXTRACTION)
    state = adapters.read_state(adapters.slots(peft_model))
    metas = adapters.lora_layers(peft_model, tuple(sorted(state)))
    assert metas and all(m.transposed for m in metas.values())
    base = dict(peft_model.named_parameters())
    assert all(base[m.base_param].shape == (16, 48) for m in metas.values())  # in×out


# ---- FLoRA with per-client ranks --------------------------------------------------------------------------

HETERO = ("adapter.rank=[2,4,3]",)


@pytest.mark.parametrize("adapter", ["lora", "rslora"])
def test_flora_heterogeneous_ranks_merge_the_ideal_update(adapter: str) -> None:
    exp, w0, server, transport, record = one_round("flora", f"adapter.kind={adapter}", *HETERO)
    assert exp.client_adapters == {0: "rank2", 1: "default", 2: "rank3"}  # one PEFT adapter per distinct rank
    ranks = {u.client: u.payload[exp.info.with_role("A")[0]].shape[0] for u in transport.uploads}
    assert ranks == {0: 2, 1: 4, 2: 3}  # every client trained and uploaded at its own rank
    params = dict(exp.model.named_parameters())
    alpha = exp.config.adapter.alpha

    def s(r: int) -> float:
        return alpha / r if adapter == "lora" else alpha / r ** 0.5

    w = [float(u.num_examples) for u in transport.uploads]
    total = sum(w)
    for layer, (a_key, b_key) in layer_pairs(exp.info.with_role("A", "B")).items():
        meta = exp.info.layers[layer]
        # Σ p_u s_u B_u A_u, each client with the scaling of its own rank, computed here independently
        want = w0[meta.base_param].double() + sum(
            (wu / total) * s(u.payload[a_key].shape[0]) * (u.payload[b_key].double() @ u.payload[a_key].double())
            for wu, u in zip(w, transport.uploads))
        torch.testing.assert_close(params[meta.base_param].double(), want, rtol=0, atol=1e-5)
    assert record["agg_error"] < 1e-5
    # Bytes up: each client's A and B at its own rank (float32), plus the shared head.
    head = sum(exp.init_state[k].numel() for k in exp.info.with_role("head")) * 4
    per_rank = {r: sum(r * exp.init_state[k].shape[1] if k in exp.info.with_role("A") else
                       exp.init_state[k].shape[0] * r for k in exp.info.with_role("A", "B")) * 4 for r in (2, 3, 4)}
    assert record["bytes_up"] == sum(per_rank[r] for r in ranks.values()) + 3 * head


def test_flora_heterogeneous_ranks_next_round_starts_fresh_at_each_rank() -> None:
    exp, _, server, transport, _ = one_round("flora", *HETERO)
    batch = exp.task.batch(exp.split.global_test[:8], exp.device)
    exp.trainer.load(server.global_state)
    with torch.no_grad():
        merged = exp.model(**batch).logits  # the merged model: global adapter has B = 0
    for cid, node in enumerate(transport.nodes):
        node.receive(server.pending(cid))
        rank = exp.config.adapter.rank_of(cid)
        for k in exp.info.with_role("A"):
            assert node.state[k].shape[0] == rank
        for k in exp.info.with_role("B"):
            assert node.state[k].shape[1] == rank and torch.count_nonzero(node.state[k]) == 0
        exp.trainer.load(node.state, node.adapter)
        with torch.no_grad():
            torch.testing.assert_close(exp.model(**batch).logits, merged, rtol=0, atol=1e-6)


def test_flora_heterogeneous_ranks_server_checks_each_clients_rank() -> None:
    exp, _, server, transport, _ = one_round("flora", *HETERO)
    from fedlora.errors import UpdateRejected
    from fedlora.methods import Upload

    wrong = transport.uploads[1]  # client 1 has rank 4; client 0 must send rank 2
    with pytest.raises(UpdateRejected, match=r"expected \(2, "):
        server.validate(Upload(0, wrong.payload, wrong.num_examples, wrong.meta), 1)
    server.validate(Upload(1, wrong.payload, wrong.num_examples, wrong.meta), 1)
    with pytest.raises(UpdateRejected, match="client id 7"):
        server.validate(Upload(7, wrong.payload, wrong.num_examples, wrong.meta), 1)


def test_flora_heterogeneous_ranks_saved_adapters_load_with_peft(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from peft import PeftModel

    from fedlora import models
    from fedlora.report import RunDir
    from fedlora.runtime import simulation

    cfg = tiny_config("method.name=flora", *HETERO, "train.rounds=1")
    simulation.run(cfg, RunDir(tmp_path / "run"), progress=False)
    exp = build(cfg)
    batch = exp.task.batch(exp.split.global_test[:4], exp.device)
    for cid, rank in enumerate((2, 4, 3)):
        folder = tmp_path / "run" / "clients" / str(cid)
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == rank
        assert not any(p.is_dir() for p in folder.iterdir())  # a plain adapter folder, no per-name subfolder
        base = models.load_classifier(exp.config.model, 2, seed=exp.config.adapter.seed)
        loaded = PeftModel.from_pretrained(base, str(folder))
        assert loaded.peft_config["default"].r == rank
        with torch.no_grad():
            assert torch.isfinite(loaded(**batch).logits).all()


def test_per_client_ranks_are_refused_where_factors_are_averaged() -> None:
    with pytest.raises(ConfigError, match=r"adapter.rank = \[2, 4, 4\] needs clients with adapters of different ranks.*method.name = 'flora'"):
        tiny_config("method.name=fedit", "adapter.rank=[2,4,4]")
    with pytest.raises(ConfigError, match="adapter.rank has 2 entries but data.num_clients = 3"):
        tiny_config("method.name=flora", "adapter.rank=[2,4]")
    with pytest.raises(ConfigError, match=r"adapter.rank = .* out of range"):
        tiny_config("method.name=flora", "adapter.rank=[0,4,4]")
