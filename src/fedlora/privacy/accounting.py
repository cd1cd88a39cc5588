"""Privacy accounting with Opacus's RDP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019 for the
Poisson-subsampled Gaussian). No formula is written here: every ε comes from ``opacus.accountants``.

What is accounted, per mode (docs/privacy.md explains the neighbouring relations):

- ``central``: each round is one Poisson-subsampled Gaussian mechanism on the sum of the clipped updates, rate
  q = clients_per_round / num_clients, noise multiplier z (sensitivity clip_norm: one client added or removed).
- ``local``: each upload of a client is a Gaussian mechanism on that client's data with noise std z·C; any two
  clipped updates differ by up to 2C, so it is accounted with noise multiplier z/2, composed over the rounds the
  client took part in, without amplification (the server sees who took part). The reported ε is the client
  with the most participations.
- ``dp_sgd``: per client, local_steps Poisson-subsampled Gaussian steps per round it took part in, rate
  batch_size / (its training examples), noise multiplier dp_sgd_noise_multiplier (one example added/removed).
"""

from __future__ import annotations

import functools
import math
import warnings

# Orders of the Rényi divergence tried when converting to (ε, δ): Opacus's defaults extended to 256 so that
# small noise multipliers (large ε) get a tight bound too.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256]


def require_opacus() -> None:
    """A clear error instead of an ImportError when the privacy extra is not installed."""
    import importlib.util

    from fedlora.errors import ConfigError

    if importlib.util.find_spec("opacus") is None:
        raise ConfigError("[privacy] needs Opacus for its accountant and DP-SGD: pip install 'fedlora[privacy]' "
                          "(opacus 1.6.0; make install includes it)")


def epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of a composition of (noise multiplier, sampling rate, steps) Gaussian mechanisms;
    ``math.inf`` when some step has no noise, 0 when nothing was released."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    require_opacus()
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta, alphas=ALPHAS))


def central_epsilon(noise_multiplier: float, rate: float, rounds: int, delta: float) -> float:
    """DP-FedAvg with Poisson sampling of clients at ``rate`` for ``rounds`` rounds."""
    return epsilon([(noise_multiplier, rate, rounds)], delta)


def local_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """A client that uploaded ``releases`` locally noised updates (noise std z·C, replace-one sensitivity 2C)."""
    return epsilon([(noise_multiplier / 2, 1.0, releases)], delta)


def sgd_epsilon(noise_multiplier: float, rate: float, steps: int, delta: float) -> float:
    """DP-SGD on one client: ``steps`` Poisson-sampled steps at ``rate``."""
    return epsilon([(noise_multiplier, min(1.0, rate), steps)], delta)


@functools.lru_cache(maxsize=64)
def calibrate(mode: str, target_epsilon: float, delta: float, rate: float, rounds: int) -> float:
    """The smallest noise multiplier (to 0.01 in ε) whose ε after ``rounds`` rounds is at most ``target_epsilon``:
    Opacus's ``get_noise_multiplier`` (binary search over its accountant). ``local`` assumes a client that takes
    part in every round. Cached: the search takes seconds and every ``Config.resolved()`` asks for it again."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    from fedlora.errors import ConfigError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            if mode == "central":
                return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate,
                                                  steps=rounds, accountant="rdp", epsilon_tolerance=0.01,
                                                  alphas=ALPHAS))
            z = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=1.0,
                                     steps=rounds, accountant="rdp", epsilon_tolerance=0.01, alphas=ALPHAS)
            return 2.0 * float(z)
        except ValueError as e:  # Opacus: "The privacy budget is too low."
            raise ConfigError(f"privacy.target_epsilon = {target_epsilon:g} cannot be reached for {rounds} rounds "
                              f"at delta = {delta:g} ({e})") from None
