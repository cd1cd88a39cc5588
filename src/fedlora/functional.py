"""Per-layer aggregation maths for LoRA factors: pure functions over tensors, no I/O, no state (DESIGN.md).

Client u uploads B_u (d×r_u) and A_u (r_u×k); its update is B_u·A_u. Weights are normalised to p_u, and the
*ideal* update is ΔW̄ = Σ p_u B_u A_u. Every function checks its inputs with one validator (:func:`_validate`)
and raises ``ValueError`` naming the problem, the client index and the shapes. Results keep the inputs' dtype
and device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.functional_align import ALIGN_SIDES, core_factors, fed_sb, fedrot, fedrot_align, procrustes_rotation
from fedlora.functional_checks import Weights, _as_list, _check_tensor, _Layer, _validate, normalize_weights
from fedlora.linalg import (_COMPUTE_DTYPE, _concat, _fedit_means, _low_rank_factors, _mean_row_norm, _norm,
                            _orthonormal_refactor, _product_norm, _rows_scaled, _weighted_sum)

__all__ = ["ALIGN_SIDES", "SPLITS", "core_factors", "fed_sb", "fedrot", "fedrot_align", "procrustes_rotation", "fedex", "fedex_residual_factors", "fedit", "fedit_error", "fedsvd", "flexlora", "flora_na",
           "flora_na_coefficients", "flora_na_paper", "flora_stack", "lora_fair", "ideal_update", "normalize_weights", "relative_error", "residual_factors", "weighted_mean"]

SPLITS = ("balanced", "fedit-scale", "orthonormal-a", "a-row-norm")

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
    - "orthonormal-a": Â = V_rᵀ Q_Aᵀ with orthonormal rows, B̂ = Q_B U_r Σ_r (FlexLoRA's split): A keeps unit row
      norms however small the update, so ∂L/∂B = s·(∂L/∂ΔW)·Âᵀ does not shrink with σ (under "balanced" it scales
      as √σ, and so does ∂L/∂A ∝ B̂; benchmarks/na_split.py measures it).
    - "a-row-norm": the orthonormal-a factors with every row of Â scaled to ρ and every column of B̂ by 1/ρ, where
      ρ = Σ p_u · (mean row norm of A_u) is the scale of the uploaded A's; A stays at the clients' own scale (for
      LoRA's Kaiming-uniform initialisation of an r×k A, ρ ≈ 1/√3 at the start). All A_u zero: orthonormal-a.
    """
    layer = _validate(Bs, As, weights)
    rank = max(layer.ranks) if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(map(repr, SPLITS))}")
    Bc, Ac = _concat(layer, _COMPUTE_DTYPE, "B", skip_zero=True)
    B, A = _low_rank_factors(Bc, Ac, rank, weight_on="B" if split in ("orthonormal-a", "a-row-norm") else "both")
    if split == "a-row-norm":
        rho = sum(pu * _mean_row_norm(A_u) for pu, A_u in zip(layer.p, layer.As))
        if rho > 0:
            B, A = _rows_scaled(B, A, rho)
    elif split == "fedit-scale":
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


def flexlora(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights, rank: int | None = None
             ) -> tuple[Tensor, Tensor]:
    """FlexLoRA (Bai et al. 2024): B = U_r Σ_r (d×rank), A = V_rᵀ (rank×k, orthonormal rows) from the truncated SVD
    of ΔW̄ = Σ p_u B_u A_u, computed as :func:`flora_na` does (no d×k matrix). Components come in decreasing order of
    σ, so ``B[:, :q], A[:q]`` is the rank-q optimum: a client of rank q receives that truncation. Ranks may differ;
    a client whose scaling differs from the others' must have its B rescaled by the caller (s_u / s) first."""
    layer = _validate(Bs, As, weights)
    rank = max(layer.ranks) if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    Bc, Ac = _concat(layer, _COMPUTE_DTYPE, "B", skip_zero=True)
    B, A = _low_rank_factors(Bc, Ac, rank, weight_on="B")
    return B.to(layer.ref.dtype), A.to(layer.ref.dtype)


