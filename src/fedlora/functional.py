"""Per-layer aggregation maths for LoRA factors: pure functions over tensors, no I/O, no state (DESIGN.md).

Client u uploads B_u (d×r_u) and A_u (r_u×k); its update is B_u·A_u. Weights are normalised to p_u, and the
*ideal* update is ΔW̄ = Σ p_u B_u A_u. Every function checks its inputs with one validator (:func:`_validate`)
and raises ``ValueError`` naming the problem, the client index and the shapes. Results keep the inputs' dtype
and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fedlora.functional_checks import Weights, _as_list, _check_tensor, _Layer, _validate, normalize_weights

__all__ = ["SPLITS", "fedex", "fedex_residual_factors", "fedit", "fedit_error", "flora_na", "flora_na_coefficients",
           "flora_na_paper", "flora_stack", "ideal_update", "normalize_weights", "relative_error", "residual_factors", "weighted_mean"]

SPLITS = ("balanced", "fedit-scale")

# flora_na's fast path orthonormalises Bc and Acᵀ with Cholesky-QR (two small Gram products, a few ms per
# 4096×160 layer) instead of Householder QR (~15 ms). Cholesky-QR's Q is orthonormal only up to
# δ ≈ eps·κ(R)². The product then differs from the exact truncated SVD by O(δ) (relative, for a clear gap
# σ_r > σ_{r+1}) and its error exceeds the optimum by only O(δ²), because the optimum is stationary. It is
# accepted while eps·κ² ≤ 1e-8 (κ ≤ 6.7e3 in float64, for the column-equilibrated factor), which keeps
# products within ~1e-8 of the exact answer. Otherwise (rank-deficient or ill-conditioned factors: identical
# clients, zero-initialised B, N·r > d) the Householder path runs, which is backward stable whatever the rank.
# (κ comes from the eigenvalues of the equilibrated n×n Gram matrix: the bound ‖G'‖_F·‖R'⁻¹‖_F² costs less
# but over-estimates κ² some 100× on 160 columns and sent clients that differ by 0.5% to the slow path.)
_CHOLQR_MAX_DISTORTION = 1e-8

# flora_na computes in float64 whatever the input dtype, decided by benchmarks/aggregation.py (64 layers of
# 4096×4096, r=16, 10 float32 clients, 2 threads): float64 inside took 1.6 s with an excess over the rank-r
# optimum of 1e-13. Float32 inside is safe only with Householder QR (Cholesky-QR in float32 would need κ ≤ 9
# under the guard above), which took 2.6 s; unguarded float32 Cholesky-QR took 0.66 s. Both float32 variants
# meet the 1e-4 target while clients differ a lot (drift 50% of the shared part: excess 2e-10), but not when
# they are close, as after a few rounds from a common broadcast: at 0.5% drift their error is 1.02× the
# optimum, worse than FedIT's 1.016×, and at 0.05% it is 18.9× (FedIT 1.4×), while float64 inside gives
# 1.00001× and 1.1× (the float32 rounding of the returned factors). The casts cost one copy of a layer's
# factors (the working set is ~2.5× one layer's uploads); the d×rank outputs are cast back to the input dtype.
_COMPUTE_DTYPE = torch.float64


def _weighted_sum(tensors: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    out = tensors[0] * coefficients[0]
    for t, c in zip(tensors[1:], coefficients[1:]):
        out.add_(t, alpha=c)
    return out


def _concat(layer: _Layer, dtype: torch.dtype, weight_on: str, skip_zero: bool = False) -> tuple[Tensor, Tensor]:
    """Bc = [B_1, …] (d×Σr) and Ac = [A_1; …] (Σr×k) in ``dtype``, with p_u folded into the B or the A side."""
    keep = [u for u, pu in enumerate(layer.p) if pu > 0 or not skip_zero]
    cols = [0]
    for u in keep:
        cols.append(cols[-1] + layer.ranks[u])
    Bc = layer.ref.new_empty((layer.d, cols[-1]), dtype=dtype)
    Ac = layer.ref.new_empty((cols[-1], layer.k), dtype=dtype)
    for u, lo, hi in zip(keep, cols, cols[1:]):  # copy_ (casting) then mul_ in ``dtype``: no temporaries
        Bc[:, lo:hi].copy_(layer.Bs[u])
        Ac[lo:hi].copy_(layer.As[u])
        (Bc[:, lo:hi] if weight_on == "B" else Ac[lo:hi]).mul_(layer.p[u])
    return Bc, Ac


def _fedit_means(layer: _Layer) -> tuple[Tensor, Tensor]:
    """FedIT's (B̄, Ā); heterogeneous ranks are zero-padded to the largest (that leaves each B_u·A_u unchanged)."""
    r = max(layer.ranks)
    if min(layer.ranks) == r:
        return _weighted_sum(layer.Bs, layer.p), _weighted_sum(layer.As, layer.p)
    Bs = [torch.nn.functional.pad(B, (0, r - B.shape[1])) for B in layer.Bs]
    As = [torch.nn.functional.pad(A, (0, 0, 0, r - A.shape[0])) for A in layer.As]
    return _weighted_sum(Bs, layer.p), _weighted_sum(As, layer.p)


