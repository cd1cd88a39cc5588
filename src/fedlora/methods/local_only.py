"""Local-only training: the reference every federated method must beat to be worth its messages.

Each client trains its own adapter and head on its own data, with the same rounds, local steps and optimizer as a
federated run, and nothing is ever uploaded or averaged: the server broadcasts an empty payload. A federated
method that does not beat this has gained nothing from the other clients' data (what FedSA-LoRA's and FedDPA's
papers call the "local" or "standalone" baseline). There is no global model: evaluation is personalized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from fedlora.config import Config
from fedlora.methods.base import Method
from fedlora.protocol import Broadcast, Upload
from fedlora.registry import METHODS

if TYPE_CHECKING:
    import torch


class LocalOnly(Method):
    name = "local-only"
    description = "local-only reference: every client trains its own adapter and head alone; nothing is sent"
    default_share_head = False
    has_global_model = False

    def adapter_keys(self) -> tuple[str, ...]:
        return ()  # nothing leaves a client; with the head private the upload plan is empty

    @classmethod
    def check_config(cls, config: Config) -> str | None:
        if config.method.share_head:
            return "method.share_head = true: local-only training shares nothing; unset it or set it to false"
        return None

    def aggregate(self, uploads: Sequence[Upload], global_state: Mapping[str, torch.Tensor]) -> Broadcast:
        return Broadcast(payload={})


METHODS.register(LocalOnly)
