"""What each method uploads, what aggregation delivers, and what stays private, for every method × adapter.

Each test runs real rounds of the embedded runtime on tiny-bert and records every message, then checks the
rule against values computed independently here (float64 weighted means from the recorded uploads).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import pytest
import torch

from conftest import tiny_config
from fedlora.adapters import role
from fedlora.experiment import build
from fedlora.methods import Broadcast, Upload
from fedlora.runtime.loop import run_round
from fedlora.runtime.simulation import EmbeddedTransport, make_server

BASIC = ("fedit", "ffa", "fedsa")
ADAPTERS = ("lora", "rslora", "vera")


class Recorder(EmbeddedTransport):
    """The embedded transport, keeping every upload and each client's state right after local training."""

    def __init__(self, exp):  # type: ignore[no-untyped-def]
        super().__init__(exp)
        self.uploads: list[Upload] = []
        self.trained: dict[int, dict[str, torch.Tensor]] = {}
        self.received: list[Broadcast] = []

    def fit(self, client: int, broadcasts: Sequence[Broadcast], round_: int) -> Upload:
        upload = super().fit(client, broadcasts, round_)
        self.uploads.append(upload)
        self.trained[client] = {k: v.clone() for k, v in self.nodes[client].state.items()}
        return upload


def recorded_rounds(*overrides: str, n: int = 2):  # type: ignore[no-untyped-def]
    """``n`` evaluated rounds of the tiny config with ``overrides`` through a :class:`Recorder`."""
    exp = build(tiny_config(*overrides))
    server = make_server(exp)
    transport = Recorder(exp)
    records = [run_round(server, transport, exp.config, r, exp.split.global_test, evaluate=True)
               for r in range(1, n + 1)]
    return exp, server, transport, records


def run_two_rounds(method: str, adapter: str, *extra: str):  # type: ignore[no-untyped-def]
    return recorded_rounds(f"method.name={method}", f"adapter.kind={adapter}", *extra)


def expected_mean(uploads: Sequence[Upload], key: str, uniform: bool = False) -> torch.Tensor:
    w = torch.tensor([1.0 if uniform else float(u.num_examples) for u in uploads], dtype=torch.float64)
    stacked = torch.stack([u.payload[key].double() for u in uploads])
    return (w[:, None] * stacked.reshape(len(uploads), -1)).sum(0).reshape(stacked.shape[1:]) / w.sum()


@pytest.mark.parametrize("method,adapter", list(itertools.product(BASIC, ADAPTERS)))
def test_uploads_exactly_the_shared_keys(method: str, adapter: str) -> None:
    exp, _, transport, _ = run_two_rounds(method, adapter)
    roles = {k: role(k) for k in exp.init_state}
    expected_roles = {"fedit": {"A", "B", "head"}, "ffa": {"B", "head"}, "fedsa": {"A"}}[method]
    expected = {k for k, r in roles.items() if r in expected_roles}
    assert len(transport.uploads) == 6  # 3 clients × 2 rounds
    for upload in transport.uploads:
        assert set(upload.payload) == expected
    if method == "fedsa":
        sent = set().union(*(u.payload for u in transport.uploads))
        assert not any(roles[k] in ("B", "head") for k in sent), "FedSA leaked a private tensor"


@pytest.mark.parametrize("method,adapter", list(itertools.product(BASIC, ADAPTERS)))
def test_clients_receive_the_weighted_mean(method: str, adapter: str) -> None:
    exp, server, transport, _ = run_two_rounds(method, adapter)
    last_round = transport.uploads[-3:]
    for key in last_round[0].payload:
        want = expected_mean(last_round, key)
        for node in transport.nodes:
            torch.testing.assert_close(node.state[key].double(), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(server.global_state[key].double(), want, rtol=0, atol=1e-6)


def test_uniform_weighting_ignores_sample_counts() -> None:
    _, _, transport, _ = run_two_rounds("fedit", "lora", "method.weighting=uniform")
    last_round = transport.uploads[-3:]
    assert len({u.num_examples for u in last_round}) > 1  # the Dirichlet split gives unequal clients
    for key in last_round[0].payload:
        want = expected_mean(last_round, key, uniform=True)
        torch.testing.assert_close(transport.nodes[0].state[key].double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_fedsa_private_side_is_untouched_by_aggregation(adapter: str) -> None:
    exp, _, transport, _ = run_two_rounds("fedsa", adapter)
    private = [k for k in exp.init_state if role(k) in ("B", "head")]
    for cid, node in enumerate(transport.nodes):
        for k in private:
            assert torch.equal(node.state[k], transport.trained[cid][k]), k
    # and the private sides really differ between clients (they were trained on different data)
    b_key = next(k for k in private if role(k) == "B")
    assert not torch.equal(transport.nodes[0].state[b_key], transport.nodes[1].state[b_key])


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_ffa_a_side_is_frozen_and_identical(adapter: str) -> None:
    exp, server, transport, _ = run_two_rounds("ffa", adapter)
    for k in (k for k in exp.init_state if role(k) == "A"):
        for node in transport.nodes:
            assert torch.equal(node.state[k], exp.init_state[k]), k
        assert torch.equal(server.global_state[k], exp.init_state[k])


@pytest.mark.parametrize("method", BASIC)
def test_bytes_are_the_sizes_of_the_tensors_sent(method: str) -> None:
    exp, _, transport, records = run_two_rounds(method, "lora")
    # Worked out by hand for tiny-bert (hidden 32, 2 layers), rank 4 on query and value, float32, 2 labels:
    # lora_A 4×32 and lora_B 32×4 per module = 128 floats each, 4 modules; head 2×32 + 2.
    a_side, b_side, head = 4 * 128 * 4, 4 * 128 * 4, (2 * 32 + 2) * 4
    per_client = {"fedit": a_side + b_side + head, "ffa": b_side + head, "fedsa": a_side}[method]
    for record in records:
        assert record["bytes_up"] == 3 * per_client
        # every client receives the round's broadcast once (at evaluation), of the same keys
        assert record["bytes_down"] == 3 * per_client


def test_global_model_only_where_the_method_has_one() -> None:
    for method, has_global in (("fedit", True), ("ffa", True), ("fedsa", False)):
        _, _, _, records = run_two_rounds(method, "lora")
        assert (records[-1]["acc_global"] is not None) == has_global
        assert records[-1]["acc_personal_mean"] is not None


def test_fedit_without_shared_head_has_no_global_model() -> None:
    exp, _, transport, records = run_two_rounds("fedit", "lora", "method.share_head=false")
    assert records[-1]["acc_global"] is None
    assert not any(role(k) == "head" for k in transport.uploads[0].payload)
