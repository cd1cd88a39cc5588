"""Tests for fedlora.functional: identities from DESIGN.md, checked against dense float64 computations.

Expected values are worked out independently of the code under test: the ideal update is summed client by
client, and the rank-r optimum comes from torch.linalg.svd of that dense d×k matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora import functional as F

F64 = torch.float64
Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------- helpers

def make_clients(d: int, k: int, ranks: list[int], seed: int = 0, dtype: torch.dtype = F64
                 ) -> tuple[list[Tensor], list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g, dtype=F64).to(dtype) for r in ranks]
    As = [torch.randn(r, k, generator=g, dtype=F64).to(dtype) for r in ranks]
    return Bs, As


def dense_ideal(Bs: list[Tensor], As: list[Tensor], weights: list[float]) -> Tensor:
    total = sum(weights)
    return sum((w / total) * (B.double() @ A.double()) for B, A, w in zip(Bs, As, weights))  # type: ignore[return-value]


def dense_truncation(M: Tensor, r: int) -> tuple[Tensor, float]:
    """Rank-r truncated SVD of M and the optimal error sqrt(Σ_{i>r} σ_i²) (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r], float(S[r:].square().sum().sqrt())


def frob(M: Tensor) -> float:
    return float(torch.linalg.matrix_norm(M))


WEIGHTS4 = [1.0, 2.0, 3.0, 4.0]


# ------------------------------------------------------------------------------------------------- flora_na

@pytest.mark.parametrize(("d", "k", "ranks", "rank"), [
    (24, 40, [3, 3, 3, 3], None),  # non-square, d < k
    (40, 24, [3, 3, 3, 3], None),  # non-square, d > k
    (24, 40, [3, 3, 3, 3], 5),  # compress to a higher rank than the clients'
    (24, 40, [3, 3, 3, 3], 1),
    (24, 40, [2, 3, 5, 1], None),  # heterogeneous ranks: default rank is the largest
    (8, 30, [3, 3, 3, 3], 3),  # N·r = 12 > d = 8: the Householder path
])
def test_flora_na_is_the_dense_truncated_svd(d: int, k: int, ranks: list[int], rank: int | None) -> None:
    # Prepare
    Bs, As = make_clients(d, k, ranks, seed=d + k)
    r = max(ranks) if rank is None else rank
    best, optimum = dense_truncation(dense_ideal(Bs, As, WEIGHTS4), r)
    # Execute
    B, A = F.flora_na(Bs, As, WEIGHTS4, rank=rank)
    # Assert
    assert B.shape == (d, r) and A.shape == (r, k)
    torch.testing.assert_close(B @ A, best, atol=1e-10, rtol=0)
    assert math.isclose(frob(dense_ideal(Bs, As, WEIGHTS4) - B @ A), optimum, rel_tol=1e-10)


@pytest.mark.parametrize("rank", [4, 12, 20])
def test_flora_na_is_exact_when_the_ideal_has_rank_at_most_r(rank: int) -> None:
    # Prepare: every B_u spans the same 4 columns, so rank(ΔW̄) ≤ 4; rank 20 > N·r = 12 pads with zeros
    g = torch.Generator().manual_seed(1)
    base = torch.randn(24, 4, generator=g, dtype=F64)
    Bs = [base @ torch.randn(4, 3, generator=g, dtype=F64) for _ in range(4)]
    As = [torch.randn(3, 40, generator=g, dtype=F64) for _ in range(4)]
    # Execute
    B, A = F.flora_na(Bs, As, WEIGHTS4, rank=rank)
    # Assert
    assert B.shape == (24, rank) and A.shape == (rank, 40)
    torch.testing.assert_close(B @ A, dense_ideal(Bs, As, WEIGHTS4), atol=1e-10, rtol=0)


def test_flora_na_of_one_client_is_its_own_update() -> None:
    Bs, As = make_clients(24, 40, [3])
    B, A = F.flora_na(Bs, As, [7.0])
    torch.testing.assert_close(B @ A, Bs[0] @ As[0], atol=1e-10, rtol=0)


