"""Privacy for any method: client-level differential privacy (local or central, DP-FedAvg), sample-level DP-SGD
in local training (Opacus), and the accounting of both with Opacus's RDP accountant. docs/privacy.md describes
the guarantees, what each party sees, and measured privacy-utility curves.

- :mod:`fedlora.privacy.checks`: the config rules (which modes fit which methods and runtimes) and the noise
  calibration for ``privacy.target_epsilon``; light to import (``Config`` uses it).
- :mod:`fedlora.privacy.mechanism`: clipping and Gaussian noise as pure functions over name-keyed tensors.
- :mod:`fedlora.privacy.accounting`: ε from Opacus's accountant, and the calibration.
- :mod:`fedlora.privacy.wrapper`: :class:`PrivateMethod`, the wrapper around a method; :func:`wrap`.
- :mod:`fedlora.privacy.dpsgd`: :class:`DPSGD`, Opacus in local training.

The heavy modules load on first use, so that importing the config does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DPSGD", "PrivateMethod", "local_training", "wrap"]


def __getattr__(name: str) -> Any:
    if name in ("PrivateMethod", "wrap"):
        from fedlora.privacy import wrapper

        return getattr(wrapper, name)
    if name == "DPSGD":
        from fedlora.privacy.dpsgd import DPSGD

        return DPSGD
    raise AttributeError(name)


def local_training(config: Any) -> Any:
    """The :class:`DPSGD` settings of a run with ``privacy.dp_sgd``, else None (plain local training)."""
    p = config.privacy
    if not p.dp_sgd:
        return None
    import secrets

    from fedlora.privacy.accounting import require_opacus
    from fedlora.privacy.dpsgd import DPSGD

    require_opacus()

    seed = secrets.randbits(63) if p.noise_seed < 0 else p.noise_seed
    return DPSGD(p.dp_sgd_noise_multiplier, p.dp_sgd_clip_norm, seed)