def _norm(t: Tensor) -> float:
    """Frobenius norm accumulated in float64, without a float64 copy of ``t``."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


def _orthonormal_basis(X: Tensor, method: str = "auto") -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """X (m×n) = Q·R with orthonormal Q: returns R and M ↦ Q·M, without forming Q.

    ``method``: "auto" (Cholesky-QR when well conditioned, else Householder), "householder", or "cholesky"
    (Cholesky-QR whenever the factorisation succeeds, whatever the conditioning; for measurements only).
    """
    if method in ("auto", "cholesky"):
        G = X.mT @ X
        scale = G.diagonal().sqrt()  # equilibrate the columns first: κ of X·diag(1/‖x_j‖) is what matters
        if bool((scale > 0).all()):
            G = G / torch.outer(scale, scale)
            ok = method == "cholesky"
            if not ok:  # κ₂(R')² = κ(G') from the n×n eigenvalues: ~1 ms, next to ~3 ms for the Gram itself
                eigenvalues = torch.linalg.eigvalsh(G)
                lo, hi = float(eigenvalues[0]), float(eigenvalues[-1])
                ok = lo > 0 and torch.finfo(X.dtype).eps * hi / lo <= _CHOLQR_MAX_DISTORTION
            if ok:
                R, info = torch.linalg.cholesky_ex(G, upper=True)
                if int(info) == 0:
                    R = R * scale  # X·D⁻¹ = Q·R'  ⇒  X = Q·(R'·D)
                    return R, lambda M: X @ torch.linalg.solve_triangular(R, M, upper=True)
    a, tau = torch.geqrf(X)
    m = min(X.shape)

    def apply(M: Tensor) -> Tensor:  # Q (m×m, implicit in the reflectors) times M padded with zero rows
        padded = M.new_zeros((X.shape[0], M.shape[1]))
        padded[:m] = M
        return torch.ormqr(a, tau, padded)

    return a[:m].triu(), apply


def _low_rank_factors(Bc: Tensor, Ac: Tensor, rank: int, method: str = "auto") -> tuple[Tensor, Tensor]:
    """Balanced rank-``rank`` factors of the truncated SVD of Bc·Ac, in Bc's dtype, never forming Bc·Ac."""
    R_B, apply_B = _orthonormal_basis(Bc, method)
    R_A, apply_A = _orthonormal_basis(Ac.mT, method)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)  # at most Nr×Nr
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    B = Bc.new_zeros((Bc.shape[0], rank))  # components beyond Nr (or beyond d, k) stay zero
    A = Ac.new_zeros((rank, Ac.shape[1]))
    B[:, :r] = apply_B(U[:, :r] * root)
    A[:r] = apply_A(Vh[:r].mT * root).mT
    return B, A


# ------------------------------------------------------------------------------------------------ public API

def weighted_mean(tensors: Sequence[Tensor], weights: Weights) -> Tensor:
    """Σ p_u T_u for same-shape tensors (A-only, B-only, heads, VeRA vectors), in their dtype and device."""
    ts = _as_list(tensors, "tensors")
    p = normalize_weights(weights, len(ts))
    checked: list[Tensor] = []
    for u, t in enumerate(ts):
        checked.append(_check_tensor(t, f"tensor {u}", checked[0] if checked else None, None))
        if checked[u].shape != checked[0].shape:
            raise ValueError(f"tensor {u} has shape {tuple(checked[u].shape)} but tensor 0 has "
                             f"{tuple(checked[0].shape)}")
    return _weighted_sum(checked, p.tolist())


def ideal_update(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights) -> Tensor:
    """ΔW̄ = Σ p_u B_u A_u (d×k), as one product of the stacked factors. For tests and small layers."""
    layer = _validate(Bs, As, weights)
    Bc, Ac = _concat(layer, layer.ref.dtype, "B")
    return Bc @ Ac