def test_flora_na_takes_the_householder_path_for_nearly_identical_clients() -> None:
    # Prepare: clients differ by 1e-9, so [p_uB_u] is numerically rank r and Cholesky-QR must be refused
    Bs, As = make_clients(24, 40, [3])
    g = torch.Generator().manual_seed(2)
    Bs = [Bs[0] + 1e-9 * torch.randn(24, 3, generator=g, dtype=F64) for _ in range(4)]
    As = [As[0] + 1e-9 * torch.randn(3, 40, generator=g, dtype=F64) for _ in range(4)]
    best, _ = dense_truncation(dense_ideal(Bs, As, WEIGHTS4), 3)
    # Execute
    B, A = F.flora_na(Bs, As, WEIGHTS4)
    # Assert
    torch.testing.assert_close(B @ A, best, atol=1e-10, rtol=0)


def test_flora_na_ignores_regauging_but_fedit_does_not() -> None:
    # Prepare: client 2 sends B_2·R and R⁻¹·A_2, the same update
    Bs, As = make_clients(24, 40, [3, 3, 3, 3], seed=3)
    R = torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=F64) + 3 * torch.eye(3, dtype=F64)
    Bs2, As2 = list(Bs), list(As)
    Bs2[2], As2[2] = Bs[2] @ R, torch.linalg.solve(R, As[2])
    # Execute
    flora_before, flora_after = F.flora_na(Bs, As, WEIGHTS4), F.flora_na(Bs2, As2, WEIGHTS4)
    fedit_before, fedit_after = F.fedit(Bs, As, WEIGHTS4), F.fedit(Bs2, As2, WEIGHTS4)
    # Assert
    torch.testing.assert_close(flora_after[0] @ flora_after[1], flora_before[0] @ flora_before[1],
                               atol=1e-10, rtol=0)
    assert frob(fedit_after[0] @ fedit_after[1] - fedit_before[0] @ fedit_before[1]) > 1e-2


@pytest.mark.parametrize("ranks", [[3, 3, 3, 3], [2, 3, 5, 1]])
def test_splits_share_the_product_and_fedit_scale_matches_fedits_norm_ratio(ranks: list[int]) -> None:
    # Prepare: FedIT's means, zero-padded to the largest rank for mixed ranks
    Bs, As = make_clients(24, 40, ranks, seed=5)
    r = max(ranks)
    B_bar = sum(w / 10 * torch.nn.functional.pad(B, (0, r - B.shape[1])) for B, w in zip(Bs, WEIGHTS4))
    A_bar = sum(w / 10 * torch.nn.functional.pad(A, (0, 0, 0, r - A.shape[0])) for A, w in zip(As, WEIGHTS4))
    # Execute
    Bb, Ab = F.flora_na(Bs, As, WEIGHTS4, split="balanced")
    Bf, Af = F.flora_na(Bs, As, WEIGHTS4, split="fedit-scale")
    # Assert
    torch.testing.assert_close(Bf @ Af, Bb @ Ab, atol=1e-10, rtol=0)
    assert math.isclose(frob(Bb), frob(Ab), rel_tol=1e-10)
    assert math.isclose(frob(Bf) / frob(Af), frob(B_bar) / frob(A_bar), rel_tol=1e-10)


def test_fedit_scale_with_a_zero_ideal_returns_zero_b_and_fedits_a() -> None:
    # Prepare: round one of LoRA, every B zero-initialised
    _, As = make_clients(24, 40, [3, 3, 3, 3], seed=6)
    Bs = [torch.zeros(24, 3, dtype=F64) for _ in range(4)]
    A_bar = sum(w / 10 * A for A, w in zip(As, WEIGHTS4))
    # Execute
    B, A = F.flora_na(Bs, As, WEIGHTS4, split="fedit-scale")
    B5, A5 = F.flora_na(Bs, As, WEIGHTS4, rank=5, split="fedit-scale")
    # Assert
    assert not B.any() and not B5.any()
    torch.testing.assert_close(A, A_bar, atol=1e-12, rtol=0)
    torch.testing.assert_close(A5, torch.cat([A_bar, torch.zeros(2, 40, dtype=F64)]), atol=1e-12, rtol=0)


