"""Input checks and the normalised view of one layer's uploads, shared by every rule in :mod:`fedlora.functional`.

Every rule validates its inputs here once (:func:`_validate`) and raises ``ValueError`` naming the problem, the
client index and the shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Weights = Sequence[float] | Tensor


# ---------------------------------------------------------------------------------------------- validation

def normalize_weights(weights: Weights, n: int) -> Tensor:
    """Non-negative, finite weights (a sequence of numbers or a 1-D tensor) → float64 probabilities summing to 1."""
    if n < 1:
        raise ValueError("no clients: at least one update is needed")
    if isinstance(weights, Tensor):
        if weights.ndim != 1:
            raise ValueError(f"weights must be a 1-D tensor, got shape {tuple(weights.shape)}")
        w = weights.detach().to(torch.float64)
    else:
        try:
            w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"weights must be a sequence of numbers or a 1-D tensor: {err}") from None
    if w.numel() != n:
        raise ValueError(f"length mismatch: {w.numel()} weights for {n} clients")
    for u, x in enumerate(w.tolist()):
        if not math.isfinite(x):
            raise ValueError(f"weight of client {u} is not finite ({x})")
        if x < 0:
            raise ValueError(f"weight of client {u} is negative ({x})")
    total = w.sum()
    if total == 0:
        raise ValueError(f"weights sum to zero ({w.tolist()}); at least one client needs a positive weight")
    if not torch.isfinite(total):
        raise ValueError("weights sum to infinity; rescale them")
    return w / total


def _dims(t: Tensor) -> str:
    return "×".join(map(str, t.shape)) if t.ndim else "a scalar"


def _check_tensor(t: object, label: str, ref: Tensor | None, ndim: int | None) -> Tensor:
    """Type, dimension, dtype, device and finiteness of one tensor; ``ref`` is the tensor it must resemble."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{label} must be a {ndim}-D matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{label} must be a floating-point tensor, got {t.dtype}")
    if ref is not None and (t.dtype != ref.dtype or t.device != ref.device):
        raise ValueError(f"{label} is {t.dtype} on {t.device} but the first tensor is {ref.dtype} on {ref.device}")
    # A finite sum proves every entry finite and is ~30× cheaper than isfinite().all() on the CPU; only a
    # non-finite sum (an inf or nan entry, or an overflowing sum of huge ones) needs the exact test.
    if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{label} has non-finite values")
    return t


def _as_list(xs: object, name: str) -> list[object]:
    if isinstance(xs, Tensor) or not isinstance(xs, Sequence):
        raise ValueError(f"{name} must be a sequence (list or tuple) of tensors, got {type(xs).__name__}")
    return list(xs)


@dataclass(frozen=True)
class _Layer:
    """One validated layer: the clients' factors and their normalised weights (Python floats, float64)."""

    Bs: tuple[Tensor, ...]
    As: tuple[Tensor, ...]
    p: tuple[float, ...]
    d: int
    k: int

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(B.shape[1] for B in self.Bs)

    @property
    def ref(self) -> Tensor:
        return self.Bs[0]


def _check_pair(b: object, a: object, label: str, ref: Tensor | None) -> tuple[Tensor, Tensor]:
    B = _check_tensor(b, f"{label}: B", ref, 2)
    A = _check_tensor(a, f"{label}: A", ref if ref is not None else B, 2)
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"{label}: B is {_dims(B)} but A is {_dims(A)}; B's columns must equal A's rows")
    if 0 in (*B.shape, A.shape[1]):
        raise ValueError(f"{label}: empty factors (B is {_dims(B)}, A is {_dims(A)})")
    return B, A


def _validate(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Weights, *, equal_ranks_for: str | None = None,
              estimate: tuple[Tensor, Tensor] | None = None) -> _Layer:
    """The one validator: clients' factors, weights, (optionally) equal ranks and an estimate (B, A) of the layer."""
    bs, as_ = _as_list(Bs, "Bs"), _as_list(As, "As")
    if not bs and not as_:
        raise ValueError("no client updates: Bs and As are empty")
    if len(bs) != len(as_):
        raise ValueError(f"length mismatch: {len(bs)} B factors but {len(as_)} A factors")
    p = normalize_weights(weights, len(bs))
    pairs = [_check_pair(bs[0], as_[0], "client 0", None)]
    d, k = pairs[0][0].shape[0], pairs[0][1].shape[1]
    for u in range(1, len(bs)):
        B, A = _check_pair(bs[u], as_[u], f"client {u}", pairs[0][0])
        if B.shape[0] != d or A.shape[1] != k:
            raise ValueError(f"client {u}: update is {B.shape[0]}×{A.shape[1]} (B {_dims(B)}, A {_dims(A)}) but "
                             f"client 0's is {d}×{k}; every client must adapt the same layer")
        pairs.append((B, A))
    layer = _Layer(tuple(B for B, _ in pairs), tuple(A for _, A in pairs), tuple(p.tolist()), d, k)
    if equal_ranks_for is not None and len(set(layer.ranks)) > 1:
        raise ValueError(f"{equal_ranks_for} needs equal ranks, got ranks {list(layer.ranks)}; "
                         "use flora_stack or flora_na for heterogeneous ranks")
    if estimate is not None:
        B, A = _check_pair(estimate[0], estimate[1], "estimate", layer.ref)
        if B.shape[0] != d or A.shape[1] != k:
            raise ValueError(f"estimate: B·A is {B.shape[0]}×{A.shape[1]} (B {_dims(B)}, A {_dims(A)}) but the "
                             f"clients' layer is {d}×{k}")
    return layer


# ------------------------------------------------------------------------------------------------- helpers
