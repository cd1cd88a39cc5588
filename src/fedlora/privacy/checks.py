"""The rules of the ``[privacy]`` section that involve other sections, and the noise calibration for
``privacy.target_epsilon``. Light to import (no torch): ``Config`` runs :func:`check_config` on construction.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from fedlora.errors import ConfigError

if TYPE_CHECKING:
    from fedlora.config import Config, PrivacyConfig


def check_config(config: Config) -> None:
    """Refuse combinations that would give a wrong or empty guarantee, each with the reason."""
    from fedlora.methods import METHODS  # late: the method registry imports fedlora.config

    p, m = config.privacy, config.method
    if p.target_epsilon is not None and p.dp == "off":
        raise ConfigError(f"privacy.target_epsilon = {p.target_epsilon:g} needs privacy.dp = 'local' or 'central' "
                          "(there is no client-level noise to calibrate with dp = 'off')")
    method = METHODS.get(m.name)
    if p.dp == "central":
        if m.weighting != "uniform":
            raise ConfigError(f"privacy.dp = 'central' needs method.weighting = 'uniform', not {m.weighting!r}: a "
                              "weight that grows with a client's data size lets one client move the mean by more "
                              "than clip_norm / (expected clients), which the noise is calibrated to")
        if method is not None and not method.sum_only:
            raise ConfigError(f"privacy.dp = 'central' adds noise to the sum of the uploads, but method.name = "
                              f"{m.name!r} needs each client's upload, not only their sum; use dp = 'local' (the "
                              "server then works on noised uploads) or a method that averages: "
                              f"{', '.join(n for n, c in METHODS.items() if c.sum_only)}")
    if p.secure_aggregation:
        if method is not None and not method.sum_only:
            raise ConfigError(f"privacy.secure_aggregation = true lets the server learn only the sum of the uploads, "
                              f"but method.name = {m.name!r} needs each client's upload; use one of: "
                              f"{', '.join(n for n, c in METHODS.items() if c.sum_only)}")
        if config.runtime.kind != "flower":
            raise ConfigError("privacy.secure_aggregation = true needs runtime.kind = 'flower': the embedded runtime "
                              "holds every client in one process, so there is no one to hide an upload from, and it "
                              "does not pretend to (refused rather than simulated; docs/privacy.md)")
        if config.train.max_update_norm_ratio > 0:
            raise ConfigError(f"privacy.secure_aggregation = true hides each update from the server, but "
                              f"train.max_update_norm_ratio = {config.train.max_update_norm_ratio:g} screens updates "
                              "by their norms; set it to 0")
        if config.faults.active:
            raise ConfigError("privacy.secure_aggregation = true with [faults]: faults are injected into individual "
                              "uploads on the server side, which secure aggregation hides; turn the faults off (a "
                              "client dropping out is tested with the node config fail-at, docs/flower.md)")
    if p.dp_sgd:
        from fedlora.registry import ADAPTERS, CAPABILITIES

        if "per-example-gradients" not in ADAPTERS.lookup(config.adapter.kind).provides:
            able = [n for n, k in ADAPTERS.items() if "per-example-gradients" in k.provides]
            raise ConfigError(f"privacy.dp_sgd = true needs {CAPABILITIES['per-example-gradients']}, which "
                              f"adapter.kind = {config.adapter.kind!r} does not provide; use one of: {', '.join(able)}")
        t = config.train
        if t.micro_batch_size:
            # Opacus keeps per-example gradients of every pass and clips each; but a Poisson batch's size is random, so
            # a fixed pass size would split it unevenly and its mean-loss scaling would be each pass's, not the batch's.
            raise ConfigError(f"privacy.dp_sgd = true with train.micro_batch_size = {t.micro_batch_size} is not "
                              "supported: DP-SGD's batches are Poisson-sampled (random size) and clipped per example "
                              "by Opacus over one pass; set train.micro_batch_size = 0 (or lower train.batch_size)")
        if t.gradient_checkpointing:
            # Opacus's hooks capture each layer's activations in the forward pass; a checkpointed layer runs its
            # forward twice, so they would capture it twice.
            raise ConfigError("privacy.dp_sgd = true with train.gradient_checkpointing = true is not supported: "
                              "Opacus records each layer's activations in the forward pass, which checkpointing "
                              "reruns; set train.gradient_checkpointing = false")


def float32_reasons(config: Config) -> list[str]:
    """The privacy features of ``config`` that need float32 compute, one phrase each (read by
    ``Config.float32_needs``: ``train.dtype = "auto"`` then resolves to float32, an explicit bf16 is refused)."""
    if config.privacy.dp_sgd:
        return ["privacy.dp_sgd = true needs float32 (per-example gradients and their clipping in bf16 would be "
                "too coarse)"]
    return []


def client_rate(config: Config) -> float:
    """The probability q that a client takes part in a round: clients_per_round / num_clients."""
    return config.clients_per_round / config.data.num_clients


def resolve_privacy(config: Config) -> PrivacyConfig:
    """The privacy section with ``noise_multiplier`` calibrated to ``target_epsilon`` (when set) for
    ``train.rounds`` rounds and the client sampling of the mode (see :mod:`fedlora.privacy.accounting`)."""
    p = config.privacy
    if p.target_epsilon is None or p.dp == "off":
        return p
    from fedlora.privacy.accounting import calibrate

    z = calibrate(p.dp, p.target_epsilon, p.delta, client_rate(config), config.train.rounds)
    return replace(p, noise_multiplier=z)