def test_fedit_scale_falls_back_to_balanced_when_fedits_b_mean_is_zero() -> None:
    # Prepare: B_2 = −B_1 with equal weights, so B̄ = 0 while ΔW̄ = p(B_1A_1 − B_1A_2) ≠ 0
    Bs, As = make_clients(24, 40, [3, 3], seed=7)
    Bs[1] = -Bs[0]
    # Execute
    Bb, Ab = F.flora_na(Bs, As, [1.0, 1.0])
    Bf, Af = F.flora_na(Bs, As, [1.0, 1.0], split="fedit-scale")
    # Assert
    torch.testing.assert_close((Bf, Af), (Bb, Ab), atol=0, rtol=0)
    torch.testing.assert_close(Bf @ Af, dense_ideal(Bs, As, [1.0, 1.0]), atol=1e-10, rtol=0)


def test_zero_weight_clients_do_not_count() -> None:
    Bs, As = make_clients(24, 40, [3, 3, 3], seed=8)
    B, A = F.flora_na(Bs, As, [2.0, 0.0, 1.0])
    B2, A2 = F.flora_na([Bs[0], Bs[2]], [As[0], As[2]], [2.0, 1.0])
    torch.testing.assert_close(B @ A, B2 @ A2, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------- FedIT, FedEx, stacking

def test_fedit_error_is_the_sum_of_deviation_products_with_rank_at_most_n_minus_1_r() -> None:
    # Prepare
    Bs, As = make_clients(24, 40, [3, 3, 3, 3], seed=9)
    p = [w / 10 for w in WEIGHTS4]
    B_bar, A_bar = sum(pu * B for pu, B in zip(p, Bs)), sum(pu * A for pu, A in zip(p, As))
    deviations = sum(pu * (B - B_bar) @ (A - A_bar) for pu, B, A in zip(p, Bs, As))
    # Execute
    B, A = F.fedit(Bs, As, WEIGHTS4)
    error = F.fedit_error(Bs, As, WEIGHTS4)
    # Assert
    torch.testing.assert_close((B, A), (B_bar, A_bar), atol=1e-12, rtol=0)
    torch.testing.assert_close(dense_ideal(Bs, As, WEIGHTS4) - B @ A, deviations, atol=1e-10, rtol=0)
    torch.testing.assert_close(error, deviations, atol=1e-10, rtol=0)
    assert int(torch.linalg.matrix_rank(error)) == (4 - 1) * 3


def _product(rule: str, Bs: list[Tensor], As: list[Tensor], w: list[float]) -> Tensor:
    if rule == "fedex":
        B, A, residual = F.fedex(Bs, As, w)
        return B @ A + residual
    if rule == "flora_na_coefficients":
        B, A = F.flora_na_coefficients(Bs, As, w, steps=20)
        return B @ A
    B, A = getattr(F, rule)(Bs, As, w)
    return B @ A


RULES = ["fedit", "flora_na", "flora_na_coefficients", "fedex", "flora_stack"]


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_is_exact_for_identical_clients(rule: str) -> None:
    Bs, As = make_clients(24, 40, [3], seed=10)
    product = _product(rule, Bs * 4, As * 4, WEIGHTS4)
    torch.testing.assert_close(product, Bs[0] @ As[0], atol=1e-10, rtol=0)


def test_fedex_residual_completes_fedit_and_matches_its_factored_form() -> None:
    # Prepare
    Bs, As = make_clients(24, 40, [3, 3, 3, 3], seed=11)
    ideal = dense_ideal(Bs, As, WEIGHTS4)
    # Execute
    B, A, residual = F.fedex(Bs, As, WEIGHTS4)
    P, Q = F.residual_factors(Bs, As, WEIGHTS4, B, A)
    # Assert
    torch.testing.assert_close((B, A), F.fedit(Bs, As, WEIGHTS4), atol=0, rtol=0)
    torch.testing.assert_close(B @ A + residual, ideal, atol=1e-10, rtol=0)
    assert P.shape == (24, 4 * 3 + 3) and Q.shape == (4 * 3 + 3, 40)
    torch.testing.assert_close(P @ Q, residual, atol=1e-10, rtol=0)


def test_flora_stack_is_exact_for_heterogeneous_ranks() -> None:
    # Prepare
    Bs, As = make_clients(24, 40, [2, 3, 5], seed=12)
    w = [1.0, 2.0, 5.0]
    # Execute
    B, A = F.flora_stack(Bs, As, w)
    # Assert
    assert B.shape == (24, 10) and A.shape == (10, 40)
    torch.testing.assert_close(B[:, 2:5], Bs[1], atol=0, rtol=0)
    torch.testing.assert_close(A[2:5], As[1] * 0.25, atol=0, rtol=0)
    torch.testing.assert_close(B @ A, dense_ideal(Bs, As, w), atol=1e-10, rtol=0)
    torch.testing.assert_close(F.ideal_update(Bs, As, w), dense_ideal(Bs, As, w), atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------- errors and the estimator

@pytest.mark.parametrize("rule", ["fedit", "flora_na", "flora_na_coefficients"])
def test_relative_error_matches_the_dense_computation(rule: str) -> None:
    Bs, As = make_clients(24, 40, [3, 3, 3, 3], seed=13)
    ideal = dense_ideal(Bs, As, WEIGHTS4)
    B, A = getattr(F, rule)(Bs, As, WEIGHTS4)
    expected = frob(ideal - B @ A) / frob(ideal)
    assert math.isclose(F.relative_error(Bs, As, WEIGHTS4, B, A), expected, rel_tol=1e-10)


def test_relative_error_of_zero_updates() -> None:
    zeros = [torch.zeros(6, 2, dtype=F64)]
    A = [torch.ones(2, 5, dtype=F64)]
    assert F.relative_error(zeros, A, [1.0], zeros[0], A[0]) == 0.0
    assert F.relative_error(zeros, A, [1.0], torch.ones(6, 2, dtype=F64), A[0]) == math.inf


def test_coefficients_improve_on_fedit_deterministically() -> None:
    # Prepare
    Bs, As = make_clients(24, 40, [3, 3, 3, 3], seed=14)
    fedit_error = F.relative_error(Bs, As, WEIGHTS4, *F.fedit(Bs, As, WEIGHTS4))
    optimum = F.relative_error(Bs, As, WEIGHTS4, *F.flora_na(Bs, As, WEIGHTS4))
    # Execute
    first, second = F.flora_na_coefficients(Bs, As, WEIGHTS4), F.flora_na_coefficients(Bs, As, WEIGHTS4)
    start = F.flora_na_coefficients(Bs, As, WEIGHTS4, steps=0)
    # Assert
    error = F.relative_error(Bs, As, WEIGHTS4, *first)
    assert optimum <= error < fedit_error
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(start, F.fedit(Bs, As, WEIGHTS4), atol=1e-15, rtol=0)


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 1.0, 100.0])
def test_coefficients_never_do_worse_than_fedit(lr: float) -> None:
    Bs, As = make_clients(12, 9, [2, 2, 2], seed=15)
    w = [3.0, 1.0, 1.0]
    fedit_error = F.relative_error(Bs, As, w, *F.fedit(Bs, As, w))
    assert F.relative_error(Bs, As, w, *F.flora_na_coefficients(Bs, As, w, steps=30, lr=lr)) <= fedit_error + 1e-12