def fedit(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights) -> tuple[Tensor, Tensor]:
    """FedIT: (B̄, Ā), the weighted means of each factor. Requires equal ranks."""
    layer = _validate(Bs, As, weights, equal_ranks_for="functional.fedit")
    return _weighted_sum(layer.Bs, layer.p), _weighted_sum(layer.As, layer.p)


def flora_na(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights, rank: int | None = None,
             split: str = "balanced") -> tuple[Tensor, Tensor]:
    """FLoRA-NA: B̂ (d×rank), Â (rank×k) with B̂Â the rank-``rank`` truncated SVD of ΔW̄ (Eckart–Young optimal).

    Computed from thin QRs of Bc = [p_1B_1, …] and Acᵀ = [A_1; …]ᵀ and the SVD of R_B R_Aᵀ (Nr×Nr); no d×k
    matrix is formed. ``rank`` defaults to the largest client rank; components beyond rank(ΔW̄) are zero.
    Clients with weight 0 contribute nothing and are skipped.

    ``split`` chooses how the product Q_B U_r Σ_r V_rᵀ Q_Aᵀ is shared between the factors (it never changes the
    product):

    - "balanced": B̂ = Q_B U_r Σ_r^½, Â = Σ_r^½ V_rᵀ Q_Aᵀ, so ‖B̂‖_F = ‖Â‖_F.
    - "fedit-scale": the balanced factors times one scalar, B̂·c and Â/c, with c chosen so that
      ‖B̂‖_F/‖Â‖_F = ‖B̄‖_F/‖Ā‖_F of FedIT's means (zero-padded for mixed ranks). One scalar rather than one per
      component because one ratio is all there is to match; each component keeps its balanced shape. When B̄ or
      Ā is zero (e.g. clients whose B's cancel) no positive c matches, and the balanced factors are returned.
      When ΔW̄ is exactly zero (e.g. round one of LoRA, B zero-initialised and untrained), the result is
      B̂ = 0, Â = Ā (truncated or zero-padded to ``rank``), LoRA's own initialisation convention, which
      keeps gradients flowing into B next round, where balanced zeros would freeze both factors.
    """
    layer = _validate(Bs, As, weights)
    rank = max(layer.ranks) if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(map(repr, SPLITS))}")
    Bc, Ac = _concat(layer, _COMPUTE_DTYPE, "B", skip_zero=True)
    B, A = _low_rank_factors(Bc, Ac, rank)
    if split == "fedit-scale":
        B_bar, A_bar = _fedit_means(layer)
        if not bool(B.any()) and not bool(A.any()):  # ΔW̄ == 0 exactly: B̂ = 0, Â = Ā
            A = A_bar.to(_COMPUTE_DTYPE)[:rank]
            A = torch.nn.functional.pad(A, (0, 0, 0, rank - A.shape[0]))
        else:
            b_bar, a_bar = _norm(B_bar), _norm(A_bar)
            c = math.sqrt(b_bar / a_bar * _norm(A) / _norm(B)) if a_bar > 0 else 0.0
            if 0 < c < math.inf:  # B̄ = 0 or Ā = 0: no positive c matches, keep the balanced split
                B, A = B * c, A / c
    dtype = layer.ref.dtype
    return B.to(dtype), A.to(dtype)


