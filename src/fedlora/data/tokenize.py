"""Tokenize a dataset once per run and build padded batches from it on demand.

Examples are stored unpadded (truncated to ``max_length``) and padded per batch to the longest example in that
batch ("dynamic padding"): short texts do not pay for the longest one in the dataset. Padding is on the right,
which is what encoder classifiers expect and what decoder classifiers in transformers handle (they pool the last
non-padding token).

Sentence pairs (MNLI's premise and hypothesis) are encoded as pairs by the tokenizer: its separator between the two
texts, truncation of the longer one first, and its segment ids (``token_type_ids``, for BERT-style models that have
them) kept with the ids and padded with 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fedlora.errors import DataError


@dataclass(frozen=True)
class Encoded:
    """Token ids of every example (1-D int64 tensors, truncated, unpadded) and their int64 labels; for sentence
    pairs on a tokenizer with segment ids, those too (one tensor per example, as long as its ids)."""

    input_ids: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    token_type_ids: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"Encoded.labels must be a 1-D int64 tensor, got {self.labels.dtype} "
                            f"with shape {tuple(self.labels.shape)}")
        if len(self.input_ids) != len(self.labels):
            raise DataError(f"Encoded has {len(self.input_ids)} examples but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(texts: Sequence[str], labels: np.ndarray | Sequence[int] | torch.Tensor, tokenizer: Any,
           max_length: int, text_pairs: Sequence[str] | None = None) -> Encoded:
    """Tokenize ``texts`` (with ``text_pairs``: each text and its pair as one sequence) in one batched call
    (special tokens added, truncated to ``max_length``, longest text first, no padding)."""
    if len(texts) != len(labels):
        raise DataError(f"encode got {len(texts)} texts but {len(labels)} labels")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise DataError(f"encode got {len(texts)} texts but {len(text_pairs)} pairs")
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    if len(texts) == 0:
        return Encoded(input_ids=(), labels=torch.zeros(0, dtype=torch.int64))
    segments = text_pairs is not None and "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    batch = tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None, truncation=True,
                      max_length=max_length, padding=False, return_attention_mask=False,
                      return_token_type_ids=segments)
    ids = tuple(torch.tensor(row, dtype=torch.int64) for row in batch["input_ids"])
    types = tuple(torch.tensor(row, dtype=torch.int64) for row in batch["token_type_ids"]) if segments else None
    empty = [i for i, row in enumerate(ids) if row.numel() == 0]
    if empty:
        raise DataError(f"{len(empty)} example(s) tokenized to no tokens (first: index {empty[0]}); "
                        "remove empty texts or use a tokenizer that adds special tokens")
    label_tensor = torch.as_tensor(np.asarray(labels, dtype=np.int64)).clone()
    return Encoded(input_ids=ids, labels=label_tensor, token_type_ids=types)


def collate(encoded: Encoded, idx: Sequence[int] | np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of the examples at ``idx``: right-padded ``input_ids`` (with ``pad_id``), ``attention_mask``
    (1 on real tokens, 0 on padding), ``token_type_ids`` where the examples have them (padded with 0) and
    ``labels``, all int64, padded to the longest example in the batch."""
    rows = [int(i) for i in np.asarray(idx).reshape(-1)]
    if not rows:
        raise DataError("collate needs at least one example index")
    seqs = [encoded.input_ids[i] for i in rows]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    width = int(lengths.max())
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = s
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).to(torch.int64)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if encoded.token_type_ids is not None:
        types = torch.zeros((len(seqs), width), dtype=torch.int64)
        for r, i in enumerate(rows):
            types[r, : len(encoded.token_type_ids[i])] = encoded.token_type_ids[i]
        batch["token_type_ids"] = types
    batch["labels"] = encoded.labels[torch.tensor(rows, dtype=torch.int64)]
    return batch
