"""The sections that guard a run against what its parties may do or learn: ``[faults]`` (seeded broken clients,
to test that a run survives them) and ``[privacy]`` (differential privacy and secure aggregation,
docs/privacy.md). Part of the schema of :mod:`fedlora.config`, which re-exports both."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.config_fields import MAX_SECONDS, _opt, _Section


@dataclass(frozen=True)
class FaultsConfig(_Section):
    """Seeded fault injection, per client per round, to test that runs survive broken clients."""

    SECTION = "faults"
    crash: float = _opt(0.0, "probability a client crashes before replying", ge=0, le=1)
    nonfinite: float = _opt(0.0, "probability a client's update holds NaN/Inf", ge=0, le=1)
    wrong_shape: float = _opt(0.0, "probability a client's update has a tensor of the wrong shape", ge=0, le=1)
    straggler: float = _opt(0.0, "probability a client replies late (after train.round_timeout)", ge=0, le=1)
    straggler_delay: float = _opt(0.0, "extra seconds a straggler takes (0: twice train.round_timeout)", ge=0,
                                  le=MAX_SECONDS)
    seed: int = _opt(0, "seed of the fault draws")

    @property
    def active(self) -> bool:
        return any((self.crash, self.nonfinite, self.wrong_shape, self.straggler))


@dataclass(frozen=True)
class PrivacyConfig(_Section):
    """Differential privacy and secure aggregation (docs/privacy.md); fedlora.privacy wraps the method."""

    SECTION = "privacy"
    dp: str = _opt("off", "client-level DP: 'local' (each client clips its update to clip_norm and adds Gaussian "
                   "noise before upload), 'central' (DP-FedAvg: clients clip, the server adds the noise to the sum; "
                   "clients are then Poisson-sampled with rate clients_per_round/num_clients)",
                   choices=("off", "local", "central"))
    clip_norm: float = _opt(1.0, "L2 bound C on a client's update (uploaded tensors minus the round's start)", gt=0)
    noise_multiplier: float = _opt(1.0, "Gaussian noise std / clip_norm (z); 0: clipping only, no guarantee", ge=0)
    delta: float = _opt(1e-5, "delta of the reported (epsilon, delta) guarantees", gt=0, lt=1)
    target_epsilon: float | None = _opt(None, "calibrate noise_multiplier (Opacus RDP accountant) so that epsilon "
                                        "after train.rounds rounds is at most this (unset: use noise_multiplier)",
                                        gt=0)
    noise_seed: int = _opt(-1, "seed of the DP noise (-1: fresh secret entropy each run, for deployments; >= 0: "
                           "reproducible noise, for experiments only)", ge=-1)
    dp_sgd: bool = _opt(False, "sample-level DP-SGD in local training (Opacus: per-example clipping and noise, "
                        "Poisson-sampled batches); each client's epsilon is reported")
    dp_sgd_noise_multiplier: float = _opt(1.0, "DP-SGD noise std / dp_sgd_clip_norm", ge=0)
    dp_sgd_clip_norm: float = _opt(1.0, "DP-SGD per-example gradient L2 bound", gt=0)
    secure_aggregation: bool = _opt(False, "the server learns only the weighted mean of each round's uploads "
                                    "(Flower's SecAgg+; runtime.kind = 'flower' and a sum_only method; "
                                    "docs/privacy.md)")

    @property
    def active(self) -> bool:
        """Whether anything of this section changes a run (the method is then wrapped by fedlora.privacy)."""
        return self.dp != "off" or self.dp_sgd or self.secure_aggregation
