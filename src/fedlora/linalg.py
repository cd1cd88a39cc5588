"""Linear algebra on factored matrices (P·Q with P d×c, Q c×k, c small) that never forms the d×k product: the
machinery under :mod:`fedlora.functional`'s rules. Private to fedlora (names start with an underscore); the rules
are the API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fedlora.functional_checks import _Layer

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


def _low_rank_factors(Bc: Tensor, Ac: Tensor, rank: int, method: str = "auto",
                      weight_on: str = "both") -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors (B, A) of the truncated SVD U_r Σ_r V_rᵀ of Bc·Ac, in Bc's dtype, never forming Bc·Ac,
    components in decreasing order of σ (so B[:, :q]·A[:q] is the rank-q optimum for every q ≤ rank).
    ``weight_on``: "both" (balanced, B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ) or "B" (B = U_r Σ_r, A = V_rᵀ, orthonormal rows)."""
    R_B, apply_B = _orthonormal_basis(Bc, method)
    R_A, apply_A = _orthonormal_basis(Ac.mT, method)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)  # at most Nr×Nr
    r = min(rank, S.numel())
    left, right = (S[:r].sqrt(), S[:r].sqrt()) if weight_on == "both" else (S[:r], torch.ones_like(S[:r]))
    B = Bc.new_zeros((Bc.shape[0], rank))  # components beyond Nr (or beyond d, k) stay zero
    A = Ac.new_zeros((rank, Ac.shape[1]))
    B[:, :r] = apply_B(U[:, :r] * left)
    A[:r] = apply_A(Vh[:r].mT * right).mT
    return B, A


def _mean_row_norm(A: Tensor) -> float:
    """The mean over rows of ‖A[i]‖₂, accumulated in float64 (A r×k: each row is one component of an adapter)."""
    return float(torch.linalg.vector_norm(A, dim=1, dtype=torch.float64).mean())


def _rows_scaled(B: Tensor, A: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    """(B/ρ, ρ·A): the same product B·A, with A's rows ρ times as long (ρ > 0). A new pair; the inputs are kept."""
    if not rho > 0 or rho == float("inf"):
        raise ValueError(f"rho must be positive and finite, got {rho!r}")
    return B / rho, A * rho


def _orthonormal_refactor(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """(B', A') with B'·A' = B·A, A' (r×k) with orthonormal rows (the right singular vectors of B·A, completed
    within A's row space where B·A has rank < r) and B' = U·Σ, from r×r matrices only (B d×r, A r×k, r ≤ k)."""
    R_B, apply_B = _orthonormal_basis(B, "householder")  # Householder: Q orthonormal even when B is rank-deficient
    R_A, apply_A = _orthonormal_basis(A.mT, "householder")
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT)  # r×r, full: all r right singular vectors, zero σ included
    return apply_B(U * S), apply_A(Vh.mT).mT


def _product_norm(P: Tensor, Q: Tensor) -> float:
    """‖P·Q‖_F = ‖R_P R_Qᵀ‖_F from Householder R factors (backward stable, unlike expanding ‖PQ‖² in traces of
    Gram matrices, which cancels catastrophically when the product is small next to its factors)."""
    R_P = torch.linalg.qr(P, mode="r").R
    R_Q = torch.linalg.qr(Q.mT, mode="r").R
    return float(torch.linalg.matrix_norm(R_P @ R_Q.mT))
