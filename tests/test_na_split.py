"""FLoRA-NA's splits of the optimal product B̂Â (functional.flora_na, ``split=``): every split gives the same
product, the rank-r truncated SVD of Σ p_u B_u A_u computed here with numpy in float64, and each split puts the
scale where it says (issue 27)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora import functional as F
from fedlora.config import load
from fedlora.errors import ConfigError

WEIGHTS = [1.0, 2.0, 3.0]


def clients(seed: int, d: int = 20, k: int = 30, r: int = 4, a_scale: float = 0.3
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rng = np.random.default_rng(seed)
    Bs = [torch.from_numpy(rng.standard_normal((d, r))) for _ in WEIGHTS]
    As = [torch.from_numpy(a_scale * rng.standard_normal((r, k))) for _ in WEIGHTS]
    return Bs, As


def numpy_optimum(Bs: list[torch.Tensor], As: list[torch.Tensor], r: int) -> np.ndarray:
    """The rank-r truncated SVD of the dense ideal update, summed client by client in numpy float64."""
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    M = sum(pu * (B.numpy() @ A.numpy()) for pu, B, A in zip(p, Bs, As))
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return np.asarray((U[:, :r] * S[:r]) @ Vt[:r])


@pytest.mark.parametrize("split", F.SPLITS)
def test_every_split_gives_the_rank_r_optimum(split: str) -> None:
    # Prepare
    Bs, As = clients(seed=1)
    # Execute
    B, A = F.flora_na(Bs, As, WEIGHTS, split=split)
    # Assert
    np.testing.assert_allclose((B @ A).numpy(), numpy_optimum(Bs, As, 4), atol=1e-10, rtol=0)


def test_orthonormal_a_is_flexloras_split() -> None:
    # Prepare
    Bs, As = clients(seed=2)
    # Execute
    B, A = F.flora_na(Bs, As, WEIGHTS, split="orthonormal-a")
    # Assert: Â has orthonormal rows; B̂'s columns are ordered by σ; identical to FlexLoRA's factors
    np.testing.assert_allclose((A @ A.mT).numpy(), np.eye(4), atol=1e-12, rtol=0)
    col = np.linalg.norm(B.numpy(), axis=0)
    assert np.all(np.diff(col) <= 0) and col[-1] > 0
    torch.testing.assert_close((B, A), F.flexlora(Bs, As, WEIGHTS), atol=1e-12, rtol=0)


def test_a_row_norm_puts_every_row_of_a_at_the_uploaded_scale() -> None:
    # Prepare: ρ = Σ p_u · mean_i ‖A_u[i]‖, worked out in numpy
    Bs, As = clients(seed=3, a_scale=0.05)
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    rho = sum(pu * np.linalg.norm(A.numpy(), axis=1).mean() for pu, A in zip(p, As))
    # Execute
    B, A = F.flora_na(Bs, As, WEIGHTS, split="a-row-norm")
    Bo, Ao = F.flora_na(Bs, As, WEIGHTS, split="orthonormal-a")
    # Assert
    np.testing.assert_allclose(np.linalg.norm(A.numpy(), axis=1), np.full(4, rho), rtol=1e-12)
    np.testing.assert_allclose(A.numpy(), rho * Ao.numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(B.numpy(), Bo.numpy() / rho, rtol=1e-12, atol=0)


def test_balanced_a_shrinks_with_the_update_while_orthonormal_a_does_not() -> None:
    # Prepare: the same clients with B 100× smaller (a small update, as after a few local steps from B = 0)
    Bs, As = clients(seed=4)
    small = [B / 100 for B in Bs]
    # Execute
    row = {s: [float(torch.linalg.vector_norm(F.flora_na(b, As, WEIGHTS, split=s)[1], dim=1).mean())
               for b in (Bs, small)] for s in ("balanced", "orthonormal-a", "a-row-norm")}
    # Assert: balanced's A rows scale with √σ (10× smaller for a 100× smaller update); the others keep their scale
    assert row["balanced"][0] / row["balanced"][1] == pytest.approx(10.0, rel=1e-9)
    assert row["orthonormal-a"] == pytest.approx([1.0, 1.0], rel=1e-12)
    assert row["a-row-norm"][0] == pytest.approx(row["a-row-norm"][1], rel=1e-12)


def test_zero_update_gives_zero_b_and_a_with_orthonormal_rows() -> None:
    # Prepare: round one of LoRA with B still zero: ΔW̄ = 0
    _, As = clients(seed=5)
    Bs = [torch.zeros(20, 4, dtype=torch.float64) for _ in WEIGHTS]
    # Execute
    B, A = F.flora_na(Bs, As, WEIGHTS, split="orthonormal-a")
    # Assert: gradients can flow into B next round (∂L/∂B ∝ Â ≠ 0), unlike the balanced split's zeros
    assert not B.any()
    np.testing.assert_allclose((A @ A.mT).numpy(), np.eye(4), atol=1e-12, rtol=0)
    assert not F.flora_na(Bs, As, WEIGHTS, split="balanced")[1].any()


def test_unknown_split_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"method.na_split = 'sideways' is not allowed; choose one of: balanced, fedit-scale, orthonormal-a, a-row-norm"):
        load(None, ["method.name=flora-na", "method.na_split=sideways"])
