"""The Gaussian mechanism on a client's update, as pure functions over name-keyed tensors.

An update is the difference between what a client uploads and what it started the round from, over the keys
it uploads. Its L2 norm is taken over all of those tensors together (one vector), as in DP-FedAvg
(McMahan et al., ICLR 2018): clipping bounds what one client can change, the noise hides what it did change.
Everything is computed in float64 and returned in the tensors' own dtype.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping

import numpy as np
import torch


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of ``delta`` taken as one vector."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))


def clip(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """``delta`` scaled by min(1, C/‖delta‖): (clipped float64 tensors, the norm before, the factor applied)."""
    norm = update_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.double() * factor for k, v in delta.items()}, norm, factor


def gaussian(like: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """N(0, std²) noise of the shapes of ``like`` (float64, CPU), drawn key by key in sorted order."""
    return {k: torch.randn(like[k].shape, generator=generator, dtype=torch.float64) * std for k in sorted(like)}


def generator(*parts: int) -> torch.Generator:
    """A torch generator seeded by a hash of integer ``parts`` (base seed, round, client, ...)."""
    seed = int(np.random.SeedSequence([p % (1 << 63) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def digest(state: Mapping[str, torch.Tensor]) -> int:
    """A 63-bit fingerprint of tensors (their names and bytes): distinct server rounds get distinct noise."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def privatize_update(payload: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], clip_norm: float,
                     noise_std: float, gen: torch.Generator | None) -> tuple[dict[str, torch.Tensor], float]:
    """``start + clip(payload − start) (+ N(0, noise_std²))``, key by key: (the new payload, the norm before clipping).

    When the clip does not bind and there is no noise, ``payload`` itself is returned (bit for bit), so that a
    DP run with noise 0 and a loose clip equals the non-private run.
    """
    keys = sorted(payload)
    delta = {k: payload[k].double() - start[k].double() for k in keys}
    clipped, norm, factor = clip(delta, clip_norm)
    if factor == 1.0 and noise_std == 0:
        return dict(payload), norm
    noise = gaussian(clipped, noise_std, gen) if noise_std > 0 and gen is not None else {}
    out = {}
    for k in keys:
        value = start[k].double() + clipped[k]
        if k in noise:
            value = value + noise[k].to(value.device)
        out[k] = value.to(payload[k].dtype)
    return out, norm