# ----------------------------------------------------------------------------------------- dtype and device

LAYER_FUNCTIONS: dict[str, Callable[..., object]] = {
    "ideal_update": F.ideal_update, "fedit": F.fedit, "flora_na": F.flora_na,
    "flora_na fedit-scale": lambda Bs, As, w: F.flora_na(Bs, As, w, split="fedit-scale"),
    "flora_na_coefficients": lambda Bs, As, w: F.flora_na_coefficients(Bs, As, w, steps=5),
    "fedex": F.fedex, "flora_stack": F.flora_stack, "fedit_error": F.fedit_error,
    "residual_factors": lambda Bs, As, w: F.residual_factors(Bs, As, w, Bs[0], As[0]),
    "weighted_mean": lambda Bs, As, w: F.weighted_mean(As, w),
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", list(LAYER_FUNCTIONS))
def test_results_keep_the_inputs_dtype_and_device(name: str, dtype: torch.dtype, device: str) -> None:
    Bs, As = make_clients(24, 40, [3, 3, 3, 3], seed=16, dtype=dtype)
    Bs, As = [B.to(device) for B in Bs], [A.to(device) for A in As]
    out = LAYER_FUNCTIONS[name](Bs, As, torch.tensor(WEIGHTS4))
    for t in out if isinstance(out, tuple) else (out,):
        assert t.dtype == dtype and t.device.type == device


def test_float32_flora_na_is_close_to_the_float64_answer() -> None:
    Bs, As = make_clients(24, 40, [3, 3, 3, 3], seed=17, dtype=torch.float32)
    best, _ = dense_truncation(dense_ideal(Bs, As, WEIGHTS4), 3)
    B, A = F.flora_na(Bs, As, WEIGHTS4)
    torch.testing.assert_close((B.double() @ A.double()), best, atol=1e-5, rtol=0)


def test_normalize_weights_and_weighted_mean() -> None:
    p = F.normalize_weights(torch.tensor([1, 3]), 2)
    assert p.dtype == F64 and p.tolist() == [0.25, 0.75]
    assert F.normalize_weights((2.0, 0.0, 2.0), 3).tolist() == [0.5, 0.0, 0.5]
    mean = F.weighted_mean([torch.ones(2, 3), torch.full((2, 3), 5.0)], [1.0, 3.0])
    torch.testing.assert_close(mean, torch.full((2, 3), 4.0), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ bad inputs

def _b(d: int = 6, r: int = 2) -> Tensor:
    return torch.ones(d, r, dtype=F64)


def _a(r: int = 2, k: int = 5) -> Tensor:
    return torch.ones(r, k, dtype=F64)


BAD_LAYERS = [  # (Bs, As, weights, message)
    ([], [], [], r"no client updates: Bs and As are empty"),
    ([_b()], [_a(), _a()], [1, 1], r"length mismatch: 1 B factors but 2 A factors"),
    ([_b(), _b()], [_a(), _a()], [1.0], r"length mismatch: 1 weights for 2 clients"),
    ([_b(), _b()], [_a(), _a()], [0.0, 0.0], r"weights sum to zero"),
    ([_b(), _b()], [_a(), _a()], [1.0, -1.0], r"weight of client 1 is negative \(-1.0\)"),
    ([_b(), _b()], [_a(), _a()], [float("nan"), 1.0], r"weight of client 0 is not finite \(nan\)"),
    ([_b(), _b()], [_a(), _a()], [1.0, float("inf")], r"weight of client 1 is not finite \(inf\)"),
    ([_b(), _b()], [_a(), _a()], torch.ones(2, 1), r"weights must be a 1-D tensor, got shape \(2, 1\)"),
    ([_b(), _b()], [_a(), _a()], ["a", "b"], r"weights must be a sequence of numbers"),
    ([_b(), _b()], [_a(), _a(3)], [1, 1], r"client 1: B is 6×2 but A is 3×5; B's columns must equal A's rows"),
    ([_b(), _b(7)], [_a(), _a()], [1, 1], r"client 1: update is 7×5 .* client 0's is 6×5"),
    ([_b(), _b()], [_a(), _a(k=4)], [1, 1], r"client 1: update is 6×4 .* client 0's is 6×5"),
    ([torch.ones(6, dtype=F64)], [_a()], [1], r"client 0: B must be a 2-D matrix, got shape \(6,\)"),
    ([_b()], [torch.ones(1, 2, 5, dtype=F64)], [1], r"client 0: A must be a 2-D matrix, got shape \(1, 2, 5\)"),
    ([_b().numpy()], [_a()], [1], r"client 0: B must be a torch.Tensor, got ndarray"),
    ([_b().long()], [_a()], [1], r"client 0: B must be a floating-point tensor, got torch.int64"),
    ([_b(), _b()], [_a(), _a().float()], [1, 1], r"client 1: A is torch.float32 on cpu but the first tensor is "
                                                 r"torch.float64 on cpu"),
    ([_b(), _b()], [_a(), _a() * float("nan")], [1, 1], r"client 1: A has non-finite values"),
    ([_b(r=0)], [_a(r=0)], [1], r"client 0: empty factors \(B is 6×0, A is 0×5\)"),
    (_b(), [_a()], [1], r"Bs must be a sequence \(list or tuple\) of tensors, got Tensor"),
]

ESTIMATE = (_b(), _a())
LAYER_CALLS: dict[str, Callable[..., object]] = {
    **{name: fn for name, fn in LAYER_FUNCTIONS.items() if name not in ("residual_factors", "weighted_mean")},
    "residual_factors": lambda Bs, As, w: F.residual_factors(Bs, As, w, *ESTIMATE),
    "relative_error": lambda Bs, As, w: F.relative_error(Bs, As, w, *ESTIMATE),
}


@pytest.mark.parametrize("name", list(LAYER_CALLS))
@pytest.mark.parametrize(("Bs", "As", "weights", "message"), BAD_LAYERS)
def test_bad_layers_are_rejected_by_every_function(name: str, Bs: list[Tensor], As: list[Tensor],
                                                   weights: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LAYER_CALLS[name](Bs, As, weights)


MIXED = ([_b(), _b(r=3)], [_a(), _a(r=3)], [1, 1])
BAD_CALLS = [  # (call, message)
    (lambda: F.fedit(*MIXED), r"fedit needs equal ranks, got ranks \[2, 3\]; use flora_stack or flora_na"),
    (lambda: F.fedex(*MIXED), r"fedex needs equal ranks, got ranks \[2, 3\]"),
    (lambda: F.fedit_error(*MIXED), r"fedit_error needs equal ranks"),
    (lambda: F.flora_na_coefficients(*MIXED), r"flora_na_coefficients needs equal ranks"),
    (lambda: F.flora_na([_b()], [_a()], [1], split="lopsided"),
     r"unknown split 'lopsided'; expected one of 'balanced', 'fedit-scale'"),
    (lambda: F.flora_na([_b()], [_a()], [1], rank=0), r"rank must be a positive integer, got 0"),
    (lambda: F.flora_na([_b()], [_a()], [1], rank=True), r"rank must be a positive integer, got True"),
    (lambda: F.flora_na([_b()], [_a()], [1], rank=2.0), r"rank must be a positive integer, got 2.0"),
    (lambda: F.flora_na_coefficients([_b()], [_a()], [1], rank=3), r"keeps the clients' rank 2; got rank=3"),
    (lambda: F.flora_na_coefficients([_b()], [_a()], [1], steps=-1), r"steps must be a non-negative integer"),
    (lambda: F.flora_na_coefficients([_b()], [_a()], [1], lr=0.0), r"lr must be a positive number, got 0.0"),
    (lambda: F.relative_error([_b()], [_a()], [1], _b(), _a(k=4)),
     r"estimate: B·A is 6×4 \(B 6×2, A 2×4\) but the clients' layer is 6×5"),
    (lambda: F.residual_factors([_b()], [_a()], [1], _b(), _a(r=3)), r"estimate: B is 6×2 but A is 3×5"),
    (lambda: F.residual_factors([_b()], [_a()], [1], _b().float(), _a()), r"estimate: B is torch.float32"),
    (lambda: F.weighted_mean([], []), r"no clients: at least one update is needed"),
    (lambda: F.weighted_mean([_a(), _b()], [1, 1]), r"tensor 1 has shape \(6, 2\) but tensor 0 has \(2, 5\)"),
    (lambda: F.weighted_mean([_a(), _a()], [1]), r"length mismatch: 1 weights for 2 clients"),
    (lambda: F.weighted_mean([_a(), _a().float()], [1, 1]), r"tensor 1 is torch.float32"),
    (lambda: F.normalize_weights([1.0], 0), r"no clients"),
]


@pytest.mark.parametrize(("call", "message"), BAD_CALLS)
def test_bad_arguments_are_rejected(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# -------------------------------------------------------------------------------------------------- property

@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 9), k=st.integers(1, 9), n=st.integers(1, 4), r=st.integers(1, 3),
       weights=st.lists(st.floats(0.05, 20.0), min_size=4, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_flora_na_is_never_worse_than_fedit(d: int, k: int, n: int, r: int, weights: list[float], seed: int) -> None:
    # Prepare
    Bs, As = make_clients(d, k, [r] * n, seed=seed)
    w = weights[:n]
    ideal = dense_ideal(Bs, As, w)
    # Execute
    B_hat, A_hat = F.flora_na(Bs, As, w)
    B_bar, A_bar = F.fedit(Bs, As, w)
    # Assert
    assert frob(ideal - B_hat @ A_hat) <= frob(ideal - B_bar @ A_bar) + 1e-9
