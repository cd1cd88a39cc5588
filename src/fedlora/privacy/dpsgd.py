"""Sample-level DP in a client's local training (DP-SGD, Abadi et al. 2016) with Opacus, not by hand:
Opacus's ``GradSampleModule`` computes per-example gradients of the trainable adapter tensors, and its
``DPOptimizer`` clips each to ``dp_sgd_clip_norm`` and adds N(0, (z·C)²) to their sum before the inner
optimizer (AdamW or SGD) steps. Batches are Poisson-sampled (each example with probability batch_size / n),
which is what the RDP accountant assumes (fedlora.privacy.accounting.sgd_epsilon).

The known pitfall of Opacus with PEFT models (meta-pytorch/opacus#820, huggingface/peft#3409): hooks registered
before the model's parameters are moved or materialised hold stale parameters, and training then silently
leaves the adapter unchanged. Here the model is built and moved to its device once (experiment.build) and
wrapped afresh at every local training, after the trainable tensors are chosen, and the wrapper is removed
after the round (the one shared model carries no Opacus hooks between clients). tests/test_privacy.py checks
that a DP-SGD round moves the adapter.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings of a run (``privacy.dp_sgd_*``) and the seed of its noise."""

    noise_multiplier: float
    clip_norm: float
    seed: int

    def batches(self, train: np.ndarray, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
        """``steps`` Poisson-sampled batches: each example of ``train`` is in a batch with probability
        batch_size / len(train), independently (expected size batch_size; a batch may be empty)."""
        rng = np.random.default_rng(seed)
        q = min(1.0, batch_size / len(train))
        return [train[rng.random(len(train)) < q] for _ in range(steps)]

    @contextmanager
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, expected_batch_size: int,
               seed: int, device: torch.device) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
        """(the model with per-example gradient hooks, the DP optimizer) for one local training; hooks and
        per-example gradients are removed afterwards."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        from fedlora.privacy.mechanism import generator

        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        gen = generator(self.seed, seed, 0xD95)
        if device.type != "cpu":  # Opacus draws the noise on the parameters' device
            gen = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        dp_opt = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.clip_norm,
                             expected_batch_size=expected_batch_size, loss_reduction="mean", generator=gen)
        try:
            with warnings.catch_warnings():
                # Opacus's backward hooks fire on module outputs when no input needs a gradient (frozen embeddings
                # below the first adapter): expected here, and what Opacus's own LoRA tutorial does.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield wrapped, dp_opt
        finally:
            wrapped._close()  # removes the hooks and the grad_sample attributes from the shared model