def flora_na_coefficients(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights, steps: int = 200,
                          lr: float = 1e-2, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """A per-layer coefficient estimator (``method.na_estimator = "layer-mix"``): B̂ = Σ β_u B_u, Â = Σ α_u A_u
    with 2N scalars fitted for this layer alone. It is *not* the FLoRA-NA authors' estimator (that is
    :func:`flora_na_paper`: scalars shared by all layers, anchored on the previous global factors, last iterate
    kept); it is what fedlora shipped before as ``"coefficients"``, kept for comparison.

    α, β start at FedIT's point (α = β = p) and AdamW (no weight decay: there is no reason to pull mixing
    coefficients towards zero) runs ``steps`` steps on ‖ΔW̄ − B̂Â‖_F² / ‖ΔW̄‖_F². With C = diag(p) − βαᵀ the
    residual is Σ_uv C_uv B_u A_v, so the loss is cᵀTc for c = vec(C) and the N²×N² matrix
    T[(u,v),(u',v')] = tr((B_uᵀB_u')(A_v'A_vᵀ)) built once from r×r Gram blocks: no d×k matrix is formed and
    each step costs O(N⁴). The best iterate is returned (FedIT's point included), so the error never exceeds
    FedIT's. Deterministic (float64 on the CPU). Requires equal ranks; ``rank`` may only be None or that rank.
    """
    layer = _validate(Bs, As, weights, equal_ranks_for="flora_na_coefficients")
    n, r = len(layer.Bs), layer.ranks[0]
    if rank is not None and rank != r:
        raise ValueError(f"flora_na_coefficients keeps the clients' rank {r}; got rank={rank!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    Bcat = torch.cat([B.to(_COMPUTE_DTYPE) for B in layer.Bs], dim=1)
    Acat = torch.cat([A.to(_COMPUTE_DTYPE) for A in layer.As], dim=0)
    GB = (Bcat.mT @ Bcat).reshape(n, r, n, r)  # GB[u,i,u',j] = (B_uᵀ B_u')_ij
    GA = (Acat @ Acat.mT).reshape(n, r, n, r)  # GA[v',j,v,i] = (A_v' A_vᵀ)_ji
    with torch.inference_mode(False), torch.enable_grad():
        T = torch.einsum("aibj,djci->acbd", GB, GA).reshape(n * n, n * n).cpu().clone()
        p = torch.tensor(layer.p, dtype=torch.float64)

        def loss(alpha: Tensor, beta: Tensor) -> Tensor:
            c = (torch.diag(p) - torch.outer(beta, alpha)).reshape(-1)
            return c @ (T @ c)

        scale = float(loss(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)))
        scale = scale if scale > 0 else 1.0  # ‖ΔW̄‖² normalises the loss; a zero ideal leaves it raw
        alpha, beta = p.clone().requires_grad_(), p.clone().requires_grad_()
        opt = torch.optim.AdamW([alpha, beta], lr=lr, weight_decay=0.0)
        best = (math.inf, p.tolist(), p.tolist())
        for step in range(steps + 1):
            value = loss(alpha, beta) / scale
            if value.item() < best[0]:
                best = (value.item(), alpha.detach().tolist(), beta.detach().tolist())
            if step == steps:
                break
            opt.zero_grad()
            value.backward()  # type: ignore[no-untyped-call]
            opt.step()
    _, a, b = best
    return _weighted_sum(layer.Bs, b), _weighted_sum(layer.As, a)


def flora_na_paper(layers: Sequence[tuple[Sequence[Tensor], Sequence[Tensor], Tensor, Tensor]], weights: Weights,
                   steps: int = 200, lr: float = 1e-2, weight_decay: float = 0.01) -> list[tuple[Tensor, Tensor]]:
    """The FLoRA-NA authors' estimator (their public aggregator, ``optimize_exact_uv``): 2N scalars shared by
    every layer, anchored on the previous global factors, last iterate kept.

    ``layers`` holds, per adapted layer, the clients' factors and the global factors the round started from:
    ``(Bs, As, B_g, A_g)``. With ΔB_u = B_u − B_g and ΔA_u = A_u − A_g, every layer's estimate is

        B̂ = B_g + Σ_u p_u V_u ΔB_u        Â = A_g + Σ_u p_u U_u ΔA_u

    with the same U, V ∈ R^N for all layers. U = V = 1 is FedIT's point. AdamW (``lr``, ``weight_decay`` 0.01:
    torch's default, which their code uses) runs ``steps`` steps on Σ_l ‖ΔW̄_l − B̂_l Â_l‖_F² / Σ_l ‖ΔW̄_l‖_F²
    and the last iterate is returned (it may be worse than FedIT's point). One deviation, for consistency with
    every other rule here: their code fits with uniform weights 1/N and then applies sample-size weights; here
    p_u (``method.weighting``) is used in both, which is their form exactly with ``weighting = "uniform"``.

    In the basis X = [B_g, ΔB_1, …], Y = [A_g; ΔA_1; …] the ideal update is Σ_jk C*_jk X_j Y_k and the estimate
    Σ_jk β_j α_k X_j Y_k (β = [1, p∘V], α = [1, p∘U]), so the loss is cᵀTc for c = vec(C* − βαᵀ) with
    T = Σ_l T_l built once from (N+1)r × (N+1)r Gram blocks, as in :func:`flora_na_coefficients`: no d×k
    matrix is formed. Deterministic (float64 on the CPU). Requires equal ranks. Returns (B̂, Â) per layer.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    items = _as_list(layers, "layers")
    if not items:
        raise ValueError("no layers: at least one (Bs, As, B_g, A_g) is needed")
    checked = []
    T: Tensor | None = None
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 4:
            raise ValueError(f"layer {i} must be (Bs, As, B_g, A_g)")
        Bs, As, B_g, A_g = item
        try:
            layer = _validate(Bs, As, weights, equal_ranks_for="flora_na_paper", estimate=(B_g, A_g))
        except ValueError as e:
            raise ValueError(f"layer {i}: {e}") from None
        if B_g.shape[1] != layer.ranks[0]:
            raise ValueError(f"layer {i}: the global factors have rank {B_g.shape[1]} but the clients' is "
                             f"{layer.ranks[0]}")
        n, r = len(layer.Bs), layer.ranks[0]
        Bg, Ag = B_g.to(_COMPUTE_DTYPE), A_g.to(_COMPUTE_DTYPE)
        X = torch.cat([Bg] + [B.to(_COMPUTE_DTYPE) - Bg for B in layer.Bs], dim=1)  # d × (N+1)r
        Y = torch.cat([Ag] + [A.to(_COMPUTE_DTYPE) - Ag for A in layer.As], dim=0)  # (N+1)r × k
        GB = (X.mT @ X).reshape(n + 1, r, n + 1, r)
        GA = (Y @ Y.mT).reshape(n + 1, r, n + 1, r)
        T_l = torch.einsum("aibj,djci->acbd", GB, GA).reshape((n + 1) ** 2, (n + 1) ** 2).cpu()
        T = T_l if T is None else T + T_l
        checked.append((layer, B_g, A_g))
    assert T is not None
    p = torch.tensor(checked[0][0].p, dtype=torch.float64)
    n = p.numel()
    ideal = torch.zeros(n + 1, n + 1, dtype=torch.float64)  # Σ_u p_u (X_0 + X_u)(Y_0 + Y_u)
    ideal[0, 0] = p.sum()
    ideal[0, 1:] = ideal[1:, 0] = p
    ideal[1:, 1:] = torch.diag(p)
    one = torch.ones(1, dtype=torch.float64)
    with torch.inference_mode(False), torch.enable_grad():
        T = T.clone()

        def loss(u: Tensor, v: Tensor) -> Tensor:
            c = (ideal - torch.outer(torch.cat([one, p * v]), torch.cat([one, p * u]))).reshape(-1)
            return c @ (T @ c)

        scale = float(ideal.reshape(-1) @ (T @ ideal.reshape(-1)))
        scale = scale if scale > 0 else 1.0  # Σ‖ΔW̄_l‖² normalises the loss; a zero ideal leaves it raw
        U = torch.ones(n, dtype=torch.float64, requires_grad=True)
        V = torch.ones(n, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.AdamW([U, V], lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            opt.zero_grad()
            (loss(U, V) / scale).backward()  # type: ignore[no-untyped-call]
            opt.step()
    a, b = (p * U.detach()).tolist(), (p * V.detach()).tolist()
    out = []
    for layer, B_g, A_g in checked:
        B = B_g.to(_COMPUTE_DTYPE).clone()
        A = A_g.to(_COMPUTE_DTYPE).clone()
        for u in range(n):
            B.add_(layer.Bs[u].to(_COMPUTE_DTYPE) - B_g.to(_COMPUTE_DTYPE), alpha=b[u])
            A.add_(layer.As[u].to(_COMPUTE_DTYPE) - A_g.to(_COMPUTE_DTYPE), alpha=a[u])
        out.append((B.to(layer.ref.dtype), A.to(layer.ref.dtype)))
    return out


def residual_factors(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights, B: Tensor,
                     A: Tensor) -> tuple[Tensor, Tensor]:
    """(P, Q) with P·Q = ΔW̄ − B·A: P = [p_1B_1, …, p_NB_N, −B] (d×(Σr_u+r)), Q = [A_1; …; A_N; A].

    The factored form of FedEx-LoRA's residual, for byte accounting and for products without a d×k matrix.
    """
    layer = _validate(Bs, As, weights, estimate=(B, A))
    return _residual_factors(layer, B, A, layer.ref.dtype)


def _residual_factors(layer: _Layer, B: Tensor, A: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    Bc, Ac = _concat(layer, dtype, "B")
    return torch.cat([Bc, -B.to(dtype)], dim=1), torch.cat([Ac, A.to(dtype)], dim=0)


def fedex_residual_factors(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FedEx-LoRA at its true rank: (B̄, Ā, P, Q) with P·Q = ΔW̄ − B̄Ā and P of at most (N−1)·r columns.

    The residual is FedIT's error Σ_u p_u (B_u − B̄)(A_u − Ā). Because Σ_u p_u (B_u − B̄) = 0, the block of
    one client m (the largest weight; ties: the first) is minus the sum of the others, which folds it into
    them: Σ_{u≠m} p_u (B_u − B̄)(A_u − A_m). So P = [p_u (B_u − B̄)]_{u≠m} (d×(N−1)r) and
    Q = [A_u − A_m]_{u≠m} ((N−1)r×k), half the (N+1)·r columns of the stacked form [p_uB_u, −B̄]·[A_u; Ā] for
    3 clients. With one client (or only one of positive weight) the residual is zero and P, Q have no columns.
    Clients of weight 0 contribute nothing and are skipped. Requires equal ranks.
    """
    layer = _validate(Bs, As, weights, equal_ranks_for="functional.fedex")
    B_bar, A_bar = _weighted_sum(layer.Bs, layer.p), _weighted_sum(layer.As, layer.p)
    live = [u for u, pu in enumerate(layer.p) if pu > 0]
    m = max(live, key=lambda u: layer.p[u])  # the first of the largest weights (max keeps the first)
    others = [u for u in live if u != m]
    r = layer.ranks[0]
    P = layer.ref.new_empty((layer.d, r * len(others)))
    Q = layer.ref.new_empty((r * len(others), layer.k))
    for i, u in enumerate(others):
        torch.sub(layer.Bs[u], B_bar, out=P[:, i * r:(i + 1) * r]).mul_(layer.p[u])
        torch.sub(layer.As[u], layer.As[m], out=Q[i * r:(i + 1) * r])
    return B_bar, A_bar, P, Q


def fedex(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights) -> tuple[Tensor, Tensor, Tensor]:
    """FedEx-LoRA: (B̄, Ā, residual) with residual = ΔW̄ − B̄Ā (d×k), so that B̄Ā + residual = ΔW̄ exactly.

    The residual is the product P·Q of :func:`fedex_residual_factors` (rank ≤ (N−1)·r) rather than a
    difference of two d×k products. It is in (d, k) = (out, in) orientation; the caller folds s·residual into
    W0 in the base weight's own orientation.
    """
    B_bar, A_bar, P, Q = fedex_residual_factors(Bs, As, weights)
    return B_bar, A_bar, P @ Q


def flora_stack(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights) -> tuple[Tensor, Tensor]:
    """FLoRA stacking: B = [B_1, …, B_N] (d×Σr_u), A = [p_1A_1; …; p_NA_N] (Σr_u×k); B·A = ΔW̄. Ranks may differ."""
    layer = _validate(Bs, As, weights)
    return _concat(layer, layer.ref.dtype, "A")


def fedit_error(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights) -> Tensor:
    """FedIT's error ΔW̄ − B̄Ā written as Σ p_u (B_u − B̄)(A_u − Ā) (d×k, rank ≤ (N−1)r). For tests."""
    layer = _validate(Bs, As, weights, equal_ranks_for="fedit_error")
    B_bar, A_bar = _weighted_sum(layer.Bs, layer.p), _weighted_sum(layer.As, layer.p)
    P = torch.cat([(B - B_bar) * pu for B, pu in zip(layer.Bs, layer.p)], dim=1)
    return P @ torch.cat([A - A_bar for A in layer.As], dim=0)


def _product_norm(P: Tensor, Q: Tensor) -> float:
    """‖P·Q‖_F = ‖R_P R_Qᵀ‖_F from Householder R factors (backward stable, unlike expanding ‖PQ‖² in traces of
    Gram matrices, which cancels catastrophically when the product is small next to its factors)."""
    R_P = torch.linalg.qr(P, mode="r").R
    R_Q = torch.linalg.qr(Q.mT, mode="r").R
    return float(torch.linalg.matrix_norm(R_P @ R_Q.mT))


def relative_error(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights, B: Tensor, A: Tensor) -> float:
    """‖ΔW̄ − B·A‖_F / ‖ΔW̄‖_F, in float64 and without forming a d×k matrix.

    0.0 when ΔW̄ and B·A are both zero; ``math.inf`` when ΔW̄ is zero but B·A is not.
    """
    layer = _validate(Bs, As, weights, estimate=(B, A))
    error = _product_norm(*_residual_factors(layer, B, A, torch.float64))
    ideal = _product_norm(*_concat(layer, torch.float64, "B"))
    if ideal == 0:
        return 0.0 if error == 0 else math.inf
    return error / ideal
