"""Tasks: how to batch a client's examples, the training loss, and evaluation from real predictions.

A task owns the run's tokenized data (tokenized once) and is the only place that knows what a batch looks
like, so local training and the runtimes work the same for classification and (later) generation.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from fedlora.data.tokenize import Encoded, collate


class Task(Protocol):
    """The interface local training and evaluation rely on."""

    def batch(self, idx: Sequence[int] | np.ndarray, device: torch.device) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms ``loss`` averages over for ``batch`` (examples, or response tokens): the weight of a
        micro-batch in gradient accumulation (fedlora.client.LocalTrainer)."""
        ...

    def evaluate(self, model: nn.Module, idx: np.ndarray, batch_size: int, device: torch.device) -> dict[str, float]: ...


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """Macro-F1 over the labels that occur in ``gold`` or ``pred``."""
    return float(f1_score(gold, pred, average="macro", zero_division=0))


class ClassificationTask:
    """Sequence classification with cross-entropy; accuracy and macro-F1 from argmax predictions."""

    kind = "classification"

    def __init__(self, encoded: Encoded, pad_id: int, num_labels: int) -> None:
        self.encoded = encoded
        self.pad_id = pad_id
        self.num_labels = num_labels
        self._lengths = np.array([len(x) for x in encoded.input_ids])

    def batch(self, idx: Sequence[int] | np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate(self.encoded, idx, self.pad_id).items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss is a mean over examples: one term per example."""
        return int(batch["labels"].numel())

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        # Cross-entropy in float32 whatever the compute dtype: bf16 logits have 8 bits of mantissa, too few for
        # the log-sum-exp of the loss (and the head's gradient) to be accurate.
        return F.cross_entropy(logits.float(), labels, reduction=reduction)

    @torch.inference_mode()
    def predict(self, model: nn.Module, idx: np.ndarray, batch_size: int, device: torch.device) -> tuple[np.ndarray, float]:
        """Predicted labels for ``idx`` (in the order given) and the mean loss."""
        idx = np.asarray(idx)
        # Sort by length so that each batch pads only to its own longest example; restore the order afterwards.
        order = np.argsort(self._lengths[idx], kind="stable")
        pred = np.empty(len(idx), dtype=np.int64)
        total_loss = 0.0
        model.eval()
        for start in range(0, len(idx), batch_size):
            pos = order[start:start + batch_size]
            batch = self.batch(idx[pos], device)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            pred[pos] = logits.argmax(-1).cpu().numpy()
            total_loss += float(self._loss(logits, batch["labels"], reduction="sum"))
        return pred, total_loss / max(len(idx), 1)

    def evaluate(self, model: nn.Module, idx: np.ndarray, batch_size: int, device: torch.device) -> dict[str, float]:
        if len(idx) == 0:
            return {"acc": float("nan"), "f1": float("nan"), "loss": float("nan"), "n": 0}
        pred, loss = self.predict(model, idx, batch_size, device)
        gold = self.encoded.labels[torch.as_tensor(np.asarray(idx))].numpy()
        return {"acc": float(np.mean(pred == gold)), "f1": macro_f1(pred, gold),
                "loss": loss, "n": int(len(idx))}
