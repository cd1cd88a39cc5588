"""Per-layer maths of FedRot-LoRA (rotational alignment before averaging) and Fed-SB (averaging LoRA-SB's r×r core):
pure functions over tensors, re-exported by :mod:`fedlora.functional` (the API; import them from there).

FedRot-LoRA. A client's factors are defined only up to an r×r orthogonal R: (B_u R)(Rᵀ A_u) = B_u A_u. Clients that
learned the same update in different latent frames average destructively (FedIT's error Σ p_u (B_u − B̄)(A_u − Ā)
grows with the frame mismatch). Before averaging, each client's factors are turned into the frame of a reference
(the global factors the round started from) by orthogonal Procrustes on one side:

    side "A":  R_u = argmin_{RᵀR = I} ‖Rᵀ A_u − A_ref‖_F = U Vᵀ   with  A_u A_refᵀ = U Σ Vᵀ   (r×r)
    side "B":  R_u = argmin_{RᵀR = I} ‖B_u R − B_ref‖_F = U Vᵀ    with  B_uᵀ B_ref = U Σ Vᵀ   (r×r)

and (B_u, A_u) ← (B_u R_u, R_uᵀ A_u), which leaves every B_u A_u unchanged. Only r×r products are formed: the cost
is O((d + k) r²) per client and layer, no d×k matrix.

Fed-SB. With LoRA-SB's ΔW = s·B·(R − I)·A and B, A the same on every client, Σ p_u B (R_u − I) A = B (R̄ − I) A for
R̄ = Σ p_u R_u: the weighted mean of the cores is the exact aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.functional_checks import Weights, _as_list, _check_tensor, _validate, normalize_weights
from fedlora.linalg import _COMPUTE_DTYPE, _weighted_sum

ALIGN_SIDES = ("A", "B")

__all__ = ["ALIGN_SIDES", "core_factors", "fed_sb", "fedrot", "fedrot_align", "procrustes_rotation"]


def procrustes_rotation(X: Tensor, ref: Tensor, side: str, lam: float = 1.0) -> Tensor:
    """The r×r orthogonal R that turns one client's factor into the frame of ``ref`` (float64).

    ``side = "A"``: X and ``ref`` are r×k A factors and R minimises ‖RᵀX − ref‖_F; ``side = "B"``: they are d×r B
    factors and R minimises ‖XR − ref‖_F. Either way R = UVᵀ from the SVD UΣVᵀ of the r×r cross-product (X·refᵀ or
    Xᵀ·ref). When the cross-product is zero (a zero reference: LoRA's B before any round) no frame is preferred and
    R = I. ``lam`` in (0, 1] is the alignment strength of the authors' soft variant: R is then the orthogonal
    polar factor of (1 − lam)·I + lam·R', with R' the best *rotation* (det +1: a reflection cannot be partly
    applied); ``lam = 1`` is the full Procrustes solution over all orthogonal matrices.
    """
    if side not in ALIGN_SIDES:
        raise ValueError(f"unknown side {side!r}; expected one of {', '.join(map(repr, ALIGN_SIDES))}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
        raise ValueError(f"lam must be a number in (0, 1], got {lam!r}")
    X = _check_tensor(X, "X", None, 2)
    ref = _check_tensor(ref, "ref", X, 2)
    if X.shape != ref.shape:
        raise ValueError(f"X is {tuple(X.shape)} but ref is {tuple(ref.shape)}; they must have the same shape")
    x, y = X.to(_COMPUTE_DTYPE), ref.to(_COMPUTE_DTYPE)
    M = x @ y.mT if side == "A" else x.mT @ y  # r×r
    r = M.shape[0]
    eye = torch.eye(r, dtype=M.dtype, device=M.device)
    if not bool(M.any()):
        return eye
    U, _, Vh = torch.linalg.svd(M)
    if lam == 1:
        full: Tensor = U @ Vh
        return full
    if float(torch.linalg.det(U @ Vh)) < 0:  # the best proper rotation: flip the weakest singular direction
        Vh = Vh.clone()
        Vh[-1] = -Vh[-1]
    soft = (1 - lam) * eye + lam * (U @ Vh)
    Us, _, Vhs = torch.linalg.svd(soft)  # the nearest orthogonal matrix (polar factor)
    polar: Tensor = Us @ Vhs
    return polar


def fedrot_align(Bs: Sequence[Tensor], As: Sequence[Tensor], B_ref: Tensor, A_ref: Tensor, side: str,
                 lam: float = 1.0) -> tuple[list[Tensor], list[Tensor]]:
    """Every client's (B_u R_u, R_uᵀ A_u) with R_u = :func:`procrustes_rotation` of its ``side`` against the
    reference factors (B_ref d×r, A_ref r×k): each B_u A_u is unchanged (up to rounding). In the inputs' dtype;
    the rotations are computed in float64. Requires equal ranks (the reference's)."""
    layer = _validate(Bs, As, [1.0] * len(_as_list(Bs, "Bs")), equal_ranks_for="fedrot_align",
                      estimate=(B_ref, A_ref))
    if B_ref.shape[1] != layer.ranks[0]:
        raise ValueError(f"the reference has rank {B_ref.shape[1]} but the clients' is {layer.ranks[0]}")
    out_B, out_A = [], []
    for B, A in zip(layer.Bs, layer.As):
        R = procrustes_rotation(A, A_ref, side, lam) if side == "A" else procrustes_rotation(B, B_ref, side, lam)
        out_B.append((B.to(_COMPUTE_DTYPE) @ R).to(B.dtype))
        out_A.append((R.mT @ A.to(_COMPUTE_DTYPE)).to(A.dtype))
    return out_B, out_A


def fedrot(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights, B_ref: Tensor, A_ref: Tensor,
           side: str | None, lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """FedRot-LoRA: (B̄, Ā), the weighted means of the clients' factors after :func:`fedrot_align` on ``side``
    (``None``: no alignment, FedIT's means). Requires equal ranks."""
    if side is not None:
        Bs, As = fedrot_align(Bs, As, B_ref, A_ref, side, lam)
    layer = _validate(Bs, As, weights, equal_ranks_for="fedrot")
    return _weighted_sum(layer.Bs, layer.p), _weighted_sum(layer.As, layer.p)


def fed_sb(Rs: Sequence[Tensor], weights: Weights) -> Tensor:
    """Fed-SB: R̄ = Σ p_u R_u, the weighted mean of the clients' r×r cores (exact: B(R̄ − I)A = Σ p_u B(R_u − I)A
    when every client has the same B and A). In the inputs' dtype."""
    cores = _as_list(Rs, "Rs")
    p = normalize_weights(weights, len(cores))
    checked: list[Tensor] = []
    for u, R in enumerate(cores):
        checked.append(_check_tensor(R, f"core {u}", checked[0] if checked else None, 2))
        if checked[u].shape[0] != checked[u].shape[1] or checked[u].shape != checked[0].shape:
            raise ValueError(f"core {u} is {tuple(checked[u].shape)}; every core must be the same r×r matrix shape")
    return _weighted_sum(checked, p.tolist())


def core_factors(B: Tensor, R: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """LoRA factors (B, (R − I)·A) of LoRA-SB's update B·(R − I)·A (d×r, r×k): the plain LoRA adapter with the same
    ΔW (for error measurements and export), without a d×k matrix."""
    B = _check_tensor(B, "B", None, 2)
    R = _check_tensor(R, "R", B, 2)
    A = _check_tensor(A, "A", B, 2)
    r = B.shape[1]
    if R.shape != (r, r) or A.shape[0] != r:
        raise ValueError(f"B is {tuple(B.shape)}, R {tuple(R.shape)} and A {tuple(A.shape)}: need d×r, r×r, r×k")
    return B, (R - torch.eye(r, dtype=R.dtype, device=R.device)) @ A
