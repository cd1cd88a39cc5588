"""Seeded fault injection: a transport wrapper that makes clients crash, straggle or send broken updates.

It wraps any :class:`~fedlora.runtime.loop.Transport` (embedded or Flower) instead of changing it, the way
Flower's differential-privacy wrappers wrap a strategy. Each (round, client) draws its faults from its own
generator seeded by (faults.seed, round, client), so the same config injects the same faults whatever the
order of clients, the runtime, or a resume in between.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fedlora.config import FaultsConfig
from fedlora.methods import Broadcast, Upload
from fedlora.runtime.loop import ClientFailure, Transport, WrappedTransport

KINDS = ("crash", "nonfinite", "wrong_shape", "straggler")


@dataclass(frozen=True)
class Draw:
    crash: bool
    nonfinite: bool
    wrong_shape: bool
    straggler: bool


def draw(cfg: FaultsConfig, round_: int, client: int) -> Draw:
    """The faults of one client in one round (independent draws, one uniform number per fault kind)."""
    u = np.random.default_rng([cfg.seed, round_, client, 0xFA17]).random(len(KINDS))
    return Draw(*(bool(x < getattr(cfg, k)) for x, k in zip(u, KINDS)))


def corrupt_nonfinite(payload: dict[str, torch.Tensor], round_: int, client: int) -> dict[str, torch.Tensor]:
    """A copy of the payload with NaN and Inf written into one tensor."""
    out = {k: v.clone() for k, v in payload.items()}
    key = sorted(out)[(round_ + client) % len(out)]
    flat = out[key].view(-1)
    flat[0] = float("nan")
    flat[-1] = float("inf")
    return out


def corrupt_shape(payload: dict[str, torch.Tensor], round_: int, client: int) -> dict[str, torch.Tensor]:
    """A copy of the payload with one tensor missing its last row."""
    out = dict(payload)
    key = sorted(out)[(round_ + client) % len(out)]
    t = out[key]
    out[key] = t[:-1].clone() if t.shape[0] > 1 else torch.cat([t, t])
    return out


class FaultyTransport(WrappedTransport):
    """Injects the configured faults into ``inner``'s fit replies; also enforces ``round_timeout``."""

    def __init__(self, inner: Transport, cfg: FaultsConfig, round_timeout: float) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.round_timeout = round_timeout
        self.injected = {k: 0 for k in KINDS}

    def fit(self, client: int, broadcasts: Sequence[Broadcast], round_: int) -> Upload:
        d = draw(self.cfg, round_, client)
        if d.crash:
            self.injected["crash"] += 1
            raise ClientFailure("crashed (injected fault)")
        start = time.perf_counter()
        upload = self.inner.fit(client, broadcasts, round_)
        elapsed = time.perf_counter() - start
        if d.straggler:
            self.injected["straggler"] += 1
            elapsed += self.cfg.straggler_delay or 2 * self.round_timeout
        if self.round_timeout > 0 and elapsed > self.round_timeout:
            raise ClientFailure(f"no reply within train.round_timeout = {self.round_timeout:g} s "
                                f"({'injected straggler' if d.straggler else 'measured'}: {elapsed:.2f} s)")
        payload = dict(upload.payload)
        if d.nonfinite:
            self.injected["nonfinite"] += 1
            payload = corrupt_nonfinite(payload, round_, client)
        if d.wrong_shape:
            self.injected["wrong_shape"] += 1
            payload = corrupt_shape(payload, round_, client)
        return Upload(upload.client, payload, upload.num_examples, upload.meta)