def fedsvd(Bs: Sequence[Tensor], A: Tensor, weights: Weights) -> tuple[Tensor, Tensor]:
    """FedSVD (Lee et al. 2025): every client trained B_u on the same frozen A; B̄ = Σ p_u B_u, and B̄·A (exactly
    Σ p_u B_u A, rank ≤ r) is re-factorised by SVD as U Σ Vᵀ: returns (B' = U Σ, A' = Vᵀ), A' with orthonormal
    rows (all r of them: where B̄A has rank < r the missing directions are completed inside A's row space, so that
    no row of A' is zero and every direction keeps receiving gradient). B'·A' = B̄·A up to rounding; no d×k matrix
    is formed. Computed in float64, returned in the inputs' dtype."""
    layer = _validate(Bs, [A] * len(_as_list(Bs, "Bs")), weights, equal_ranks_for="fedsvd")
    B_bar = _weighted_sum([b.to(_COMPUTE_DTYPE) for b in layer.Bs], layer.p)
    B_new, A_new = _orthonormal_refactor(B_bar, layer.As[0].to(_COMPUTE_DTYPE))
    return B_new.to(layer.ref.dtype), A_new.to(layer.ref.dtype)


def lora_fair(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights, lam: float = 0.01
              ) -> tuple[Tensor, Tensor]:
    """LoRA-FAIR (Bian et al. 2025): (B̄ + ΔB, Ā), the FedIT means with B̄ refined by the correction

        ΔB = argmin ‖(B̄ + ΔB)Ā − ΔW̄‖_F² + λ'‖ΔB‖_F²  =  (ΔW̄Āᵀ − B̄G)(G + λ'I)⁻¹,   G = ĀĀᵀ (r×r),

    with λ' = ``lam``·tr(G)/r (the ridge weight relative to the mean eigenvalue of G, so that ``lam`` does not depend
    on the scale of A). ΔW̄Āᵀ = Σ p_u B_u (A_u Āᵀ) needs only r×r products: no d×k matrix. ``lam`` = 0 gives the
    least-squares B for Ā (the smallest error any B reaches with Ā); a larger ``lam`` keeps B near B̄, i.e. keeps
    the next round's starting point close to FedIT's average. The paper states the objective with a generic
    similarity S and solves it by gradient descent on the server; this is the closed form for S = the squared
    Frobenius distance (fedlora's reading, said in the README). Equal ranks are required."""
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    layer = _validate(Bs, As, weights, equal_ranks_for="lora_fair")
    Bs64 = [b.to(_COMPUTE_DTYPE) for b in layer.Bs]
    As64 = [a.to(_COMPUTE_DTYPE) for a in layer.As]
    B_bar, A_bar = _weighted_sum(Bs64, layer.p), _weighted_sum(As64, layer.p)
    G = A_bar @ A_bar.mT
    target = _weighted_sum([b @ (a @ A_bar.mT) for b, a in zip(Bs64, As64)], layer.p)  # ΔW̄Āᵀ (d×r)
    r = G.shape[0]
    ridge = lam * float(G.diagonal().sum()) / r
    lhs = G + ridge * torch.eye(r, dtype=G.dtype, device=G.device)
    # ΔB·lhs = target − B̄G; lstsq (not solve) so that a singular G with lam = 0 gives the minimum-norm ΔB
    rhs = target - B_bar @ G
    delta = torch.linalg.lstsq(lhs.mT, rhs.mT).solution.mT if ridge == 0 else torch.linalg.solve(lhs, rhs.mT).mT
    return (B_bar + delta).to(layer.ref.dtype), A_bar.to(layer.ref.dtype)


def fedit_error(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights) -> Tensor:
    """FedIT's error ΔW̄ − B̄Ā written as Σ p_u (B_u − B̄)(A_u − Ā) (d×k, rank ≤ (N−1)r). For tests."""
    layer = _validate(Bs, As, weights, equal_ranks_for="fedit_error")
    B_bar, A_bar = _weighted_sum(layer.Bs, layer.p), _weighted_sum(layer.As, layer.p)
    P = torch.cat([(B - B_bar) * pu for B, pu in zip(layer.Bs, layer.p)], dim=1)
    return P @ torch.cat([A - A_bar for A in layer.As], dim=0)


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
