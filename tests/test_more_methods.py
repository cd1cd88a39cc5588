"""RoLoRA, FedSVD, LoRA-FAIR, FlexLoRA and FLoRA-NA with per-client ranks.

Two layers of checks: the server rules in ``fedlora.functional`` against dense numpy computations on small random
layers (exactness where the method is exact, the paper's objective where it optimises one), in float32 and
float64; then the methods in real rounds of the embedded runtime on tiny-bert (what is trained, uploaded and
delivered each round, bytes, agg_error). Conformance (resume, Flower, export) is in test_conformance.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedlora import functional as F
from fedlora.adapters import role
from fedlora.config import load
from fedlora.errors import ConfigError
from fedlora.experiment import build
from fedlora.protocol import nbytes
from fedlora.runtime.simulation import make_server
from test_methods import recorded_rounds


def layer(n: int = 4, d: int = 12, k: int = 9, ranks: tuple[int, ...] = (3, 3, 3, 3), seed: int = 0,
          dtype: torch.dtype = torch.float64) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g, dtype=torch.float64).to(dtype) for r in ranks[:n]]
    As = [torch.randn(r, k, generator=g, dtype=torch.float64).to(dtype) for r in ranks[:n]]
    return Bs, As, [float(i + 1) for i in range(n)]


def dense_ideal(Bs, As, w) -> np.ndarray:  # type: ignore[no-untyped-def]
    p = np.asarray(w) / sum(w)
    return sum(pu * (B.double().numpy() @ A.double().numpy()) for pu, B, A in zip(p, Bs, As))


def rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


# ---- the rules -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_flexlora_is_the_truncated_svd_with_singular_values_on_b(dtype: torch.dtype, tol: float) -> None:
    Bs, As, w = layer(ranks=(2, 3, 5, 4), dtype=dtype)
    B, A = F.flexlora(Bs, As, w)
    assert B.dtype == A.dtype == dtype and B.shape == (12, 5) and A.shape == (5, 9)
    U, S, Vt = np.linalg.svd(dense_ideal(Bs, As, w))
    for q in (1, 3, 5):  # every leading truncation is that rank's optimum (what a client of rank q receives)
        want = (U[:, :q] * S[:q]) @ Vt[:q]
        assert rel(B[:, :q].double().numpy() @ A[:q].double().numpy(), want) < tol
    np.testing.assert_allclose(A.double().numpy() @ A.double().numpy().T, np.eye(5), atol=tol)  # A = V_rᵀ


def test_flexlora_never_forms_a_dk_matrix_shape_checks() -> None:
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        F.flexlora(*layer(), rank=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fedsvd_refactorises_exactly_with_orthonormal_a(dtype: torch.dtype, tol: float) -> None:
    Bs, As, w = layer(dtype=dtype)
    A = As[0]
    B2, A2 = F.fedsvd(Bs, A, w)
    p = np.asarray(w) / sum(w)
    B_bar = sum(pu * B.double().numpy() for pu, B in zip(p, Bs))
    assert rel(B2.double().numpy() @ A2.double().numpy(), B_bar @ A.double().numpy()) < tol
    np.testing.assert_allclose(A2.double().numpy() @ A2.double().numpy().T, np.eye(3), atol=tol)
    # A' = Vᵀ: the right singular vectors of B̄A, in decreasing order of σ
    _, S, Vt = np.linalg.svd(B_bar @ A.double().numpy(), full_matrices=False)
    np.testing.assert_allclose(np.abs(A2.double().numpy()), np.abs(Vt[:3]), atol=1e-4 if dtype == torch.float32 else 1e-9)
    np.testing.assert_allclose(np.linalg.norm(B2.double().numpy(), axis=0), S[:3], rtol=1e-4)


def test_fedsvd_keeps_every_row_of_a_alive_when_the_product_is_rank_deficient() -> None:
    Bs, As, w = layer()
    Bs = [B.clone() for B in Bs]
    for B in Bs:
        B[:, 2] = 0  # B̄A has rank 2 < r = 3
    B2, A2 = F.fedsvd(Bs, As[0], w)
    np.testing.assert_allclose(A2.numpy() @ A2.numpy().T, np.eye(3), atol=1e-12)  # no zero row
    assert float(B2[:, 2].abs().max()) < 1e-12  # the missing direction carries no update
    # completed inside A's row space: A' = M·A for some M
    M = np.linalg.lstsq(As[0].numpy().T, A2.numpy().T, rcond=None)[0].T
    np.testing.assert_allclose(M @ As[0].numpy(), A2.numpy(), atol=1e-10)


def test_fedsvd_needs_one_common_a() -> None:
    Bs, As, w = layer()
    with pytest.raises(ValueError):
        F.fedsvd(Bs, As[0][:2], w)  # B has 3 columns, A 2 rows


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_lora_fair_is_the_minimiser_of_its_objective(lam: float) -> None:
    Bs, As, w = layer()
    B, A = F.lora_fair(Bs, As, w, lam=lam)
    p = np.asarray(w) / sum(w)
    B_bar = sum(pu * b.numpy() for pu, b in zip(p, Bs))
    A_bar = sum(pu * a.numpy() for pu, a in zip(p, As))
    np.testing.assert_allclose(A.numpy(), A_bar, atol=1e-12)  # Ā is FedIT's
    ideal = dense_ideal(Bs, As, w)
    G = A_bar @ A_bar.T
    ridge = lam * np.trace(G) / 3

    def objective(Bp: np.ndarray) -> float:
        return float(np.linalg.norm(Bp @ A_bar - ideal) ** 2 + ridge * np.linalg.norm(Bp - B_bar) ** 2)

    # the normal equations hold (gradient zero) and random perturbations only increase the objective
    grad = 2 * (B.numpy() @ A_bar - ideal) @ A_bar.T + 2 * ridge * (B.numpy() - B_bar)
    assert np.abs(grad).max() < 1e-9
    rng = np.random.default_rng(0)
    assert all(objective(B.numpy()) <= objective(B.numpy() + 1e-3 * rng.standard_normal(B.shape)) for _ in range(20))
    # and it never does worse than FedIT on the aggregation error
    assert rel(B.numpy() @ A_bar, ideal) <= rel(B_bar @ A_bar, ideal) + 1e-12


def test_lora_fair_lambda_pulls_towards_fedit() -> None:
    Bs, As, w = layer()
    p = np.asarray(w) / sum(w)
    B_bar = sum(pu * b.numpy() for pu, b in zip(p, Bs))
    gaps = [np.linalg.norm(F.lora_fair(Bs, As, w, lam=lam)[0].numpy() - B_bar) for lam in (0.0, 0.1, 10.0, 1e6)]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] and gaps[3] < 1e-4 * gaps[0]
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        F.lora_fair(Bs, As, w, lam=-1.0)
    with pytest.raises(ValueError, match="equal ranks"):
        F.lora_fair(*layer(ranks=(2, 3, 3, 3)))


# ---- the methods in real rounds --------------------------------------------------------------------------------

def rounds(method: str, *extra: str, n: int = 2):  # type: ignore[no-untyped-def]
    return recorded_rounds(f"method.name={method}", *extra, n=n)


def test_rolora_alternates_b_then_a_and_is_exact() -> None:
    exp, server, transport, records = rounds("rolora", n=3)
    roles = {k: role(k) for k in exp.init_state}
    per_round = [transport.uploads[i * 3:(i + 1) * 3] for i in range(3)]
    for r, ups in zip((1, 2, 3), per_round):
        trained = "B" if r % 2 else "A"
        for u in ups:
            assert {roles[k] for k in u.payload} == {trained, "head"}
    # the frozen side is identical on every client and untouched by training
    for client, state in transport.trained.items():  # after round 3 (B trained): every A is the global Ā
        for k, r in roles.items():
            if r == "A":
                torch.testing.assert_close(state[k], server.global_state[k], rtol=0, atol=0)
    assert all(rec["agg_error"] < 1e-5 for rec in records)  # exact up to float32 rounding
    assert records[0]["bytes_up"] == sum(u.nbytes for u in per_round[0])


def test_fedsvd_uploads_b_broadcasts_orthonormal_a_and_is_exact() -> None:
    exp, server, transport, records = rounds("fedsvd")
    roles = {k: role(k) for k in exp.init_state}
    assert all({roles[k] for k in u.payload} == {"B", "head"} for u in transport.uploads)
    for k, r in roles.items():
        if r == "A":
            A = server.global_state[k].double()
            torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
    assert all(rec["agg_error"] < 1e-5 for rec in records)


def test_lora_fair_error_is_below_fedit_on_the_same_uploads() -> None:
    exp, server, transport, records = rounds("lora-fair", n=1)
    ups = transport.uploads
    fedit = make_server(build(tiny_config("method.name=fedit"))).method
    fair_err = records[0]["agg_error"]
    fedit_err = fedit.aggregate(ups, server.global_state).stats["agg_error"]
    assert 0 < fair_err < fedit_err


RANKS = "adapter.rank=[2,4,8]"


@pytest.mark.parametrize("method", ["flexlora", "flora-na"])
def test_per_client_ranks_each_client_gets_its_truncation(method: str) -> None:
    exp, server, transport, records = rounds(method, RANKS, n=2)
    from fedlora.adapters import layer_pairs, scaling

    cfg = exp.config.adapter
    pairs = layer_pairs(exp.info.with_role("A", "B"))
    for c, r in enumerate((2, 4, 8)):
        node = transport.nodes[c].state
        for a_key, b_key in pairs.values():
            A_g, B_g = server.global_state[a_key].double(), server.global_state[b_key].double()
            assert node[a_key].shape[0] == r
            # s_r·B_c·A_c is the first r components of the global s·B·A
            want = scaling(cfg) * (B_g[:, :r] @ A_g[:r])
            got = scaling(cfg, r) * (node[b_key].double() @ node[a_key].double())
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # bytes: each client is sent its own truncation, and that is what is counted
    last = records[-1]
    sent = [sum(nbytes(b.payload) for b in server.pending(c)) for c in range(3)]
    assert sent == [0, 0, 0]  # everyone was synced by the evaluation
    sizes = {c: sum(t.numel() * t.element_size() for k, t in transport.nodes[c].state.items()
                    if role(k) in ("A", "B", "head")) for c in range(3)}
    assert last["bytes_down"] == sum(sizes.values())
    assert last["agg_error"] >= 0


def test_flora_na_ranks_refuse_the_estimators_that_need_one_shape() -> None:
    with pytest.raises(ConfigError, match="method.name = 'flora-na': a per-client adapter.rank needs "
                                          "method.na_estimator = 'svd'"):
        load(None, ["method.name=flora-na", "method.na_estimator=paper", RANKS])
    with pytest.raises(ConfigError, match="adapter.rank = \\[2, 4, 8\\] needs clients with adapters of different "
                                          "ranks.*'flexlora'"):
        load(None, ["method.name=lora-fair", RANKS])


def test_no_rule_forms_a_dk_matrix() -> None:
    """d = k = 200,000: one d×k float32 matrix would take 160 GB, the factors a few MB. Every rule (and the error
    measure) runs, so none of them forms ΔW̄ or B·A."""
    d, r = 200_000, 2
    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(d, r, generator=g) * 1e-2 for _ in range(3)]
    As = [torch.randn(r, d, generator=g) / 400 for _ in range(3)]
    w = [1.0, 2.0, 3.0]
    for B, A in (F.flexlora(Bs, As, w), F.flora_na(Bs, As, w), F.fedsvd(Bs, As[0], w), F.lora_fair(Bs, As, w),
                 F.flexlora([Bs[0][:, :1], *Bs[1:]], [As[0][:1], *As[1:]], w)):
        assert B.shape == (d, r) and A.shape == (r, d) and bool(torch.isfinite(B).all() and torch.isfinite(A).all())
        assert 0 <= F.relative_error(Bs, As, w, B, A) < math.inf
